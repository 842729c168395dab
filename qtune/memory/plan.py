"""The longest sequence a card trains, planned before the run (`qtune estimate --max-context`).

The device peak of a step is the estimator's peak of live tensors plus what it does not see:

    device peak = resident + (estimate(step) - resident) x (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_BYTES

(the CUDA context and cuBLAS workspace that exist before the first tensor; on the step's activations, the
caching allocator's rounding of every block to 512 bytes and of large ones to 2 MB segments, and the
fragmentation between them; the resident weights and adapter state are allocated once, in large blocks).

The planner climbs a ladder of switches, each rung adding one to those below it: the recipe as it is, then
gradient checkpointing, then `train.tiled_mlp=on` (the MLP's wide activations for one chunk of tokens), then
`train.offload_checkpoints=true` (the layer inputs in pinned host memory). Every rung gets the longest
micro-batch length (bisection over the estimator, at most the model's positions). A paged optimizer's state
is counted on the card (the driver may page it out under pressure, which the plan does not count on).
"""

from dataclasses import dataclass, replace

from qtune.memory.estimate import StepShape, estimate, host_bytes

CUDA_CONTEXT_BYTES = 640 * 2**20  # assumed: the context and cuBLAS workspace of torch on a recent card
ALLOCATOR_OVERHEAD = 0.05  # assumed: the caching allocator's rounding and fragmentation, on top of live bytes
ASSUMPTIONS = (f"CUDA context {CUDA_CONTEXT_BYTES / 2**30:.2f} GB, allocator rounding and fragmentation "
               f"+{ALLOCATOR_OVERHEAD:.0%} of the activations' live bytes, bf16 compute, NF4 weights, batch of one "
               "sequence without padding, the plain-torch activations (the fused Triton path saves less)")


@dataclass
class Rung:
    """One step of the ladder: the switch it adds, every switch's state, the longest length that fits and the
    device and host bytes at that length."""

    added: str
    switches: dict
    max_context: int
    peak_bytes: int
    host_bytes: int


def on_card(live_peak: int, resident: int) -> int:
    """Device bytes of a step whose live tensors peak at `live_peak`, `resident` of them allocated once (weights,
    adapters, optimizer state: large blocks, no fragmentation to speak of): allocator overhead and context added."""
    return resident + int((live_peak - resident) * (1 + ALLOCATOR_OVERHEAD)) + CUDA_CONTEXT_BYTES


def device_peak(s: StepShape) -> int:
    """Predicted device bytes of one step of `s` on CUDA: the estimate, allocator overhead and the context."""
    from qtune.memory.estimate import resident_parts

    return on_card(estimate(s).peak_bytes, sum(resident_parts(s).values()))


def longest_fitting(s: StepShape, budget: int, limit: int) -> int:
    """The largest seq_len <= limit whose device peak is within budget (0 when not even one token fits)."""
    fits = lambda n: device_peak(replace(s, seq_len=n)) <= budget
    if not fits(1):
        return 0
    low, high = 1, limit
    while low < high:  # the peak grows with the length: the last fitting length by bisection
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def ladder(s: StepShape, budget: int, limit: int) -> list[Rung]:
    """Every rung of switches (see the module docstring) with its longest fitting length."""
    switches = {"model.gradient_checkpointing": s.gradient_checkpointing,
                "train.tiled_mlp": s.tiled_mlp,
                "train.offload_checkpoints": s.offload_checkpoints}
    steps = [("the recipe as it is", {}, {})]
    if not s.gradient_checkpointing:
        steps.append(("model.gradient_checkpointing=true", {"gradient_checkpointing": True},
                      {"model.gradient_checkpointing": True}))
    if s.tiled_mlp != "on":  # "auto" leaves up to AUTO_MIN_TOKENS untiled
        steps.append(("train.tiled_mlp=on", {"tiled_mlp": "on"}, {"train.tiled_mlp": "on"}))
    if not s.offload_checkpoints:
        steps.append(("train.offload_checkpoints=true", {"offload_checkpoints": True},
                      {"train.offload_checkpoints": True}))
    rungs, shape = [], s
    for added, change, state in steps:
        shape, switches = replace(shape, **change), {**switches, **state}
        n = longest_fitting(shape, budget, limit)
        at = replace(shape, seq_len=max(n, 1))
        rungs.append(Rung(added, dict(switches), n, device_peak(at), host_bytes(at)))
    return rungs


def best_rung(rungs: list[Rung]) -> Rung:
    """The first rung reaching the longest length (no switch bought that adds nothing)."""
    longest = max(r.max_context for r in rungs)
    return next(r for r in rungs if r.max_context == longest)


def advice(s: StepShape, budget: int, limit: int) -> str:
    """What fits instead of `s` in `budget`: the longest length as the recipe is and with each added switch."""
    from qtune.memory.tracer import fmt_bytes

    rungs = ladder(s, budget, limit)
    parts = [f"{r.added}: data.max_seq_len <= {r.max_context}" for r in rungs]
    return (f"the planner predicts {fmt_bytes(device_peak(s))} for {s.micro_batch_size} x {s.seq_len} tokens on a "
            f"{fmt_bytes(budget)} card. Longest that fits, " + "; then with ".join(parts))


BUDGET_VARIABLE = "QTUNE_GPU_MEMORY"  # the card's memory to plan for, e.g. 24GB (default: the CUDA device's own)


def card_budget() -> int | None:
    """The memory a run plans for: $QTUNE_GPU_MEMORY, else the CUDA device's total memory, else None (a CPU)."""
    import os

    import torch

    from qtune.memory.estimate import parse_size

    if os.environ.get(BUDGET_VARIABLE):
        try:
            return parse_size(os.environ[BUDGET_VARIABLE])
        except ValueError as e:
            raise ValueError(f"{BUDGET_VARIABLE}: {e}") from None
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def recipe_step(recipe) -> StepShape | None:
    """The CUDA step of a training recipe, or None where its shape is unknown (the model load reports that)."""
    from qtune.memory.estimate import step_shape_from_recipe

    if not all(hasattr(recipe, name) for name in ("model", "lora", "data", "train")) \
            or not hasattr(recipe.data, "max_seq_len"):
        return None
    try:
        return step_shape_from_recipe(recipe, "cuda")
    except ValueError:
        return None


def check_fits(recipe) -> None:
    """Before the model loads: refuse a data.max_seq_len the planner says does not fit the card, naming the
    longest that fits and the switches that would help (TrainingError). Nothing is checked on a CPU."""
    from qtune.train.common import TrainingError
    from qtune.config import position_limit

    budget, s = card_budget(), recipe_step(recipe)
    if budget is None or s is None:
        return
    try:
        if device_peak(s) <= budget:
            return
    except ValueError:  # a step the estimator does not cover (e.g. adapter targets given as a regular expression)
        return
    raise TrainingError(f"data.max_seq_len = {s.seq_len} does not fit: {advice(s, budget, position_limit(s.cfg))}. "
                        "Lower data.max_seq_len or turn those switches on (see qtune estimate RECIPE --gpu-memory "
                        "SIZE --max-context)")


def out_of_memory_message(recipe, error: BaseException) -> str:
    """The advice for a run that ran out of memory: what fits, and the last good checkpoint (kept)."""
    from pathlib import Path

    from qtune.train.common import Checkpointer
    from qtune.config import position_limit

    budget, s = card_budget(), recipe_step(recipe)
    try:
        plan = advice(s, budget, position_limit(s.cfg)) if budget is not None and s is not None else None
    except ValueError:  # as in check_fits
        plan = None
    latest = Checkpointer(Path(recipe.output.dir)).latest() if hasattr(recipe, "output") else None
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"out of memory during the run ({first_line}); {plan or 'no plan for this run'}. The last good "
            f"checkpoint is {latest or 'none (no checkpoint was saved yet)'}: change the recipe and continue with "
            "--resume, or start a new output.dir")
