"""A LoRA adapter as a GGUF LoRA file, the format llama.cpp's `--lora` (and Ollama's ADAPTER) reads.

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = alpha
    blk.{i}.attn_q.weight.lora_a  (r, in)     blk.{i}.attn_q.weight.lora_b  (out, r)

llama.cpp adds (alpha / r) · B A to the base weight it loaded, so for rsLoRA (scale alpha / sqrt(r)) the
alpha written is scale · r. For llama-layout models the base's Q/K rows are interleaved per head
(`permute_qk`), so B's rows are interleaved the same way; A acts on the input side and stays as it is.
"""

import os
from pathlib import Path

import torch

from qtune.config import ModelConfig
from qtune.lora.peft import read_adapter_config, read_adapter_weights
from qtune.weights.checkpoint import resolve
from qtune.weights.gguf_export import ExportError, architecture, gguf_tensor_name, permute_qk, tensor_names
from qtune.weights.gguf_layout import expert_key


def export_gguf_adapter(model, adapter_dir, out_path) -> Path:
    """Write the PEFT adapter in `adapter_dir` (trained on MODEL) as the GGUF LoRA file `out_path`."""
    import gguf

    model_dir, out_path = resolve(model), Path(out_path)
    cfg = ModelConfig.from_json(model_dir)
    arch = architecture(cfg, model_dir / "config.json")
    names = tensor_names(arch, cfg)
    lora = read_adapter_config(adapter_dir)
    if lora.use_dora:
        raise ExportError(f"{adapter_dir}: a DoRA adapter's magnitudes have no GGUF LoRA form; export the merged "
                          "model instead (without --adapter-only)")
    pairs = read_adapter_weights(adapter_dir)
    # the file's rank: 2r for a PiSSA / LoftQ adapter, saved as PEFT's conversion to a LoRA on the original weights
    rank = next(iter(pairs.values()))[0].shape[0]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, arch.name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.scale * rank)
        for module, (a, b) in sorted(pairs.items()):
            if expert_key(f"{module}.weight"):
                raise ExportError(f"{adapter_dir}: {module!r} is an expert; llama.cpp stacks each projection of all "
                                  "experts into one tensor, which a GGUF LoRA file cannot adapt per expert here: "
                                  "export the merged model (without --adapter-only) instead")
            name = gguf_tensor_name(f"{module}.weight", names)
            if name is None:
                raise ExportError(f"{adapter_dir}: adapted module {module!r} has no GGUF counterpart")
            b = b.to(torch.float32)
            if arch.permute_qk and module.endswith("q_proj"):
                b = permute_qk(b, cfg.num_attention_heads)
            elif arch.permute_qk and module.endswith("k_proj"):
                b = permute_qk(b, cfg.num_key_value_heads)
            writer.add_tensor(f"{name}.lora_a", a.to(torch.float32).contiguous().numpy())
            writer.add_tensor(f"{name}.lora_b", b.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out_path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return out_path
