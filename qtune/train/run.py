"""The one driver of every training loop: a run's output directory, setup, restore (refusing a changed recipe),
the stop and checkpoint protocol, the non-finite and collapse checks, progress, metrics and the summary.

    output.dir/
      recipe.toml          the resolved recipe (overrides applied)
      metrics.jsonl        one JSON object per logged step (`step`, `loss`, `lr`, ...)
      resumes.jsonl        one JSON object per --resume that changed the recipe (`step`, `changed`: key -> [old, new])
      checkpoints/step-N/  adapter (PEFT) + trainable tensors + optimizer + scheduler + RNG + data position
      adapter/             the final adapter, PEFT format
                           (both with qtune-manifest.json, each file's SHA-256, checked when read)
      held_out_before.json the held-out evaluation before training
      loss_curve.png, summary.json

Each loop (`sft.py`, `reward.py`, `dpo.py`, `ppo.py`) reads like nanoGPT's, around these calls:

    run, model, tokenizer, device = start_run(recipe, resume, console)
    ... adapters, data, params ...
    optimizer, scheduler, start_step, position = run.begin(recipe, model, ADAPTER, params, steps)
    with run.training(steps, start_step) as stop:
        for step in range(start_step + 1, steps + 1):
            out = train_step(...)
            run.check_finite(step, loss=out["loss"], grad_norm=out["grad_norm"])
            run.check_collapse(step, out["grad_norm"], ...)
            ... record, held-out evaluation ...
            run.step_done(record, log=...)
            run.step_end(step, position, stop)   # Ctrl-C: save this step and stop; else save every save_every
    run.save_checkpoint(steps, position)
    return run.finish(summary)
"""

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from safetensors import SafetensorError

from qtune.data.batching import DataPosition
from qtune.peft import save_adapter, step_hook
from qtune.recipe.schema import recipe_to_toml
from qtune.tokenizer import load_tokenizer
from qtune.train import common
from qtune.train.lock import RunLock
from qtune.train.log_sinks import check_sinks, open_sinks
from qtune.train.preflight import check_positions, resume_changes
from qtune.weights.checkpoint import load_model, resolve
from qtune.weights.integrity import fault_point, remove_dead_leftovers, verify_files

BEFORE_FILE = "held_out_before.json"
RESUMES_FILE = "resumes.jsonl"
SHOWN_NAMES = {"grad_norm": "gradient norm"}  # how the non-finite message names a statistic
def load_base_model(model_section, device):
    """The frozen (4-bit by default) base model and its tokenizer, as a recipe's [model] section says."""
    model_dir = resolve(model_section.path)
    model = load_model(model_dir, quantize=model_section.quantize, dtype=model_section.dtype,
                       kernels=model_section.kernels, double_quant=model_section.double_quant, device=device)
    model.gradient_checkpointing = model_section.gradient_checkpointing
    return model, load_tokenizer(model_dir)


def start_run(recipe, resume: bool, console: Console | None):
    """Open the run's output directory, seed everything, load the base model: (run, model, tokenizer, device)."""
    device = common.training_device()
    check_sinks(recipe.train.log)  # a missing TensorBoard / W&B package fails before the run directory is touched
    run = Run(Path(recipe.output.dir), console, resume)
    run.base_model = recipe.model.path
    if resume:
        run.resume_changes = resume_changes(run.dir, recipe)
    run.collapse = CollapseCheck(recipe.train.collapse_steps, recipe.train.collapse_tolerance)
    common.seed_everything(recipe.train.seed)
    model, tokenizer = load_base_model(recipe.model, device)
    common.set_long_context(model, recipe.train.offload_checkpoints, recipe.train.tiled_mlp)
    check_positions(recipe, model.config)
    return run, model, tokenizer, device


class CollapseCheck:
    """A run that has died without a NaN: the gradient norm exactly 0, or the loss pinned at ln(vocab_size) (the
    loss of a uniform guess over the vocabulary, for language-model losses), for `steps` steps in a row."""

    def __init__(self, steps: int, tolerance: float):
        self.steps, self.tolerance = steps, tolerance
        self.zero_grad = self.pinned = 0  # consecutive steps so far

    def update(self, grad_norm: float, loss: float | None = None, uniform_loss: float | None = None) -> str | None:
        """Count this step; the reason when the run has collapsed, else None."""
        self.zero_grad = self.zero_grad + 1 if grad_norm == 0 else 0
        near = uniform_loss is not None and abs(loss - uniform_loss) <= self.tolerance
        self.pinned = self.pinned + 1 if near else 0
        if not self.steps:
            return None
        if self.zero_grad >= self.steps:
            return f"the gradient norm has been exactly 0 for {self.zero_grad} steps"
        if self.pinned >= self.steps:
            return (f"the loss has stayed within {self.tolerance} of ln(vocab_size) = {uniform_loss:.4f} (a uniform "
                    f"guess) for {self.pinned} steps")
        return None


def total_steps(recipe, batches_per_epoch: int) -> int:
    """train.max_steps, or the optimizer steps of train.epochs passes over the data when it is 0."""
    t = recipe.train
    return t.max_steps if t.max_steps > 0 else max(1, t.epochs * math.ceil(batches_per_epoch / t.grad_accum_steps))


def step_record(step: int, out: dict, started: float, position: DataPosition, device) -> dict:
    """A step's metrics.jsonl record: its statistics (`out`, whose real_tokens become tokens/s), epoch, peak memory."""
    real_tokens = out.pop("real_tokens")
    return {"step": step, **out, "tokens_per_s": real_tokens / (time.perf_counter() - started),
            "epoch": position.epoch, "peak_memory_bytes": common.peak_memory_bytes(device)}


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Run:
    """One run: its output directory (refuses to overwrite another run), restore, the stop and checkpoint
    protocol, progress, metrics and the summary.

    Nothing in an existing run directory changes before `restore` succeeds, so a resumed run that fails
    on bad input (a missing model, broken data) leaves its checkpoints and metrics as they were. From
    `begin` on, the run knows what its checkpoints hold: the model's trainable tensors under the adapter
    `name`, the optimizer and the scheduler.
    """

    def __init__(self, out_dir: Path, console: Console | None, resume: bool):
        self.dir = Path(out_dir)
        self.console = console or Console(stderr=True)
        self.checkpointer = common.Checkpointer(self.dir)
        if not resume and (self.checkpointer.latest() or (self.dir / "adapter").exists()):
            raise common.TrainingError(
                f"{self.dir} already holds a run (checkpoints/ or adapter/); pass --resume to continue it, "
                "or set output.dir=NEW_DIR to start a new one (nothing there is overwritten)")
        if resume and self.checkpointer.latest() is None:
            raise common.TrainingError(f"--resume: no complete checkpoint under {self.checkpointer.dir}; "
                                       "run without --resume to start")
        # Directories this run creates are removed again if it fails before writing anything into them.
        created = [d for d in (self.dir, *self.dir.parents) if not d.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.dir, created)
        self.lock.acquire(self.console)  # before anything in the directory is written
        # What runs killed while writing left (no live run writes here: the lock is ours).
        removed = remove_dead_leftovers(self.dir) + self.checkpointer.remove_leftovers()
        if removed:
            names = ", ".join(p.name for p in removed)
            self.console.print(f"[yellow]note[/yellow] removed what a killed run left: {names}")
        if resume:  # checked now, before the base model loads, rather than when `restore` reads it
            ckpt = self.checkpointer.latest()
            verify_files(ckpt, common.TrainingError,
                         fix=f"delete {ckpt} to resume from the checkpoint before it (if one is left)")
        self.resume = resume
        self.restored: dict = {}  # trainer.json of the checkpoint the run resumed from
        # A resumed run opens its metrics in `restore`, keeping the records up to the checkpoint's step.
        self.metrics = None if resume else common.MetricsLog(self.dir / "metrics.jsonl")
        self.progress: Progress | None = None
        self.task = None
        self.started = time.perf_counter()
        self.base_model = ""
        self.model = self.name = self.optimizer = self.scheduler = self.hook = None
        self.save_every = 0
        self.resume_changes: dict[str, list] = {}  # keys a --resume changed (see preflight.RESUMABLE_KEYS)
        self.collapse = CollapseCheck(0, 0.0)

    # ---- setup -------------------------------------------------------------------------------------
    def write_recipe(self, text: str) -> None:
        """Write the resolved recipe as `recipe.toml` (atomically)."""
        self._write_atomically("recipe.toml", text)

    def _write_atomically(self, name: str, text: str) -> None:
        """`name` in the run directory is the old file or the new one, never half of one: the text goes to
        `.NAME.tmp-PID` (a leftover the next start removes if this process is killed) and is renamed over it."""
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        with self.writing(self.dir / name):
            try:
                tmp.write_text(text)
                os.replace(tmp, self.dir / name)
            except OSError:
                tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
                raise

    def show_data_stats(self, stats: dict) -> None:
        line = (f"data: {stats['train_examples']} train / {stats['val_examples']} held-out examples, "
                f"{stats['trained_tokens']} trained tokens")
        if stats.get("truncated"):
            line += f", {stats['truncated']} cut to data.max_seq_len"
        if stats.get("dropped"):
            line += f", {stats['dropped']} dropped (no response token left within data.max_seq_len)"
        self.console.print(line)

    def begin(self, recipe, model, name: str, params, steps: int):
        """The optimizer over `params` and the learning-rate schedule over `steps` optimizer steps, both restored
        from the newest checkpoint on --resume; then recipe.toml is written.

        Returns (optimizer, scheduler, the last step done, data position).
        """
        t = recipe.train
        optimizer = common.adapter_optimizer(recipe, model, name, params)
        scheduler = common.build_scheduler(optimizer, t.schedule, t.warmup_steps or round(t.warmup_ratio * steps), steps)
        self.model, self.name, self.optimizer, self.scheduler = model, name, optimizer, scheduler
        self.hook = step_hook(model, name, recipe, steps)  # e.g. AdaLoRA's rank budget; None for most methods
        if self.hook is not None:
            self.hook.register(optimizer)
        self.save_every = t.save_every
        start_step, position = self.restore() if self.resume else (0, DataPosition())
        if self.resume_changes:  # the record says from which step the run went on with which changes
            with (self.dir / RESUMES_FILE).open("a") as f:
                f.write(json.dumps({"step": start_step, "changed": self.resume_changes}) + "\n")
            self.console.print("resumed with " + ", ".join(f"{k} = {new!r} (was {old!r})"
                                                           for k, (old, new) in self.resume_changes.items()))
        self.metrics.sinks = open_sinks(t.log, self.dir, start_step if self.resume else None, dataclasses.asdict(recipe))
        self.write_recipe(recipe_to_toml(recipe))
        return optimizer, scheduler, start_step, position

    def restore(self) -> tuple[int, DataPosition]:
        """Load the newest complete checkpoint into the model's trainable tensors, the optimizer, the
        scheduler and the RNGs; returns (step, data position)."""
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            raise common.TrainingError(f"--resume: no complete checkpoint under {self.checkpointer.dir}")
        try:
            saved = common.load_state(ckpt, "trainable")
            optimizer_state = common.load_state(ckpt, "optimizer")
            rng = common.load_state(ckpt, "rng")
            hook_state = common.load_state(ckpt, "peft_hook") if self.hook is not None else None
            scheduler_state = json.loads((ckpt / "scheduler.json").read_text())
            trainer = json.loads((ckpt / "trainer.json").read_text())
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise common.TrainingError(f"{ckpt}: cannot read the checkpoint ({e}); delete that directory to "
                                       "resume from the one before it") from None
        params = _trainable(model)
        if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items() if n in saved):
            raise common.TrainingError(f"{ckpt}: its trainable tensors do not match this recipe's adapter "
                                       "(was lora.* changed since the checkpoint?)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        recipe_lrs = list(scheduler.base_lrs)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        # The recipe's learning rate wins over the saved one (e.g. lowered after a non-finite loss): the
        # schedule continues from the saved step with the recipe's peak, lr = peak * factor(step).
        scheduler.base_lrs = recipe_lrs
        for group, peak, factor in zip(optimizer.param_groups, recipe_lrs, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = peak, peak * factor(scheduler.last_epoch)
        common.set_rng_state(rng)
        if self.hook is not None:
            self.hook.load_state_dict(hook_state)
        self.restored = trainer
        self.metrics = common.MetricsLog(self.dir / "metrics.jsonl", resume_step=trainer["step"])
        self.console.print(f"resumed from {ckpt} (step {trainer['step']})")
        return trainer["step"], DataPosition.from_dict(trainer["position"])

    # ---- during training ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self, steps: int, done: int):
        """Around the loop: train mode, the progress bar, and Ctrl-C turned into a stop request (yielded)."""
        self.model.train()
        self.start_progress(steps, done)
        try:
            with common.GracefulStop(self.console) as stop:
                yield stop
        finally:
            self.stop_progress()

    def check_finite(self, step: int, **stats: float) -> None:
        """Stop the run at a step whose loss, gradient norm (or any other statistic given) is not finite.

        Nothing of that step is saved: SFT, reward and DPO skip its optimizer step, and PPO's updates end with
        the process, so --resume starts from the last good checkpoint.
        """
        if all(math.isfinite(v) for v in stats.values()):
            return
        shown = ", ".join(f"{SHOWN_NAMES.get(k, k)} {v}" for k, v in stats.items())
        raise common.TrainingError(
            f"{shown} at step {step}: the run stops and this step is not applied. The last good checkpoint is "
            f"{self.checkpointer.latest() or 'none (no checkpoint was saved yet)'}; lower train.lr or "
            "check the data, then continue with --resume")

    def check_collapse(self, step: int, grad_norm: float, loss: float | None = None,
                       uniform_loss: float | None = None) -> None:
        """Stop a run that has collapsed (see CollapseCheck and train.collapse_steps) before this step is saved,
        as check_finite does; `uniform_loss` = ln(vocab_size) for language-model losses."""
        if (reason := self.collapse.update(grad_norm, loss, uniform_loss)) is None:
            return
        raise common.TrainingError(
            f"{reason} (steps {step - self.collapse.steps + 1}-{step}): the run has collapsed and stops; this step is "
            f"not saved. The last checkpoint is {self.checkpointer.latest() or 'none (no checkpoint was saved yet)'} "
            "(one from before the collapse began is good); lower train.lr or check the data, then continue with "
            "--resume (train.collapse_steps = 0 turns this check off)")

    def step_end(self, step: int, position: DataPosition, stop: common.GracefulStop, **trainer) -> None:
        """After a completed step: on a Ctrl-C request save it and stop (KeyboardInterrupt), else save it every
        train.save_every steps. `trainer` adds entries to the checkpoint's trainer.json."""
        if stop.requested:
            self.save_checkpoint(step, position, **trainer)
            self.console.print(f"[yellow]stopped: saved step {step}; continue with --resume[/yellow]")
            raise KeyboardInterrupt
        if self.save_every and step % self.save_every == 0:
            self.save_checkpoint(step, position, **trainer)

    @contextlib.contextmanager
    def last_step(self, record: dict):
        """The last step's record waits for the held-out evaluation after training, made inside this block."""
        self.step_done(record, log=False)
        self.stop_progress()
        with self.console.status("held-out evaluation after training"):
            yield

    def start_progress(self, total: int, done: int) -> None:
        """A progress bar: step, loss, learning rate, tokens/s, peak memory, elapsed time and ETA."""
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  "
                       "peak {task.fields[mem]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-", lr="-", tps="-", mem="-")
        self.progress.start()

    def step_done(self, record: dict, log: bool) -> None:
        """Advance the progress bar with a step's record; append it to metrics.jsonl when `log`."""
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tps=f"{record['tokens_per_s']:.0f}",
                                 mem=f"{record['peak_memory_bytes'] / 2**30:.2f} GB")
        if log:
            self.log(record)
            if not self.console.is_terminal:  # a log file or CI: no live bar, so one line per logged step
                self.console.print(f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                                   f"{record['tokens_per_s']:.0f} tok/s" +
                                   (f", held-out loss {record['val_loss']:.4f}" if "val_loss" in record else ""))

    def save_before(self, result: dict) -> None:
        """Keep the held-out evaluation made before training (`held_out_before.json`), for the summary and resume."""
        self._write_atomically(BEFORE_FILE, json.dumps(result, indent=2))

    def load_before(self) -> dict:
        path = self.dir / BEFORE_FILE
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise common.TrainingError(f"{path}: unreadable ({e}); delete it to go on without the held-out "
                                       "result before training in the summary") from None

    def log(self, record: dict) -> None:
        """Append a record (e.g. an evaluation) to metrics.jsonl."""
        with self.writing(self.metrics.path):
            self.metrics.write(record)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    @contextlib.contextmanager
    def writing(self, target: Path):
        """A failed write of `target` (a full disk, a directory made read-only) as a TrainingError naming it."""
        try:
            yield
        except (OSError, SafetensorError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            latest = self.checkpointer.latest()
            then = f"continue with --resume (from {latest})" if latest else "run again (no checkpoint was saved yet)"
            raise common.TrainingError(f"{target}: cannot write it ({reason}); free space on that disk or make it "
                                       f"writable, then {then}") from None

    def save_checkpoint(self, step: int, position: DataPosition, **trainer) -> Path:
        """Write checkpoints/step-N atomically, with the RNG states of this moment; `trainer` adds entries
        (e.g. PPO's KL controller) to trainer.json."""
        def write(tmp: Path):
            save_adapter(self.model, tmp / "adapter", name=self.name, base_model_name_or_path=self.base_model)
            common.save_state(tmp, "trainable", {n: p.detach() for n, p in _trainable(self.model).items()})
            fault_point("checkpoint-state")
            common.save_state(tmp, "optimizer", self.optimizer.state_dict())
            common.save_state(tmp, "rng", common.rng_state())
            if self.hook is not None:
                common.save_state(tmp, "peft_hook", self.hook.state_dict())
            (tmp / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "position": position.to_dict(), **trainer}))

        with self.writing(self.checkpointer.dir / f"step-{step:06d}"):
            return self.checkpointer.save(step, write)

    # ---- the end ------------------------------------------------------------------------------------
    def show_comparison(self, name: str, before: float, after: float, samples: list[tuple[str, ...]] = ()) -> None:
        """A before / after table of the held-out metric, then a few examples (prompt, before, after, answer)."""
        table = Table(title=f"held-out {name}")
        for column in ("before training", "after training"):
            table.add_column(column, justify="right")
        table.add_row(f"{before:.4f}", f"[bold green]{after:.4f}" if after != before else f"{after:.4f}")
        self.console.print(table)
        if samples:
            examples = Table(title="held-out examples", show_lines=True)
            for column in ("instruction", "before", "after", "answer"):
                examples.add_column(column, overflow="fold")
            for row in samples:
                examples.add_row(*row)
            self.console.print(examples)

    def finish(self, summary: dict, extra_tensors: dict | None = None) -> dict:
        """Write the final adapter (with `extra_tensors`, e.g. a reward head), loss_curve.png and summary.json;
        print the summary table; return it."""
        with self.writing(self.dir / "adapter"):
            adapter = save_adapter(self.model, self.dir / "adapter", name=self.name,
                                   base_model_name_or_path=str(self.base_model), extra_tensors=extra_tensors)
        records = self.metrics.read()
        losses = [r["loss"] for r in records if "loss" in r]
        before = self.load_before().get("val_loss")
        summary = {"output_dir": str(self.dir), "adapter": str(adapter), **summary,
                   **(self.hook.summary() if self.hook is not None else {}),
                   "final_loss": losses[-1] if losses else None,
                   "seconds": round(time.perf_counter() - self.started, 1),
                   "peak_memory_bytes": max((r.get("peak_memory_bytes", 0) for r in records), default=0)}
        plot_loss_curve(([{"step": 0, "val_loss": before}] if before is not None else []) + records,
                        self.dir / "loss_curve.png")
        self._write_atomically("summary.json", json.dumps(summary, indent=2))
        self.metrics.close(summary)
        table = Table(title=f"run finished: {self.dir}")
        table.add_column("")
        table.add_column("value")
        for k, v in summary.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        self.console.print(table)
        self.lock.release()
        return summary


def plot_loss_curve(records: list[dict], path: Path) -> None:
    """Training loss per logged step and held-out loss per evaluation, as a PNG."""
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
