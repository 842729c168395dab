"""What the tests of the virtual-token methods (prompt tuning, P-tuning, prefix tuning) share: attaching one to
a tiny qtune model as a recipe would, the same tiny model in transformers, and greedy decoding references."""

from types import SimpleNamespace

import torch

from qtune.peft import attach
from qtune.recipe.peft import PeftSection
from qtune.weights.checkpoint import load_model

N_VIRTUAL = 3


def recipe_for(method: str, model_dir, packing: bool = False, **section) -> SimpleNamespace:
    """What `attach` reads of a recipe: [peft] with `method`'s sub-table (num_virtual_tokens = N_VIRTUAL and
    `section`'s fields), [model] path, [data] packing."""
    peft = PeftSection(method=method)
    sub = getattr(peft, method)
    sub.num_virtual_tokens = N_VIRTUAL
    if hasattr(sub, "encoder_hidden_size"):
        sub.encoder_hidden_size = 16
    for key, value in section.items():
        setattr(sub, key, value)
    return SimpleNamespace(peft=peft, model=SimpleNamespace(path=str(model_dir)), data=SimpleNamespace(packing=packing))


def qtune_with(method: str, model_dir, seed: int = 1, quantize: str = "none", packing: bool = False, **section):
    """The tiny model in qtune with a fresh `method` adapter "default" (active, the only trainable tensors)."""
    model = load_model(model_dir, quantize=quantize)
    attach(model, recipe_for(method, model_dir, packing, **section), "default", seed)
    return model


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def token_ids(seed=0, shape=(2, 11)):
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def weighted_sum(logits: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """A scalar loss touching every real position's logits (B, T, V), the same for any implementation."""
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits * w).sum()


def greedy_full_forward(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no KV cache): the reference for cached decoding."""
    ids, device = list(prompt), next(model.parameters()).device
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([ids], device=device))
            logits = out.logits if hasattr(out, "logits") else out
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]
