"""What every training loop shares: seeding, optimizer, schedule, losses, checkpoints, metrics.

SFT, reward, DPO and PPO each keep their own loop (`qtune/train/<algo>.py`); what runs around those loops
(setup, restore, the stop and checkpoint protocol) is `qtune/train/run.py`, built on this module.
Checkpoints hold no pickles: tensors go to safetensors, everything else to JSON, and a checkpoint
directory is written under a temporary name and renamed into place only once complete, so killing the
process mid-write leaves the previous checkpoint intact.
"""

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qtune import peft
from qtune.kernels.logprobs import cross_entropy_sum
from qtune.lora.adapters import lora_b_parameters
from qtune.peft.placement import place_in_batch
from qtune.weights.integrity import fault_point, remove_dead_leftovers, write_manifest
from qtune.weights.nf4 import import_bitsandbytes

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
SCHEDULES = ("cosine", "linear", "constant")
COMPLETE_MARKER = "COMPLETE"
ADAPTER = "default"  # the adapter SFT, reward and DPO train (PPO names its two roles)


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, unusable checkpoint); the message says what to do."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), fast=(),
                    fast_lr_ratio: float = 1.0):
    """AdamW, or bitsandbytes' 8-bit / paged AdamW (paged state moves to host memory under GPU memory pressure).

    LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the tensors of `params` that are also in `fast` (LoRA's B
    matrices) form a second parameter group whose learning rate is `fast_lr_ratio` times `lr`; the schedule
    scales both groups alike and weight decay is the same in both. With a ratio of 1 there is one group, as before.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameters: add a LoRA adapter (lora.target_modules) before training")
    fast_ids = {id(p) for p in fast} if fast_lr_ratio != 1.0 else set()
    if fast_ids:
        params = [{"params": [p for p in params if id(p) not in fast_ids]},
                  {"params": [p for p in params if id(p) in fast_ids], "lr": lr * fast_lr_ratio}]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    bnb = import_bitsandbytes()
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}.get(name)
    if cls is None:
        raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    return cls(params, lr=lr, weight_decay=weight_decay, betas=betas)


def adapter_optimizer(recipe, model, name: str, params):
    """The recipe's optimizer over adapter `name`'s `params`, B of its LoRA layers at `lora.b_lr_ratio` times
    the learning rate (LoRA+)."""
    t, lora = recipe.train, getattr(recipe, "lora", None)
    return build_optimizer(params, t.optimizer, t.lr, t.weight_decay, fast=lora_b_parameters(model, name),
                           fast_lr_ratio=lora.b_lr_ratio if lora is not None else 1.0)


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup, then cosine / linear decay or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def build_scheduler(optimizer, schedule: str, warmup_steps: int, max_steps: int):
    """A LambdaLR applying `lr_factor`; its state (the step count) is saved with every checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule, warmup_steps, max_steps))


def shifted_targets(labels: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Position t predicts token t+1: targets (B, T) = labels shifted left, -100 at the last position.

    With packed rows (`segments` = the attention mask's segment ids) the last token of one example must not
    be trained to predict the first token of the next, so targets that cross a segment boundary are masked.
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    if segments is not None:
        crosses = torch.cat([segments[:, 1:] != segments[:, :-1], torch.ones_like(segments[:, :1], dtype=torch.bool)], 1)
        targets = targets.masked_fill(crosses, -100)
    return targets


def attach_adapter(model, recipe, seed: int) -> None:
    """A fresh adapter `ADAPTER`, the only trainable parameters, as the recipe's `[peft]` (and `[lora]`)
    sections say."""
    peft.attach(model, recipe, ADAPTER, seed)


def set_long_context(model, offload_checkpoints: bool, tiled_mlp: str) -> None:
    """The recipe's long-context switches on a model: train.offload_checkpoints (with gradient checkpointing, the
    checkpoints wait in host memory) and train.tiled_mlp ("auto" | "on" | "off", on every feed-forward block)."""
    model.offload_checkpoints = offload_checkpoints
    for module in model.modules():
        if hasattr(module, "tiling"):
            module.tiling = tiled_mlp


def lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's trained tokens, and their count.

    Goes through the fused log-prob op (with the model's kernel choice, `model.kernels`): the [tokens, vocab]
    fp32 logits are never materialised. Dividing the sum by the token count of the whole accumulated step
    (not of each micro-batch) makes accumulation over micro-batches equal to one large batch.
    """
    batch = place_in_batch(model, batch)  # P-tuning's virtual tokens placed inside the example, if any
    hidden = model.hidden_states(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    targets = shifted_targets(batch["labels"], batch.get("attention_mask"))
    keep = targets != -100  # only positions that carry a loss enter the vocabulary projection
    loss_sum, count = cross_entropy_sum(hidden[keep], model.output_weight(), targets[keep], kernels=model.kernels,
                                        softcap=model.logit_softcap)
    return loss_sum, int(count)


def count_targets(batch: dict) -> int:
    """Trained tokens of a batch: the positions whose next token carries a loss."""
    return int((shifted_targets(batch["labels"], batch.get("attention_mask")) != -100).sum())


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a batch, for tokens/s."""
    mask = batch.get("attention_mask")
    return int((mask != 0).sum()) if mask is not None else batch["input_ids"].numel()


def autocast(device, model_dtype: torch.dtype):
    """bf16 / fp16 autocast for the forward pass on CUDA when the model computes in that dtype; off on CPU.

    The fp32 adapter weights then multiply in the compute dtype while their gradients and the optimizer
    state stay fp32 (mixed precision). CPU runs stay fp32 throughout: CPU half-precision matmuls are slow.
    """
    if torch.device(device).type == "cuda" and model_dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=model_dtype)
    return contextlib.nullcontext()


class GracefulStop:
    """Turns the first Ctrl-C (SIGINT) into a request to stop after the current step; a second one aborts.

    Stopping between steps means a checkpoint can always be written with a consistent model, optimizer,
    scheduler, RNG and data position. Use as a context manager around the training loop and check
    `requested` after each step. Outside the main thread signals cannot be caught, so it does nothing there.
    """

    def __init__(self, console=None):
        self.requested = False
        self.console = console
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.console is not None:
            self.console.print("[yellow]Ctrl-C: finishing this step, then saving a checkpoint "
                               "(press Ctrl-C again to quit without saving)[/yellow]")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def peak_memory_bytes(device) -> int:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- checkpoints -----------------------------------------------------------------------------------

def _flatten_state(obj, prefix: str, tensors: dict):
    """Split a nested state (dicts / lists / tensors / scalars) into a tensor dict and a JSON skeleton."""
    if torch.is_tensor(obj):
        # A copy: optimizer states may share one tensor (bitsandbytes' 8-bit maps), which safetensors refuses.
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def _unflatten_state(skeleton, tensors: dict):
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {(k["int"] if isinstance(k, dict) else k): _unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, dict) and "__list__" in skeleton:
        items = [_unflatten_state(v, tensors) for v in skeleton["__list__"]]
        return tuple(items) if skeleton.get("tuple") else items
    return skeleton


def save_state(path: Path, name: str, state) -> None:
    """Write a nested state as `name.safetensors` + `name.json` (no pickle)."""
    tensors: dict = {}
    skeleton = _flatten_state(state, name, tensors)
    save_file(tensors, str(path / f"{name}.safetensors"))
    (path / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(path: Path, name: str):
    file = path / f"{name}.safetensors"
    try:
        tensors = load_file(str(file))
    except SafetensorError as e:
        raise TrainingError(f"{file}: not a readable safetensors file ({e}); the checkpoint is damaged: delete "
                            f"{path} to resume from the one before it") from None
    return _unflatten_state(json.loads((path / f"{name}.json").read_text()), tensors)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _jsonable(random.getstate()),
             "numpy": _jsonable(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


class Checkpointer:
    """`output.dir/checkpoints/step-000050/` directories, each complete or absent.

    A checkpoint is written to `.step-000050.tmp-PID`, listed in a manifest (`qtune-manifest.json`: each
    file's SHA-256, checked on --resume), marked complete, then renamed; loading takes the newest directory
    whose marker exists. `keep` bounds how many are kept (oldest deleted after a save). A write that fails
    (a full disk) removes its temporary directory and is a TrainingError; the checkpoints before it stay.
    """

    def __init__(self, output_dir: Path, keep: int = 2):
        self.dir = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(self, step: int, write_fn) -> Path:
        """`write_fn(tmp_dir)` writes the payload; the directory becomes visible only when it returned.

        A complete checkpoint of the same step is kept as it is: a run's state at a given step is always
        the same, and deleting it first would leave a moment with no checkpoint of that step at all.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:06d}"
        if (final / COMPLETE_MARKER).exists():
            return final
        self.remove_leftovers()
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            fault_point("checkpoint-begin")
            write_fn(tmp)
            fault_point("checkpoint-payload")
            (tmp / COMPLETE_MARKER).write_text(str(step))
            write_manifest(tmp)
            _fsync_dir(tmp)
            fault_point("checkpoint-complete")
            if final.exists():  # an incomplete directory of this step (no marker) is never loaded
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no partial files
            cause = e if isinstance(e, (OSError, SafetensorError)) else e.__cause__
            if isinstance(cause, (OSError, SafetensorError)):
                raise cause from None  # the run names the checkpoint and the way on (Run.writing)
            raise
        fault_point("checkpoint-renamed")
        self._prune()
        return final

    def remove_leftovers(self) -> list[Path]:
        """Delete temporary checkpoint directories of processes that were killed while writing them."""
        removed = remove_dead_leftovers(self.dir)
        for stale in self.dir.glob(".step-*.tmp"):  # named without a PID by earlier qtune versions
            shutil.rmtree(stale)
            removed.append(stale)
        return removed

    def latest(self) -> Path | None:
        if not self.dir.exists():
            return None
        done = [p for p in self.dir.glob("step-*") if (p / COMPLETE_MARKER).exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None

    def _prune(self) -> None:
        done = sorted((p for p in self.dir.glob("step-*") if (p / COMPLETE_MARKER).exists()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[: max(0, len(done) - self.keep)]:
            # Renamed first: a process killed while deleting leaves a leftover, never a half-deleted step-N.
            doomed = old.with_name(f".{old.name}.del-{os.getpid()}")
            os.replace(old, doomed)
            fault_point("checkpoint-prune")
            shutil.rmtree(doomed)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step, appended and flushed as written.

    A new run (`resume_step=None`) starts the file afresh; a resumed run keeps the records up to its
    checkpoint's step (rewritten atomically) and appends from there, so the file reads like one run.
    Attached sinks (`qtune.train.log_sinks`: TensorBoard, W&B) receive every record too.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.sinks: list = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            # a killed run's temporary file is removed at the next start
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self, summary: dict | None = None) -> None:
        """Hand the sinks the run's summary (held-out before / after ...) and close them; metrics.jsonl needs nothing."""
        for sink in self.sinks:
            sink.close(summary or {})
        self.sinks = []

    def read(self) -> list[dict]:
        """Every record; a last line cut short by a killed process is ignored."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def use_idle_cpu_cores(device) -> int | None:
    """On CPU, run torch with one thread per core that other processes leave idle; returns the count.

    OpenMP threads wait for each other at every operation, so a thread that shares its core with another
    busy process stalls all of them: with two threads on two cores that are already loaded, a small model
    trains many times slower than with one. Idle cores = cores - the 1-minute load average, at least one.
    An explicit OMP_NUM_THREADS is respected (returns None), and so is any other device.
    """
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(cores, cores - round(os.getloadavg()[0])))
    torch.set_num_threads(threads)
    return threads


def training_device() -> str:
    """CUDA when available, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_device(batch: dict, device) -> dict:
    """Move every tensor of a batch, and of the sub-batches it holds (KTO's), to `device`."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True) for k, v in batch.items()}


def clip_gradients(params, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0 = no clipping); returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def grad_scaler(device, model_dtype: torch.dtype) -> torch.amp.GradScaler:
    """Dynamic loss scaling for a float16 model on CUDA (pre-Ampere cards, see weights.checkpoint.default_dtype):
    fp16 activation gradients of a loss averaged over thousands of tokens fall below its smallest normal
    (6e-5). Elsewhere a disabled scaler, whose calls do nothing."""
    enabled = torch.device(device).type == "cuda" and model_dtype == torch.float16
    return torch.amp.GradScaler("cuda", enabled=enabled)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    """loss.backward(), multiplied by the scaler's current scale when one is enabled."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def optimizer_step(params, optimizer, scheduler, max_grad_norm: float, loss: float,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[float, float]:
    """Clip the accumulated gradients, step the optimizer and schedule unless the loss or the norm is not
    finite (the run then stops without applying it), and clear the gradients; returns (grad norm, lr).

    With an enabled fp16 `scaler` the gradients are unscaled first, and an overflow (inf / nan gradients at
    the current scale) is fp16's normal course rather than a failure: the scaler skips the step and halves
    its scale, and the returned norm is 0.0 (nothing was applied)."""
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(params, max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if scaling and math.isfinite(loss):
        scaler.step(optimizer)  # skipped when the unscaled gradients hold inf / nan
        scaler.update()
        if not math.isfinite(grad_norm):
            grad_norm = 0.0
        else:
            scheduler.step()
    elif math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
