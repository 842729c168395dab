"""What is checked before a run starts or resumes, from the recipe alone: sequences the model has positions for,
and which recipe keys a resumed run may change."""

from pathlib import Path

from qtune.config import position_limit
from qtune.peft import method_named
from qtune.recipe.load import load_recipe
from qtune.recipe.schema import RecipeError, iter_fields
from qtune.train import common

# The recipe keys a resumed run may change: none alters the steps already taken or the ones to come, except by
# running longer (max_steps, epochs) or with a new peak learning rate (the documented way on after a non-finite
# loss); output.dir differs when a run directory was moved or copied. Any other difference from the run's
# recipe.toml is refused. Allowed changes are recorded in resumes.jsonl.
RESUMABLE_KEYS = ("description", "output.dir", "train.max_steps", "train.epochs", "train.lr", "train.log_every",
                  "train.save_every", "train.collapse_steps", "train.collapse_tolerance", "train.log", "data.cache_dir")


def resume_changes(run_dir: Path, recipe) -> dict[str, list]:
    """{key: [the run's value, this recipe's value]} for the keys `recipe` changes against the run's recipe.toml;
    a change outside RESUMABLE_KEYS (data, batch, schedule, optimizer, seed, model, adapter ...) is refused."""
    saved = run_dir / "recipe.toml"
    if not saved.is_file():  # a run from before recipe.toml was written first
        return {}
    try:
        before = {key: value for key, value, _ in iter_fields(load_recipe(saved, schema=type(recipe)))}
    except RecipeError as e:
        raise common.TrainingError(f"--resume: the run's own recipe cannot be read ({e}); restore {saved}") from None
    changes = {key: [before.get(key), value] for key, value, _ in iter_fields(recipe) if before.get(key) != value}
    refused = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items() if key not in RESUMABLE_KEYS]
    if refused:
        raise common.TrainingError(
            f"--resume: this recipe differs from the run's ({saved}) in what decides its course: "
            + "; ".join(refused) + f". Resume with the run's recipe (only {', '.join(RESUMABLE_KEYS)} may change), "
            "or start a new run with output.dir=NEW_DIR")
    return changes


def check_positions(recipe, config) -> None:
    """Refuse sequences longer than the model has positions for (RoPE beyond them is extrapolation the model
    never saw): data.max_seq_len, plus ppo.max_new_tokens for PPO's prompt + response."""
    data, ppo = getattr(recipe, "data", None), getattr(recipe, "ppo", None)
    if data is None or not hasattr(data, "max_seq_len"):
        return
    length, keys = data.max_seq_len, "data.max_seq_len"
    if ppo is not None:
        length, keys = length + ppo.max_new_tokens, "data.max_seq_len + ppo.max_new_tokens"
    if extra := method_named(recipe.peft.method).extra_positions(recipe):  # virtual tokens hold positions too
        length, keys = length + extra, f"{keys} + peft.{recipe.peft.method}.num_virtual_tokens"
    limit = position_limit(config)
    if length > limit:
        raise common.TrainingError(
            f"{keys} = {length} is longer than the {limit} positions of {recipe.model.path} (its config.json's "
            f"max_position_embeddings{', extended by its rope_scaling' if config.rope_scaling else ''}); lower it to "
            f"at most {limit}, or use a model whose rope_scaling covers {length} tokens")
