"""The `qtune` command line. Each group of verbs lives in its own module; this file only gathers them."""

import click

from qtune.cli import (align_cmds, datagen_cmds, eval_cmds, export_cmds, hub_cmds, lora_cmds, memory_cmds, model_cmds, ppo_cmds, recipe_cmds,
                       train_cmds)
from qtune.cli.common import QtuneGroup


@click.group(cls=QtuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qtune")
def main() -> None:
    """qtune: QLoRA fine-tuning on one GPU (or a CPU)."""


for _command in (hub_cmds.COMMANDS + model_cmds.COMMANDS + lora_cmds.COMMANDS + recipe_cmds.COMMANDS + train_cmds.COMMANDS
                 + align_cmds.COMMANDS + ppo_cmds.COMMANDS + datagen_cmds.COMMANDS + memory_cmds.COMMANDS
                 + export_cmds.COMMANDS + eval_cmds.COMMANDS):
    main.add_command(_command)
