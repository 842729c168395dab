"""PiSSA and LoftQ on a real model: the initial error against plain QLoRA's, and what each way of saving costs.

    python benchmarks/bench_lora_init.py --model smollm2-135m --rank 16 --targets all-linear

1. ||W - (base + s B A)|| over every adapted weight right after initialisation (NF4 base), for PiSSA and for
   LoftQ at 1 and 2 steps, beside plain QLoRA's ||W - NF4(W)||, and the time the initialisation takes.
2. A PiSSA adapter, nudged as training would, saved three ways, each compared with the model it came from:
   - qtune's choice: PEFT's rank-2r conversion plus qtune's keys; loading rebuilds NF4(W - s B_r A_r) from the
     16-bit weights (bytes on disk, load time, max logit difference);
   - the same file read as a plain rank-2r LoRA on NF4(W) (what any other tool does with it on a 4-bit base);
   - the residual base written beside a rank-r adapter: the adapted layers' weights in the checkpoint dtype.
Rows go to results.csv; the last stdout line is JSON.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import append_rows, device_name, print_json

from qtune.lora import LoraConfig, adapter_parameters, add_lora, lora_layers
from qtune.lora.init import initialise
from qtune.peft import load_adapter, save_adapter
from qtune.weights.checkpoint import load_model, read_linear_weights, resolve


def adapted(model_path, r: int, targets, init: str, loftq_iter: int = 1):
    m = load_model(model_path, quantize="nf4", dtype="float32")
    names = add_lora(m, LoraConfig(r=r, alpha=2 * r, target_modules=targets, init=init), seed=0)
    t0 = time.perf_counter()
    errors = initialise(m, {n: m.get_submodule(n) for n in names}, "default", init, loftq_iter)
    return m, {**errors, "init_s": time.perf_counter() - t0}


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def saving_options(model_path, r: int, targets, work: Path) -> dict:
    m, _ = adapted(model_path, r, targets, "pissa")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(m, "default"):
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    ids = torch.randint(0, m.config.vocab_size, (1, 64), generator=g)
    trained = logits(m, ids)
    out = save_adapter(m, work / "pissa")
    t0 = time.perf_counter()
    again = load_model(model_path, quantize="nf4", dtype="float32")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_adapter(again, out)
    rebuild_s = time.perf_counter() - t0
    qtune_gap = float((logits(again, ids) - trained).abs().max())
    plain = work / "plain"
    shutil.copytree(out, plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("qtune_")}))
    (plain / "qtune-manifest.json").unlink()
    as_plain = load_model(model_path, quantize="nf4", dtype="float32")
    load_adapter(as_plain, plain)
    plain_gap = float((logits(as_plain, ids) - trained).abs().max())
    names = list(lora_layers(m))
    residual = read_linear_weights(resolve(model_path), names)
    save_file({f"{n}.weight": w.contiguous() for n, w in residual.items()}, str(work / "residual.safetensors"))
    return {"adapter_2r_bytes": dir_bytes(out), "adapter_r_bytes": dir_bytes(out) // 2,
            "residual_base_bytes": (work / "residual.safetensors").stat().st_size, "model_load_s": load_s,
            "rebuild_s": rebuild_s, "qtune_max_logit_diff": qtune_gap, "plain_2r_max_logit_diff": plain_gap}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help='"all-linear" or comma-separated layer names')
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    targets = args.targets if args.targets == "all-linear" else tuple(args.targets.split(","))
    result = {"model": args.model, "rank": args.rank, "targets": args.targets, "init": {}}
    for init, steps in (("pissa", 1), ("loftq", 1), ("loftq", 2)):
        _, errors = adapted(args.model, args.rank, targets, init, steps)
        result["init"][f"{init}-{steps}"] = errors
        print(f"{init} ({steps} step(s)): ||W - (base + sBA)|| = {errors['init_error']:.4g}, plain QLoRA "
              f"{errors['qlora_error']:.4g} ({errors['init_error'] / errors['qlora_error']:.1%}), {errors['init_s']:.1f} s",
              flush=True)
    with tempfile.TemporaryDirectory() as work:
        result["saving"] = saving_options(args.model, args.rank, targets, Path(work))
    print("saving:", json.dumps(result["saving"]))
    if not args.no_csv:
        case = f"{args.model},r={args.rank},{args.targets}"
        rows = [{"case": case, "impl": name, "metric": "init_over_qlora_error",
                 "value": e["init_error"] / e["qlora_error"], "unit": "ratio"} for name, e in result["init"].items()]
        rows += [{"case": case, "impl": "pissa-save", "metric": k, "value": v,
                  "unit": "bytes" if k.endswith("bytes") else ("s" if k.endswith("_s") else "logit")}
                 for k, v in result["saving"].items()]
        append_rows("lora_init", "cpu", rows)
    result["device"] = device_name("cpu")
    print_json(result)


if __name__ == "__main__":
    main()
