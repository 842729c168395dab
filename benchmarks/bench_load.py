"""Loading memory: quantize-on-load never holds the 16-bit model.

Writes a random bf16 Llama checkpoint of at least 1B parameters (sharded safetensors, one layer per shard,
never the whole model in memory), then loads it with `load_model(quantize="nf4")` in a fresh subprocess
while a sampling thread reads the process's anonymous resident memory (RssAnon in /proc/self/status:
heap and tensors, not the mmap'd checkpoint pages). Reports the peak above the post-import baseline,
the loaded model's size (NF4 linears + fp32 embeddings and norms) and the largest single tensor.
Target: peak <= loaded size + largest tensor + 300 MB.

    python benchmarks/bench_load.py [--layers 22] [--hidden 2048] [--intermediate 5632] [--keep DIR]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, print_json  # noqa: E402


def write_checkpoint(out: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int) -> int:
    """A random bf16 checkpoint, one shard per layer; returns the parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    shards.append({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rand(vocab, hidden)})
    weight_map, total, n_params = {}, 0, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * 2
            n_params += t.numel()
        shards[k] = None  # drop the shard before making the next one
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    return n_params


CHILD = r"""
import json, sys, threading, time
import torch
from qtune.weights.checkpoint import load_model
from qtune.weights.nf4 import NF4Linear

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)
base = rss_anon()
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
model = load_model(sys.argv[1], quantize="nf4", dtype="float32")
seconds = time.perf_counter() - t0
stop.set(); t.join()
peak[0] = max(peak[0], rss_anon())
size = sum(b.numel() * b.element_size() for b in model.buffers()) + sum(p.numel() * p.element_size() for p in model.parameters())
nf4 = sum(m.nf4_weight().nbytes for m in model.modules() if isinstance(m, NF4Linear))
print(json.dumps({"peak_above_baseline": peak[0] - base, "loaded_bytes": size, "nf4_linear_bytes": nf4,
                  "resident_after": rss_anon() - base, "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="write the checkpoint here and keep it")
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="qtune-load-"))
    try:
        n_params = write_checkpoint(tmp, args.layers, args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads)
        # the largest tensor as the loader holds it: read in bf16, then converted to the fp32 compute dtype
        largest = max(args.vocab * args.hidden, args.intermediate * args.hidden) * (2 + 4)
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    budget = r["loaded_bytes"] + largest + 300 * 2**20
    mb = 2**20
    print(f"checkpoint: {n_params / 1e9:.2f}B parameters, bf16 on disk {n_params * 2 / 1e9:.2f} GB")
    print(f"loaded model: {r['loaded_bytes'] / mb:.0f} MB (NF4 linears {r['nf4_linear_bytes'] / mb:.0f} MB)")
    print(f"peak anonymous RSS while loading: {r['peak_above_baseline'] / mb:.0f} MB "
          f"(budget loaded + largest tensor {largest / mb:.0f} MB + 300 MB = {budget / mb:.0f} MB) in {r['seconds']:.1f}s")
    append_rows("load", "cpu", [
        {"case": f"{n_params / 1e9:.2f}B", "impl": "qtune", "metric": "peak_rss_anon", "value": r["peak_above_baseline"], "unit": "bytes"},
        {"case": f"{n_params / 1e9:.2f}B", "impl": "qtune", "metric": "loaded_bytes", "value": r["loaded_bytes"], "unit": "bytes"}])
    print_json({"benchmark": "load", "params": n_params, **r, "largest_tensor_bytes": largest, "budget_bytes": budget,
                "within_budget": r["peak_above_baseline"] <= budget})


if __name__ == "__main__":
    main()
