"""Memory accounting, tracer and estimator against independent references.

References: transformers' own parameter count of the same shapes, bitsandbytes' NF4 quant state, tensors
actually built (meta) or allocated (CPU), hand-computed byte counts, and the kernel's resident-set
count of a real step in a fresh process.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from qtune.config import ModelConfig, shape_config
from qtune.memory.accounting import lora_param_count, nf4_nbytes, param_counts, regime_bytes, target_names
from qtune.memory.build import add_trainable_lora, random_model, training_state_bytes
from qtune.memory.estimate import StepShape, estimate, fit_budget, parse_size
from qtune.memory.step import trace_step
from qtune.memory.tracer import LiveBytes

SMALL = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 704,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def small_cfg(**changes) -> ModelConfig:
    return ModelConfig.from_dict({**SMALL, **changes})


# ----------------------------------------------------------------------------- accounting

@pytest.mark.parametrize("shape", ["llama2-7b", "llama3-8b", "smollm2-135m"])
def test_param_counts_equal_transformers(shape):
    transformers = pytest.importorskip("transformers")
    # Two layers of the real widths: every count is per layer, and building 32 layers costs only time.
    cfg = ModelConfig.from_dict({**shape_config(shape).to_dict(), "num_hidden_layers": 2})
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    total = sum(p.numel() for p in hf.parameters())  # tied weights are listed once
    linear = sum(p.numel() for n, p in hf.named_parameters() if n.startswith("model.layers.") and "_proj" in n)
    counts = param_counts(cfg)
    assert (counts.total, counts.linear) == (total, linear)


NEW_SHAPES = ["qwen3-8b", "qwen3-14b", "qwen3-30b-a3b", "gemma-2-9b", "gemma-3-12b", "phi-4", "mistral-nemo-12b",
              "llama3.1-8b", "mixtral-8x7b"]


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_param_counts_of_the_named_shapes_equal_transformers(shape):
    """Each family's own transformers class built on the meta device, all layers: Gemma's four norms and
    Qwen3's q/k norms, every expert of a mixture of experts (and its router), Phi-4's fused projections."""
    transformers = pytest.importorskip("transformers")
    cfg = shape_config(shape)
    d = {k: v for k, v in cfg.to_dict().items() if k != "architectures"}
    hf_cfg = transformers.AutoConfig.for_model(**d)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    total = sum(p.numel() for p in hf.parameters())  # tied weights are listed once
    assert param_counts(cfg).total == total


def test_mixture_of_experts_estimate_keeps_all_experts_and_runs_top_k():
    """Qwen3-30B-A3B: all 128 experts resident in NF4, activations of 8; it fits a 24 GB card (Unsloth quotes
    17.5 GB) but not a 16 GB one."""
    cfg = shape_config("qwen3-30b-a3b")
    s = StepShape(cfg, 1, 2048)
    expert_weights = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert estimate(s).parts["weights"] > expert_weights / 2  # NF4: half a byte each
    dense_top_k = ModelConfig.from_dict({**cfg.to_dict(), "model_type": "qwen3", "intermediate_size": 8 * 768})
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")  # what "all-linear" adapts on a mixture of experts
    dense = estimate(StepShape(dense_top_k, 1, 2048, targets=attention)).parts["layer_saved"]
    assert estimate(s).parts["layer_saved"] == pytest.approx(dense, rel=0.01)
    assert fit_budget(s, parse_size("24GB"))["fits"] and not fit_budget(s, parse_size("16GB"))["fits"]


def test_fused_phi3_targets_count_as_the_projections_they_stack():
    assert target_names(["qkv_proj", "o_proj"]) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert target_names(["gate_up_proj"]) == ("gate_proj", "up_proj")


def test_llama2_7b_regimes_hand_computed():
    cfg = shape_config("llama2-7b")
    P = 6_738_415_616  # Llama-2-7B's published parameter count
    assert param_counts(cfg).total == P
    full = regime_bytes(cfg, "full").per_param()
    assert (full["weights"], full["gradients"], full["optimizer"], full["total"]) == (2.0, 2.0, 12.0, 16.0)
    lora16 = regime_bytes(cfg, "lora16", r=16)
    assert lora16.per_param()["weights"] == 2.0
    # r=16 on the 7 linears of 32 layers: 16 x (4 x 8192 + 3 x 15104) per layer
    trainable = 32 * 16 * (4 * 8192 + 3 * 15104)
    assert lora16.trainable_params == trainable and lora16.adapters == 16 * trainable
    qlora = regime_bytes(cfg, "qlora", r=16)
    # per quantized weight: half a byte of codes; one uint8 absmax per 64 values; one fp32 per 256 blocks
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    tensors = 32 * 7
    assert qlora.weights == linear // 2 + 2 * (P - linear)
    assert qlora.quant_constants == linear // 64 + 4 * linear // (64 * 256) + tensors * (256 * 4 + 4)
    assert 0.5 < qlora.per_param()["weights"] + qlora.per_param()["quant_constants"] < 0.6
    adam8 = regime_bytes(cfg, "qlora", r=16, optimizer="adamw8bit").per_param()["adapter_bytes_per_trainable_param"]
    assert 10.0 < adam8 < 10.1  # 4 weight + 4 gradient + 2 x (1 byte + 4 bytes per 256)


@pytest.mark.parametrize("numel,double_quant", [(64 * 300 + 10, True), (4096, True), (1000, False), (33, True)])
def test_nf4_nbytes_equal_quantized_tensors_and_bitsandbytes(numel, double_quant):
    from qtune.weights.nf4 import quantize_nf4

    w = torch.randn(numel)
    q = quantize_nf4(w, double_quant=double_quant)
    codes, consts = nf4_nbytes(numel, double_quant=double_quant)
    assert codes + consts == q.nbytes and codes == q.packed.numel()
    bnb = pytest.importorskip("bitsandbytes")
    packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    bnb_consts = state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        nested = state.state2
        bnb_consts += nested.absmax.numel() * 4 + nested.code.numel() * 4 + 4  # + the fp32 offset
    assert (packed.numel(), bnb_consts) == (codes, consts)


@pytest.mark.parametrize("regime", ["full", "lora16", "qlora"])
def test_built_training_state_equals_accounting(regime):
    cfg = small_cfg(qkv_bias=True, model_type="qwen2", tie_word_embeddings=True)
    counted = training_state_bytes(cfg, regime, r=8)
    acc = regime_bytes(cfg, regime, r=8).as_dict()
    assert counted == {k: acc[k] for k in counted}


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj"), ("down_proj",)])
def test_lora_param_count_equals_attached_adapter(targets):
    cfg = small_cfg()
    model = random_model(cfg, torch.float32, "meta")
    params = add_trainable_lora(model, 8, targets)
    assert sum(p.numel() for p in params) == lora_param_count(cfg, 8, targets)
    assert len(params) == 2 * cfg.num_hidden_layers * len(target_names(targets))


# ----------------------------------------------------------------------------- tracer

def test_tracer_counts_births_deaths_and_views():
    a = torch.zeros(1000)  # 4000 bytes, registered
    with LiveBytes() as tracer:
        tracer.register([a])
        b = a * 2  # +4000
        view = b[10:]  # a view: no new bytes
        c = torch.empty(250, dtype=torch.float64)  # +2000 -> peak 10000
        del b, c  # b's storage lives on through the view
        d = view + 1  # +3960
        del view
        e = d.sum()  # b is gone (-4000), +4 for e
    assert tracer.peak == 4000 + 4000 + 2000 + 3960 - 2000  # c died before d was made
    rep = tracer.report()
    assert rep.end_bytes == 4000 + 3960 + 4 and rep.start_bytes == 4000
    assert e.item() == pytest.approx(990.0)


def test_fake_replay_equals_traced_real_cpu_step():
    cfg = small_cfg(hidden_size=128, intermediate_size=344)
    fake = trace_step(cfg, 2, 64, torch.float32, r=8, fake=True)
    real = trace_step(cfg, 2, 64, torch.float32, r=8, fake=False)
    assert (fake.peak_bytes, fake.start_bytes) == (real.peak_bytes, real.start_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_of_representative_loss_tiles_has_the_full_replays_peak(dtype, monkeypatch):
    """The fake replay walks only the first two and last tiles of the loss's loops (kernels.dispatch.memory_replay);
    replaying all 5 x 6 tiles (5 row chunks, 6 vocabulary slices, both partial at the end) gives the same
    peak and composition."""
    import qtune.memory.step
    from qtune.kernels import dispatch

    cfg = small_cfg(vocab_size=5000, hidden_size=64, intermediate_size=176)
    reports = []
    for representative in (True, False):
        monkeypatch.setattr(qtune.memory.step, "memory_replay", lambda fake, on=representative: dispatch.memory_replay(on))
        reports.append(trace_step(cfg, 1, 4500, dtype, r=8, tiled_mlp="on", offload_checkpoints=True))
    cut, full = reports
    assert (cut.peak_bytes, cut.end_bytes, cut.peak_phase) == (full.peak_bytes, full.end_bytes, full.peak_phase)
    assert cut.largest_at_peak == full.largest_at_peak and cut.host_peak_bytes == full.host_peak_bytes


def test_tile_starts_cut_only_inside_memory_replay():
    from qtune.kernels.dispatch import memory_replay, tile_starts

    assert list(tile_starts(4500, 1024)) == [0, 1024, 2048, 3072, 4096]
    with memory_replay():
        assert list(tile_starts(4500, 1024)) == [0, 1024, 4096] and list(tile_starts(3000, 1024)) == [0, 1024, 2048]
        with memory_replay(False):
            assert len(tile_starts(4500, 1024)) == 5
    assert len(tile_starts(4500, 1024)) == 5


# ----------------------------------------------------------------------------- estimator vs tracer vs measured

TRACE_CASES = [  # (config changes, micro-batch, seq, dtype, checkpointing)
    ({}, 1, 128, "float32", True),
    ({}, 2, 256, "bfloat16", True),
    ({"num_hidden_layers": 3}, 1, 256, "float32", False),
    ({"hidden_size": 128, "intermediate_size": 344, "num_key_value_heads": 1, "vocab_size": 5000,
      "num_hidden_layers": 4}, 4, 64, "float32", True),
]


@pytest.mark.parametrize("changes,batch,seq,dtype,ckpt", TRACE_CASES)
def test_estimate_within_10_percent_of_tracer(changes, batch, seq, dtype, ckpt):
    cfg = small_cfg(**changes)
    traced = trace_step(cfg, batch, seq, getattr(torch, dtype), gradient_checkpointing=ckpt)
    predicted = estimate(StepShape(cfg, batch, seq, dtype, gradient_checkpointing=ckpt))
    assert sum(predicted.parts.values()) == predicted.peak_bytes
    # what the trace starts with: the resident parts, plus the batch (ids and labels), the RoPE frequencies
    # and AdamW's fp32 step counter per adapter tensor
    resident = sum(predicted.parts[k] for k in ("weights", "quant_constants", "adapter_weights", "optimizer_state"))
    extras = 2 * batch * seq * 8 + cfg.head_dim // 2 * 4 + 4 * 2 * 7 * cfg.num_hidden_layers
    assert resident + extras == traced.start_bytes
    assert abs(predicted.peak_bytes / traced.peak_bytes - 1) < 0.10


MEASURED = {"model_type": "llama", "vocab_size": 8000, "hidden_size": 512, "intermediate_size": 1408,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4}


def measure_in_subprocess(spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the kernel at once
    proc = subprocess.run([sys.executable, "-m", "qtune.memory.measure", json.dumps(spec)], capture_output=True,
                          text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tracer_and_estimate_match_measured_cpu_peak(batch=2, seq=512, ckpt=True):
    """The kernel's peak resident set of a real step, minus the process's non-tensor memory."""
    spec = {"config": MEASURED, "micro_batch_size": batch, "seq_len": seq, "gradient_checkpointing": ckpt,
            "warmup_step": True}
    measured = measure_in_subprocess(spec)
    cfg = ModelConfig.from_dict(MEASURED)
    traced = trace_step(cfg, batch, seq, torch.float32, gradient_checkpointing=ckpt)
    assert traced.start_bytes == measured["resident_tensors"]
    predicted = estimate(StepShape(cfg, batch, seq, "float32", gradient_checkpointing=ckpt)).peak_bytes
    assert abs(traced.peak_bytes / measured["step_peak_tensors"] - 1) < 0.10
    assert abs(predicted / measured["step_peak_tensors"] - 1) < 0.10


# ----------------------------------------------------------------------------- budget and CLI

def test_fit_budget_proposes_the_largest_that_fits():
    s = StepShape(shape_config("llama2-7b"), 4, 512)
    budget = parse_size("8GB")
    fit = fit_budget(s, budget)
    assert fit["fits"] and fit["checkpointing_needed"]
    assert fit["peak_without_checkpointing"] == estimate(StepShape(s.cfg, 4, 512, gradient_checkpointing=False)).peak_bytes
    best = fit["max_micro_batch_size"]
    assert estimate(StepShape(s.cfg, best, 512)).peak_bytes <= budget
    assert estimate(StepShape(s.cfg, best * 2, 512)).peak_bytes > budget
    assert estimate(StepShape(s.cfg, 4, fit["max_seq_len"])).peak_bytes <= budget
    assert estimate(StepShape(s.cfg, 4, fit["max_seq_len"] * 2)).peak_bytes > budget
    assert parse_size("512 MiB") == 512 * 2**20 and parse_size("1.5g") == 3 * 2**29
    with pytest.raises(ValueError, match="not a number"):
        parse_size("eight")


def test_estimate_command(tmp_path):
    from click.testing import CliRunner

    from qtune.cli.memory_cmds import estimate as estimate_cmd

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SMALL))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'kind = "sft"\n[model]\npath = "{model_dir}"\n[data]\npath = "x.json"\nmax_seq_len = 256\n'
                      '[lora]\nr = 8\n[train]\nmicro_batch_size = 2\n')
    result = CliRunner().invoke(estimate_cmd, [str(recipe), "lora.r=4", "--gpu-memory", "64MB"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    expected = estimate(StepShape(ModelConfig.from_dict(SMALL), 2, 256, "bfloat16", r=4, optimizer="paged_adamw"))
    assert out["peak_bytes"] == expected.peak_bytes and out["budget"]["budget_bytes"] == 64 * 2**20
    assert math.isclose(sum(v for k, v in out.items() if k not in ("peak_bytes", "peak_at", "trainable_params", "budget")),
                        out["peak_bytes"])
    missing = CliRunner().invoke(estimate_cmd, [str(recipe), f"model.path={tmp_path / 'nowhere'}"])
    assert missing.exit_code != 0 and "--shape" in missing.output
    shaped = CliRunner().invoke(estimate_cmd, [str(recipe), f"model.path={tmp_path / 'nowhere'}", "--shape",
                                               "llama2-7b", "--device", "cpu"])
    assert json.loads(shaped.output.strip().splitlines()[-1])["peak_bytes"] == \
        estimate(StepShape(shape_config("llama2-7b"), 2, 256, "float32", r=8, optimizer="paged_adamw")).peak_bytes


def test_cuda_estimate_counts_the_triton_loss_logit_gradient_buffer():
    """On CUDA the loss runs the Triton kernels, whose backward holds the logit gradients of a chunk of tokens
    over the whole vocabulary, bounded by LOGIT_GRAD_BYTES (64 MiB): 261 tokens x 128,256 x 2 bytes for a
    Llama-3-8B shape in bf16 (1024 tokens, 262 MB, before the bound). `qtune estimate --device cuda` must
    count it; the CPU path holds 4 MB logit tiles instead."""
    from qtune.kernels.logprobs import LOGIT_GRAD_BYTES, bounded_chunk
    from qtune.memory.estimate import loss_bytes

    cfg = shape_config("llama3-8b")
    assert bounded_chunk(1024, cfg.vocab_size, 2) == 2**26 // (128256 * 2) == 261 and bounded_chunk(1024, 32000, 2) == 1024
    buffer = 261 * cfg.vocab_size * 2
    assert LOGIT_GRAD_BYTES - cfg.vocab_size * 2 < buffer <= LOGIT_GRAD_BYTES
    triton_path = StepShape(cfg, 1, 2048, triton_loss=True)
    # the buffer, the chunk's product with the lm_head (bf16 and fp32), dL/dh in fp32 and in bf16 at the end, and
    # the hidden states, their scored copy and the norm's input
    D = cfg.hidden_size
    assert loss_bytes(triton_path) == buffer + 261 * D * 6 + 2048 * D * (4 + 2) + 3 * 2048 * D * 2
