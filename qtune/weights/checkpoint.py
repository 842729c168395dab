"""Load and save Hugging Face model directories (config.json + single or sharded safetensors).

Quantize-on-load: every linear weight inside the decoder layers becomes NF4 the moment it is read, so
loading a 7B model never holds the 16-bit model in memory (peak = final size + about one tensor).
Pre-quantized bitsandbytes 4-bit checkpoints (what `qtune quantize` and transformers write) load
directly. Only safetensors are read: nothing is ever unpickled.
"""

import glob
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qtune.config import ModelConfig
from qtune.model import CausalLM
from qtune.weights.hub import resolve_model_path
from qtune.weights.integrity import fault_point, remove_dead_leftovers
from qtune.weights.nf4 import FLOAT_DTYPES, NF4_CODE, VALID_BLOCKSIZES, NF4Weight, quantize_nf4
from qtune.weights.nf4_linear import NF4Linear

QUANTIZE_CHOICES = ("nf4", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NF4_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "added_tokens.json")


class CheckpointError(ValueError):
    """A model directory qtune cannot load; the message names the file and what is wrong."""


def cuda_compute_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bfloat16 on compute capability 8.0 and above (Ampere on), float16 below (T4, RTX 20xx, V100).

    Below 8.0 there are no bf16 tensor cores: Triton emits no tensor-core code for bf16 there and torch's bf16
    matmuls are emulated. fp16's narrow range is why training in it uses a gradient scaler
    (qtune.train.common.grad_scaler).
    """
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The CUDA device's `cuda_compute_dtype`, float32 on CPU (CPU bf16 matmul is slow)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return cuda_compute_dtype(torch.cuda.get_device_capability(device))


def parse_dtype(name: str | torch.dtype | None, device="cpu") -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)} (or 'auto')")
    return DTYPES[name]


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, checking that every shard the index names exists."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing from {model_dir}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(f"{model_dir}: only pickle checkpoints (*.bin/*.pt) found; qtune loads safetensors only "
                              "(convert them once with a trusted tool)")
    raise CheckpointError(f"{model_dir}: no *.safetensors weights found")


def is_quantizable(name: str) -> bool:
    """Linear weights inside the decoder layers (experts included, Mixtral's w1/w2/w3 too) are quantized;
    embeddings, norms, a router and lm_head stay 16-bit."""
    return name.startswith("model.layers.") and (name.endswith("_proj.weight") or ".experts." in name)


def resolve(path: str | Path) -> Path:
    """A model directory, or an alias such as `smollm2-135m` pulled into the local cache."""
    if Path(path).is_dir():
        return Path(path)
    return Path(resolve_model_path(str(path)))


def load_model(path, quantize: str = "nf4", dtype=None, kernels: str = "auto", double_quant: bool = True,
               device="cpu") -> CausalLM:
    """Load a Hugging Face model directory (or alias) into a `CausalLM`, frozen, in eval mode.

    quantize="nf4": linear layers become NF4 as they are read (bitsandbytes format, double quantization
    by default); "none": weights kept in `dtype`. `dtype` is the compute dtype of everything else
    (default bfloat16 on CUDA, float32 on CPU).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    model_dir = resolve(path)
    cfg = ModelConfig.from_json(model_dir)
    dtype = parse_dtype(dtype, device)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    for file in shard_files(model_dir):
        _load_file(model, file, expected, loaded, quantize, dtype, double_quant, device)
    missing = [k for k in expected if k not in loaded and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) the config requires, "
                              f"e.g. {missing[:3]} (does config.json match these weights?)")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.set_rope_tables(device)
    model.requires_grad_(False)
    model.set_kernels(kernels)
    model.checkpoint_dir = model_dir  # where the 16-bit weights are, for what needs them again (PiSSA / LoftQ)
    return model.eval()


def read_linear_weights(model_dir: Path, modules) -> dict[str, torch.Tensor]:
    """The stored 16-bit weights of linear layers `modules` (module names), as the checkpoint holds them;
    refuses a pre-quantized checkpoint, which no longer has them."""
    wanted = {f"{m}.weight": m for m in modules}
    found = {}
    for file in shard_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for key in keys & wanted.keys():
                if any(k.startswith(key + ".") for k in keys):
                    raise CheckpointError(f"{file}: {key} is stored in 4 bits; this needs the 16-bit checkpoint "
                                          "the 4-bit one was quantized from (model.path)")
                found[wanted[key]] = f.get_tensor(key)
    missing = [m for m in wanted.values() if m not in found]
    if missing:
        raise CheckpointError(f"{model_dir}: no stored weight for {missing[:3]}")
    return found


def _load_file(model, file, expected, loaded, quantize, dtype, double_quant, device):
    try:
        _read_file(model, file, expected, loaded, quantize, dtype, double_quant, device)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it is truncated or corrupt: "
                              "copy or download it again") from None


# Gemma 3 image-text checkpoints keep the language model under these prefixes (transformers writes the
# first pair, its in-memory module names are the second); the vision tower and projector are not loaded.
MULTIMODAL_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                       ("model.language_model.", "model."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _model_key(key: str, multimodal: bool) -> str | None:
    """The name of checkpoint tensor `key` in CausalLM, or None for a tensor that is not loaded."""
    if not multimodal:
        return key
    for theirs, ours in MULTIMODAL_PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None if key.startswith(VISION_PREFIXES) else key


def _read_file(model, file, expected, loaded, quantize, dtype, double_quant, device):
    multimodal = model.config.multimodal_text
    with safe_open(str(file), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        prequantized = {k[: -len(NF4_STATE_SUFFIX)] for k in keys if k.endswith(NF4_STATE_SUFFIX)}
        for file_key in keys:
            key = _model_key(file_key, multimodal)
            if key is None or (key.startswith("model.layers.") and ".weight." in key):
                continue  # a vision tensor, or quantization statistics consumed with their weight below
            if key not in expected:
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {file_key!r}; is config.json (model_type, layer "
                                      "count, tie_word_embeddings) right for this checkpoint?")
            prefix = key[: -len(".weight")]
            if file_key[: -len(".weight")] in prequantized:
                state = {k: f.get_tensor(k) for k in keys if k == file_key or k.startswith(file_key + ".")}
                q = nf4_from_hf_state(file_key[: -len(".weight")], state, source=str(file)).to(device)
                _swap_in(model, prefix, q)
            elif is_quantizable(key) and quantize == "nf4":
                w = f.get_tensor(file_key)
                _check_shape(file, file_key, tuple(w.shape), tuple(expected[key].shape))
                q = quantize_nf4(w.to(device=device, dtype=dtype), double_quant=double_quant)
                del w
                release_freed_memory()
                _swap_in(model, prefix, q)
            else:
                t = f.get_tensor(file_key)
                _check_shape(file, file_key, tuple(t.shape), tuple(expected[key].shape))
                _set_tensor(model, key, t.to(device=device, dtype=dtype))
            loaded.add(key)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, so the resident size of a process
    that loaded a model tensor by tensor would stay at its transient peak)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _check_shape(file, key, found, wanted):
    if found != wanted:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {list(found)} but config.json implies {list(wanted)}")


def _swap_in(model: nn.Module, prefix: str, weight) -> None:
    """Replace the nn.Linear at `prefix` by an NF4Linear, keeping a bias that was loaded before it."""
    old = model.get_submodule(prefix)
    bias = old.bias.detach() if old.bias is not None and not old.bias.is_meta else None
    new = NF4Linear(weight, bias=bias)
    if old.bias is not None and bias is None:  # the bias comes later in the file: keep a placeholder
        new.bias = torch.empty(old.bias.shape, device="meta")
    model.set_submodule(prefix, new)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, nn.Parameter(value, requires_grad=False))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def atomic_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling `.NAME.tmp-PID` of `out_dir`; `commit_dir` renames it into place when complete.

    Leftovers of an earlier write of `out_dir` by a process that was killed are cleaned up first.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out_dir.parent, glob.escape(out_dir.name))
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> None:
    """Move a completed temporary directory into place; an existing `out_dir` is replaced only now (and put
    back if the move fails)."""
    out_dir = Path(out_dir)
    fault_point("commit-ready")
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        fault_point("commit-swap")
        try:
            tmp.rename(out_dir)
        except OSError:
            old.rename(out_dir)
            raise
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def save_state_dict_sharded(tensors: dict, out_dir: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write safetensors shards (+ index when more than one), as Hugging Face does."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def quantize_checkpoint(model_dir, out_dir, dtype=None, double_quant: bool = True) -> Path:
    """Write an NF4 copy of a model directory in the bitsandbytes format transformers reads (`qtune quantize`).

    Non-quantized tensors keep the checkpoint's dtype (config `torch_dtype`) unless `dtype` is given.
    The directory is written beside `out_dir` and renamed into place only when complete.
    """
    model_dir = resolve(model_dir)
    cfg = ModelConfig.from_json(model_dir)
    dtype = parse_dtype(dtype or cfg.torch_dtype or "float32")
    model = load_model(model_dir, quantize="nf4", dtype=dtype, double_quant=double_quant)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            tensors.update(nf4_to_hf_state(name, module.nf4_weight()))
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach()
    for name, p in model.named_parameters():
        if name not in tensors and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            tensors[name] = p.detach()
    tmp = atomic_dir(Path(out_dir))
    try:
        save_state_dict_sharded(tensors, tmp)
        config = cfg.to_dict()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": config["torch_dtype"], "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"],
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(model_dir, tmp)
        commit_dir(tmp, Path(out_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when committed; a failed write leaves nothing
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------
# Hugging Face / bitsandbytes serialization: the keys transformers writes for a bnb-4bit model.

QUANT_STATE_SUFFIX = "weight.quant_state.bitsandbytes__nf4"


def _json_tensor(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def nf4_to_hf_state(prefix: str, q: NF4Weight) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' `Linear4bit` saves for this weight, keyed under `prefix`.

    The small fields travel as a JSON string in a uint8 tensor, exactly as
    `QuantState.as_dict(packed=True)` writes them. Each map is a fresh copy because safetensors
    refuses two keys that share storage.
    """
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": str(q.dtype).removeprefix("torch."),
            "shape": list(q.shape)}
    state = {f"{prefix}.weight": q.packed.reshape(-1, 1), f"{prefix}.weight.absmax": q.absmax,
             f"{prefix}.weight.quant_map": NF4_CODE.to(q.device, copy=True)}
    if q.double_quant:
        state[f"{prefix}.weight.nested_absmax"] = q.nested_absmax
        state[f"{prefix}.weight.nested_quant_map"] = q.nested_code.clone()
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset.item())
    state[f"{prefix}.{QUANT_STATE_SUFFIX}"] = _json_tensor(meta)
    return state


class _HFStateReader:
    """Looks up `prefix.<suffix>` keys and raises errors that name the file and the key."""

    def __init__(self, prefix: str, tensors: Mapping[str, torch.Tensor], source: str):
        self.prefix, self.tensors, self.where = prefix, tensors, source or "the given tensors"

    def key(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def fail(self, suffix: str, problem: str) -> ValueError:
        return ValueError(f"{self.where}: key '{self.key(suffix)}' {problem}")

    def get(self, suffix: str) -> torch.Tensor:
        if self.key(suffix) not in self.tensors:
            raise self.fail(suffix, "is missing; a bitsandbytes NF4 weight needs weight, weight.absmax and "
                                    f"{QUANT_STATE_SUFFIX} (re-export the model with load_in_4bit / bnb_4bit_quant_type='nf4')")
        return self.tensors[self.key(suffix)]

    def meta(self) -> dict:
        fp4_key = self.key("weight.quant_state.bitsandbytes__fp4")
        if fp4_key in self.tensors:
            raise self.fail("weight.quant_state.bitsandbytes__fp4", "holds an FP4 weight; only NF4 is supported "
                            "(quantize with bnb_4bit_quant_type='nf4')")
        raw = self.get(QUANT_STATE_SUFFIX)
        try:
            meta = json.loads(bytes(raw.to(torch.uint8).cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.fail(QUANT_STATE_SUFFIX, f"is not a JSON quant state: {err}") from err
        missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
        if missing:
            raise self.fail(QUANT_STATE_SUFFIX, f"lacks the fields {missing}")
        if meta["quant_type"] != "nf4":
            raise self.fail(QUANT_STATE_SUFFIX, f"has quant_type={meta['quant_type']!r}; only 'nf4' is supported")
        if meta["dtype"] not in FLOAT_DTYPES:
            raise self.fail(QUANT_STATE_SUFFIX, f"has dtype={meta['dtype']!r}, not one of {list(FLOAT_DTYPES)}")
        if meta["blocksize"] not in VALID_BLOCKSIZES:
            raise self.fail(QUANT_STATE_SUFFIX, f"has blocksize={meta['blocksize']}, not one of {VALID_BLOCKSIZES}")
        return meta

    def sized(self, suffix: str, expected: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.get(suffix)
        if t.numel() != expected:
            raise self.fail(suffix, f"has {t.numel()} values where the quant state implies {expected}")
        if t.dtype != dtype:
            raise self.fail(suffix, f"has dtype {t.dtype}, expected {dtype}")
        return t.reshape(-1)


def nf4_from_hf_state(prefix: str, tensors: Mapping[str, torch.Tensor], source: str = "") -> NF4Weight:
    """Read the NF4 weight that bitsandbytes / transformers saved under `prefix` (see `nf4_to_hf_state`).

    `source` (usually the safetensors file name) is named in every error, with the offending key.
    """
    r = _HFStateReader(prefix, tensors, source)
    meta = r.meta()
    shape = torch.Size(meta["shape"])
    numel = math.prod(shape)
    packed = r.get("weight")
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may hold the same bytes as another dtype
        packed = packed.contiguous().view(torch.uint8)
    if packed.numel() != math.ceil(numel / 2):
        raise r.fail("weight", f"holds {packed.numel()} bytes but shape {list(shape)} needs {math.ceil(numel / 2)}")
    quant_map = r.tensors.get(r.key("weight.quant_map"))
    if quant_map is not None and not torch.equal(quant_map.float().cpu().reshape(-1), NF4_CODE):
        raise r.fail("weight.quant_map", "is not the standard NF4 code; this weight was quantized with another map")
    n_blocks = math.ceil(numel / meta["blocksize"])
    q = NF4Weight(packed=packed.reshape(-1), absmax=None, shape=shape, dtype=FLOAT_DTYPES[meta["dtype"]],
                  blocksize=meta["blocksize"])
    if r.key("weight.nested_absmax") not in tensors:
        q.absmax = r.sized("weight.absmax", n_blocks, r.get("weight.absmax").dtype).float()
        return q
    missing = [k for k in ("nested_blocksize", "nested_offset") if k not in meta]
    if missing:
        raise r.fail(QUANT_STATE_SUFFIX, f"lacks the double-quant fields {missing}")
    q.nested_blocksize = meta["nested_blocksize"]
    q.absmax = r.sized("weight.absmax", n_blocks, torch.uint8)
    q.nested_absmax = r.sized("weight.nested_absmax", math.ceil(n_blocks / q.nested_blocksize), torch.float32)
    q.nested_code = r.sized("weight.nested_quant_map", 256, torch.float32)
    q.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
    return q
