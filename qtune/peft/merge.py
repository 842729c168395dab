"""`qtune merge`: an adapter folded into its base model, written as a plain Hugging Face directory that
transformers, vLLM or llama.cpp's converter load without PEFT. Methods that change no weight (prefix and prompt
tuning, bottleneck adapters) are refused with the reason and what to do instead."""

import json
import shutil
from pathlib import Path

from qtune.config import ModelConfig
from qtune.lora.merge import merged_state_dict
from qtune.lora.peft import AdapterError
from qtune.peft.io import adapter_dir_method, load_adapter
from qtune.weights.checkpoint import (DTYPES, atomic_dir, commit_dir, copy_tokenizer_files, load_model, parse_dtype,
                                      resolve, save_state_dict_sharded)
from qtune.weights.integrity import verify_files


def merge_adapter_into_dir(model_dir, adapter_dir, out_dir, from_original: bool = False, dtype=None,
                           double_quant: bool = True) -> Path:
    """Write base + adapter as one plain Hugging Face directory (`qtune merge`).

    Default: the adapter folded into dequant(NF4(W)), the weights it was trained against (NF4 with
    `double_quant` as in training); for LoRA W_merged = dequant(NF4(W)) + s · B A. `from_original`: folded
    into the 16-bit weights (W + s · B A). `dtype` of the output defaults to the base checkpoint's torch_dtype (bfloat16 when it has none).
    """
    verify_files(adapter_dir, AdapterError)  # before the base model loads (load_adapter checks again as it reads)
    method = adapter_dir_method(adapter_dir)
    if method.not_foldable:
        raise AdapterError(f"{adapter_dir}: a {method.name} adapter cannot be merged into the weights "
                           f"({method.not_foldable})")
    model_dir = resolve(model_dir)
    cfg = ModelConfig.from_json(model_dir)
    if from_original and "quantization_config" in cfg.extra:
        raise AdapterError(f"{model_dir / 'config.json'}: this is a 4-bit checkpoint (quantization_config); "
                           "merging from the original weights needs the 16-bit model it was quantized from")
    stored = cfg.torch_dtype if cfg.torch_dtype in DTYPES else None
    out_dtype = parse_dtype(dtype or stored or "bfloat16")
    # Loaded in the stored dtype so quantization sees the same values as it did in training.
    model = load_model(model_dir, quantize="none" if from_original else "nf4", dtype=parse_dtype(stored or "float32"),
                       double_quant=double_quant)
    load_adapter(model, adapter_dir, name="merged")
    tensors = merged_state_dict(model, "merged", out_dtype)
    del model
    config = cfg.to_dict()
    config.pop("quantization_config", None)
    dtype_name = str(out_dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype_name
    if "dtype" in config:  # transformers >= 5 writes `dtype`
        config["dtype"] = dtype_name
    out_dir = Path(out_dir)
    tmp = atomic_dir(out_dir)
    try:
        save_state_dict_sharded(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(model_dir, tmp)
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
