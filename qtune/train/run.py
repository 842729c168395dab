"""A training run's output directory and what the user sees: progress, metrics, checkpoints, summary.

    output.dir/
      recipe.toml          the resolved recipe (overrides applied)
      metrics.jsonl        one JSON object per logged step (`step`, `loss`, `lr`, ...)
      checkpoints/step-N/  adapter (PEFT) + trainable tensors + optimizer + scheduler + RNG + data position
      adapter/             the final adapter, PEFT format
      loss_curve.png, summary.json
"""

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qtune.data.batching import DataPosition
from qtune.lora import save_adapter
from qtune.train import common


def load_base_model(model_section, device):
    """The frozen (4-bit by default) base model and its tokenizer, as a recipe's [model] section says."""
    from qtune.checkpoint import load_model, resolve
    from qtune.tokenizer import load_tokenizer

    model_dir = resolve(model_section.path)
    model = load_model(model_dir, quantize=model_section.quantize, dtype=model_section.dtype,
                       kernels=model_section.kernels, double_quant=model_section.double_quant, device=device)
    model.gradient_checkpointing = model_section.gradient_checkpointing
    return model, load_tokenizer(model_dir)


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Run:
    def __init__(self, out_dir: Path, console: Console | None, resume: bool):
        self.dir = Path(out_dir)
        self.console = console or Console(stderr=True)
        self.checkpointer = common.Checkpointer(self.dir)
        if not resume and (self.checkpointer.latest() or (self.dir / "adapter").exists()):
            raise common.TrainingError(
                f"{self.dir} already holds a run (checkpoints/ or adapter/); pass --resume to continue it, "
                "or set output.dir=NEW_DIR to start a new one (nothing there is overwritten)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = common.MetricsLog(self.dir / "metrics.jsonl")
        self.progress: Progress | None = None
        self.task = None
        self.started = time.perf_counter()
        self.base_model = ""

    # ---- setup -------------------------------------------------------------------------------------
    def write_recipe(self, text: str) -> None:
        tmp = self.dir / ".recipe.toml.tmp"
        tmp.write_text(text)
        tmp.replace(self.dir / "recipe.toml")

    def show_data_stats(self, stats: dict) -> None:
        line = (f"data: {stats['train_examples']} train / {stats['val_examples']} held-out examples, "
                f"{stats['trained_tokens']} trained tokens")
        if stats.get("truncated"):
            line += f", {stats['truncated']} truncated to max_seq_len"
        if stats.get("dropped"):
            line += f", {stats['dropped']} dropped (no response token left after truncation)"
        self.console.print(line)

    def restore(self, model, name: str, optimizer, scheduler) -> tuple[int, DataPosition]:
        """Load the newest complete checkpoint; returns (step, data position)."""
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            raise common.TrainingError(f"--resume: no complete checkpoint under {self.checkpointer.dir}")
        saved = common.load_state(ckpt, "trainable")
        params = _trainable(model)
        if set(saved) != set(params):
            raise common.TrainingError(f"{ckpt}: its trainable tensors do not match this recipe's adapter "
                                       "(was lora.* changed since the checkpoint?)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        optimizer.load_state_dict(common.load_state(ckpt, "optimizer"))
        scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
        trainer = json.loads((ckpt / "trainer.json").read_text())
        common.set_rng_state(common.load_state(ckpt, "rng"))
        self.metrics = common.MetricsLog(self.dir / "metrics.jsonl", resume_step=trainer["step"])
        self.console.print(f"resumed from {ckpt} (step {trainer['step']})")
        return trainer["step"], DataPosition.from_dict(trainer["position"])

    # ---- during training ---------------------------------------------------------------------------
    def start_progress(self, total: int, done: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  "
                       "peak {task.fields[mem]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-", lr="-", tps="-", mem="-")
        self.progress.start()

    def step_done(self, record: dict, log: bool) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tps=f"{record['tokens_per_s']:.0f}",
                                 mem=f"{record['peak_memory_bytes'] / 2**30:.2f} GB")
        if log:
            self.metrics.write(record)

    def log(self, record: dict) -> None:
        self.metrics.write(record)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def save_checkpoint(self, step, model, name, optimizer, scheduler, position, rng=None) -> Path:
        def write(tmp: Path):
            save_adapter(model, tmp / "adapter", name=name, base_model_name_or_path=self.base_model)
            common.save_state(tmp, "trainable", {n: p.detach() for n, p in _trainable(model).items()})
            common.save_state(tmp, "optimizer", optimizer.state_dict())
            common.save_state(tmp, "rng", rng if rng is not None else common.rng_state())
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "position": position.to_dict()}))

        return self.checkpointer.save(step, write)

    # ---- the end ------------------------------------------------------------------------------------
    def finish(self, model, name: str, base_model: str, summary: dict) -> dict:
        adapter = save_adapter(model, self.dir / "adapter", name=name, base_model_name_or_path=str(base_model))
        records = self.metrics.read()
        losses = [r["loss"] for r in records if "loss" in r]
        summary = {"output_dir": str(self.dir), "adapter": str(adapter), **summary,
                   "final_loss": losses[-1] if losses else None,
                   "seconds": round(time.perf_counter() - self.started, 1),
                   "peak_memory_bytes": max((r.get("peak_memory_bytes", 0) for r in records), default=0)}
        plot_loss_curve(records, self.dir / "loss_curve.png")
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        table = Table(title=f"run finished: {self.dir}")
        table.add_column("")
        table.add_column("value")
        for k, v in summary.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        self.console.print(table)
        return summary


def plot_loss_curve(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
