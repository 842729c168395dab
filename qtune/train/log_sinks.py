"""Where a run's metrics go besides `metrics.jsonl` (`train.log`): TensorBoard and Weights & Biases.

Each sink receives every record `MetricsLog` writes and logs its numeric fields as scalars at the record's
step. A resumed run continues the same run: TensorBoard drops the events after the checkpoint's step
(`purge_step`) and appends; W&B reopens the run whose id the first start saved in `wandb-run-id`.
W&B works offline with WANDB_MODE=offline (then `wandb sync output.dir/wandb/offline-run-*`).
"""

import importlib.util
import json
import os
import secrets
import shutil
from pathlib import Path

from qtune.train.common import TrainingError

# Sink name -> (the package it needs, the qtune extra that installs it).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_sinks(log: list[str]) -> None:
    """A TrainingError naming the extra to install when a sink's package is missing (before anything is written)."""
    for name in log:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            package, extra = PACKAGES[name]
            raise TrainingError(f"train.log includes {name!r} but the {package} package is not installed; "
                                f"install it with: pip install 'qtune[{extra}]' (or drop {name!r} from train.log)")


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record, step excluded."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Event files under `run_dir/tensorboard/`."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / "tensorboard"
        if resume_step is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # a fresh run starts a fresh history, as metrics.jsonl does
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("recipe", f"```\n{json.dumps(config, indent=2)}\n```")

    def write(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self, summary: dict) -> None:
        """The summary (held-out before / after, final loss ...) as a two-column table under the tag "summary"."""
        if summary:
            rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
            self.writer.add_text("summary", f"| | value |\n|---|---|\n{rows}")
        self.writer.close()


class WandbSink:
    """A W&B run (project $WANDB_PROJECT, default "qtune") with the resolved recipe as its config."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict):
        import wandb

        id_file = run_dir / "wandb-run-id"
        if resume_step is not None and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(8)  # W&B run ids: lower-case letters and digits
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qtune"), id=run_id, resume="allow",
                              dir=str(run_dir), name=run_dir.name, config=config)

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self, summary: dict) -> None:
        """The summary (held-out before / after, final loss ...) becomes the run's W&B summary."""
        self.run.summary.update(summary)
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def open_sinks(log: list[str], run_dir: Path, resume_step: int | None, config: dict) -> list:
    """The sinks `train.log` names besides jsonl (which `MetricsLog` always writes)."""
    check_sinks(log)
    return [SINKS[name](Path(run_dir), resume_step, config) for name in dict.fromkeys(log) if name in SINKS]
