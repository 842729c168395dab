"""The `qtune` command line. Each group of verbs lives in its own module; this file only gathers them."""

import click

from qtune.cli import model_cmds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qtune")
def main() -> None:
    """qtune: QLoRA fine-tuning on one GPU (or a CPU)."""


for _command in model_cmds.COMMANDS:
    main.add_command(_command)
