"""RL verbs: `qtune ppo`, `qtune grpo` and `qtune best-of-n`.

Each prints its run summary as one JSON object on the last stdout line; progress goes to stderr.
"""

import json

import click

from qtune.cli.common import command, err, load_checked, run_or_explain


@command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output.dir.")
def ppo(recipe, overrides, resume):
    """PPO on a LoRA policy with a RECIPE (file or shipped name, e.g. `ppo`).

    Policy, value and reward adapters share one 4-bit base; the reference is the base with adapters off.
    Overrides look like `train.max_steps=50 ppo.reward_fn=qtune.align.reward_functions:arithmetic`.
    """
    from qtune.recipe.align import PPORecipe
    from qtune.train.ppo import run_ppo

    r = load_checked(recipe, overrides, PPORecipe)
    click.echo(json.dumps(run_or_explain(run_ppo, r, resume=resume, console=err)))


@command("grpo")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output.dir.")
def grpo(recipe, overrides, resume):
    """Critic-free RL (GRPO, Dr GRPO, RLOO; DAPO's fixes) on a LoRA policy with a RECIPE (file or shipped name).

    Groups of sampled responses are scored by reward functions or reward adapters on the same 4-bit base; the
    reference is the base with adapters off. Overrides look like `grpo.group_size=4 grpo.advantage=rloo`.
    The last stdout line is the summary: metric, before, after (held-out accuracy), kl, ...
    """
    from qtune.recipe.grpo import GRPORecipe
    from qtune.train.grpo import run_grpo

    r = load_checked(recipe, overrides, GRPORecipe)
    click.echo(json.dumps(run_or_explain(run_grpo, r, resume=resume, console=err)))


@command("best-of-n")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Reuse the kept samples and continue the SFT run from its newest checkpoint.")
def best_of_n(recipe, overrides, resume):
    """Rejection-sampling fine-tuning with a RECIPE (file or shipped name, e.g. `best_of_n`).

    Samples best_of_n.n responses per prompt, keeps the best-scoring one, and fine-tunes on those with the SFT loop.
    """
    from qtune.recipe.align import BestOfNRecipe
    from qtune.train.best_of_n import run_best_of_n

    r = load_checked(recipe, overrides, BestOfNRecipe)
    click.echo(json.dumps(run_or_explain(run_best_of_n, r, resume=resume, console=err)))


COMMANDS = [ppo, grpo, best_of_n]
