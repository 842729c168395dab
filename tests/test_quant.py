"""NF4 quantization against bitsandbytes (its CPU backend): bytes, absmax codes, nested absmax,
offset and dequantized values must be identical; the Hugging Face state must decode in bnb."""

import json
import math

import bitsandbytes.functional as BF
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors.torch import load_file, save_file

from qtune.weights.checkpoint import nf4_from_hf_state, nf4_to_hf_state
from qtune.weights.nf4 import (NF4_CODE, NF4Weight, bnb_cpu_kernel_is_exact, dequantize_nf4,
                               quantize_blockwise_dynamic, quantize_nf4, signed_dynamic_map)
from qtune.weights.nf4_linear import NF4Linear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd numel, numel not a multiple of 64 or 256, a ragged nested block, 1-d and 3-d, last dims on
# each of bnb's CPU dequantization paths (odd, multiple of 16, of 64, neither)
SHAPES = [(1,), (63,), (7, 9), (5, 3, 11), (37, 130), (64, 64), (9, 200), (7, 80), (260, 257)]


@pytest.fixture(autouse=True, scope="module")
def eager_bitsandbytes():
    # bnb wraps its portable dequantization in torch.compile, recompiling for every shape; eager
    # mode computes the same numbers in a fraction of the time.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantization of its own (packed, state), in `dtype`, shape `state.shape`.

    bnb 0.50's CPU kernel indexes absmax per row when the last dim is a multiple of 16 but not of
    the block size, although its blocks run over the flattened tensor (as `quantize_4bit` and the
    CUDA kernel lay them out): bnb's own round trip is then wrong. For those shapes we use bnb's
    portable default-backend code, the one its CPU backend already uses for odd last dims.
    """
    state.dtype = dtype
    last = state.shape[-1]
    if last % 16 == 0 and last % state.blocksize != 0:
        absmax = state.absmax
        if state.nested:
            absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        out = _dequantize_4bit_compute(packed.reshape(-1), absmax, NF4_CODE, state.blocksize, state.shape, dtype)
    else:
        out = BF.dequantize_4bit(packed, state)
    return out.reshape(state.shape)


def bnb_quantize(w: torch.Tensor, double_quant: bool, blocksize: int = 64):
    return BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def assert_same_as_bnb(q: NF4Weight, packed: torch.Tensor, state) -> None:
    assert torch.equal(q.packed, packed.reshape(-1))
    assert q.absmax.dtype == state.absmax.dtype and torch.equal(q.absmax, state.absmax)
    assert q.double_quant == state.nested
    if state.nested:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(q.nested_code, state.state2.code)
        assert q.nested_blocksize == state.state2.blocksize
    for dtype in DTYPES:
        expected = bnb_dequantize(packed, state, dtype)
        for ours in (q.dequantize(dtype), q.dequantize_torch(dtype)):  # bnb's C++ kernel where exact, torch ops
            assert ours.dtype == dtype and ours.shape == q.shape
            assert torch.equal(ours, expected), f"dequantized {dtype} differs"


def test_code_tables_match_bnb():
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(signed_dynamic_map(), BF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bnb(shape, dtype, double_quant):
    torch.manual_seed(math.prod(shape))
    w = (torch.randn(shape) * 0.05).to(dtype)
    q = quantize_nf4(w, double_quant=double_quant)
    assert q.shape == w.shape and q.dtype == dtype
    assert_same_as_bnb(q, *bnb_quantize(w, double_quant))
    assert torch.equal(dequantize_nf4(q), q.dequantize(dtype))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_match_bnb(blocksize):
    w = torch.randn(33, 150)
    assert_same_as_bnb(quantize_nf4(w, blocksize=blocksize), *bnb_quantize(w, True, blocksize))


@pytest.mark.parametrize("case", ["zeros", "constant", "zero_blocks", "midpoint_ties", "integers", "tiny"])
def test_special_values_match_bnb(case):
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    if case == "zeros":
        w = torch.zeros(40, 96)
    elif case == "constant":  # every absmax equals the offset: the centred absmax are all zero
        w = torch.full((40, 96), -0.75)
    elif case == "zero_blocks":
        w.view(-1, 64)[::3] = 0
    elif case == "midpoint_ties":  # absmax 1 and values exactly on NF4 midpoints: ties go to the lower level
        mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
        w.view(-1, 64)[:, :15] = mids
        w.view(-1, 64)[:, 15] = 1.0
    elif case == "integers":
        w = torch.randint(-8, 9, (40, 96)).float()
    elif case == "tiny":
        w = w * 1e-30
    for double_quant in (True, False):
        assert_same_as_bnb(quantize_nf4(w, double_quant=double_quant), *bnb_quantize(w, double_quant))


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_absmax_quantization_matches_bnb_quantize_blockwise(scale):
    # the 8-bit code of every centred absmax, including bnb's grid rounding near midpoints
    torch.manual_seed(1)
    x = torch.randn(256 * 40 + 77) * scale
    codes, absmax = quantize_blockwise_dynamic(x, signed_dynamic_map(), 256)
    ref_codes, ref_state = BF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)


def test_absmax_fp32_matches_bnb_decode():
    w = torch.randn(70, 300)
    q = quantize_nf4(w)
    _, state = bnb_quantize(w, True)
    expected = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(q.absmax_fp32(), expected)
    assert q.nbytes == q.packed.numel() + q.absmax.numel() + 4 * (q.nested_absmax.numel() + 256 + 1)


def test_weight_to_and_dequantize_error():
    q = quantize_nf4(torch.randn(8, 64))
    moved = q.to("cpu")
    assert moved is not q and torch.equal(moved.dequantize(), q.dequantize())
    assert 0.0 < (q.dequantize() - torch.zeros(8, 64)).abs().max()


# ----------------------------------------------------------------------------- Hugging Face format

def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in state.items()}


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_state_decodes_in_bnb(dtype, double_quant):
    w = torch.randn(48, 37).to(dtype)
    q = quantize_nf4(w, double_quant=double_quant)
    state = nf4_to_hf_state("model.layers.0.mlp.up_proj", q)
    tensors = strip_prefix(state, "model.layers.0.mlp.up_proj")
    packed = tensors.pop("weight")
    assert packed.shape == (math.ceil(w.numel() / 2), 1) and packed.dtype == torch.uint8
    qs = BF.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items()}, device="cpu")
    assert qs.dtype == dtype and qs.shape == w.shape and qs.blocksize == 64 and qs.quant_type == "nf4"
    assert torch.equal(BF.dequantize_4bit(packed, qs), q.dequantize())
    assert torch.equal(nf4_from_hf_state("model.layers.0.mlp.up_proj", state).dequantize(), q.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_hf_state_equals_bnb_as_dict(double_quant):
    w = torch.randn(40, 70, dtype=torch.bfloat16)
    packed, qs = bnb_quantize(w, double_quant)
    theirs = {f"lm.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}
    theirs["lm.weight"] = packed
    ours = nf4_to_hf_state("lm", quantize_nf4(w, double_quant=double_quant))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    read = nf4_from_hf_state("lm", theirs, source="model.safetensors")
    assert_same_as_bnb(read, packed, qs)


def test_hf_state_survives_safetensors(tmp_path):
    # several layers in one file: each map must be its own tensor for safetensors to save it
    weights = {f"model.layers.{i}.self_attn.q_proj": quantize_nf4(torch.randn(32, 64)) for i in range(2)}
    state = {}
    for prefix, q in weights.items():
        state.update(nf4_to_hf_state(prefix, q))
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    for prefix, q in weights.items():
        assert torch.equal(nf4_from_hf_state(prefix, loaded, "model.safetensors").dequantize(), q.dequantize())


def broken(state: dict, key: str, value=None) -> dict:
    state = dict(state)
    if value is None:
        del state[key]
    else:
        state[key] = value
    return state


def json_tensor(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def test_hf_state_errors_name_file_and_key():
    state = nf4_to_hf_state("m.proj", quantize_nf4(torch.randn(16, 64)))
    meta_key = "m.proj.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(state[meta_key].tolist()))
    cases = [
        (broken(state, "m.proj.weight.absmax"), "'m.proj.weight.absmax' is missing"),
        (broken(state, meta_key), f"'{meta_key}' is missing"),
        (broken(state, "m.proj.weight", torch.zeros(7, 1, dtype=torch.uint8)), "holds 7 bytes but shape [16, 64] needs 512"),
        (broken(state, "m.proj.weight.absmax", torch.zeros(3, dtype=torch.uint8)), "has 3 values where the quant state implies 16"),
        (broken(state, "m.proj.weight.nested_absmax", torch.zeros(1, dtype=torch.float16)), "expected torch.float32"),
        (broken(state, "m.proj.weight.quant_map", NF4_CODE.flip(0)), "not the standard NF4 code"),
        (broken(state, meta_key, torch.tensor([1, 2, 255], dtype=torch.uint8)), "is not a JSON quant state"),
        (broken(state, meta_key, json_tensor({**meta, "quant_type": "fp4"})), "only 'nf4' is supported"),
        (broken(state, meta_key, json_tensor({**meta, "dtype": "int8"})), "dtype='int8'"),
        (broken(state, meta_key, json_tensor({k: v for k, v in meta.items() if k != "nested_offset"})), "nested_offset"),
        ({**broken(state, meta_key), "m.proj.weight.quant_state.bitsandbytes__fp4": state[meta_key]}, "FP4 weight"),
    ]
    for tensors, message in cases:
        with pytest.raises(ValueError, match="shard-3.safetensors: key ") as err:
            nf4_from_hf_state("m.proj", tensors, source="shard-3.safetensors")
        assert message in str(err.value)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="torch.int32 is not float32"):
        quantize_nf4(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize=48"):
        quantize_nf4(torch.zeros(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0, 64))


# ----------------------------------------------------------------------------- NF4Linear

@pytest.mark.parametrize("bias", [True, False])
def test_nf4_linear_matches_bnb_dequantized_weight(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(70, 33, bias=bias)
    layer = NF4Linear.from_linear(linear)
    packed, state = bnb_quantize(linear.weight.detach(), True)
    w = bnb_dequantize(packed, state, torch.float32)
    x = torch.randn(2, 5, 70, requires_grad=True)
    y = layer(x)
    expected = x.detach() @ w.T + (linear.bias.detach() if bias else 0)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * expected @ w, rtol=1e-5, atol=1e-5)
    assert (layer.in_features, layer.out_features) == (70, 33)


def test_nf4_linear_buffers_and_dtype():
    linear = torch.nn.Linear(64, 16).to(torch.bfloat16)
    layer = NF4Linear.from_linear(linear, double_quant=False)
    assert set(layer.state_dict()) == {"packed", "absmax", "bias"}
    assert not list(layer.parameters())
    assert layer.nf4_weight().dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    y32 = layer(x.float())
    torch.testing.assert_close(y32, F.linear(x.float(), layer.dequantize(torch.float32), linear.bias.float()))
    layer.kernels = "fast"
    with pytest.raises(ValueError, match="kernels='fast'"):
        layer(x)
    with pytest.raises(ValueError, match="2-d"):
        NF4Linear(quantize_nf4(torch.randn(64)))


def test_chunked_quantization_equals_bitsandbytes_across_chunk_edges(monkeypatch):
    """Quantizing in chunks (to bound memory) must not change a byte, also when the chunk edge is mid-tensor."""
    import qtune.weights.nf4 as quant

    monkeypatch.setattr(quant, "QUANT_CHUNK", 4096)
    w = torch.randn(37, 301)  # 11137 elements: two full chunks and a ragged tail
    q = quant.quantize_nf4(w)
    ref, state = BF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, ref.flatten())
    assert torch.equal(q.absmax, state.absmax)


def test_nf4_linear_backward_keeps_no_dequantized_weight():
    """The input gradient equals autograd's through the dequantized weight, and no (out, in) tensor is saved."""
    layer = NF4Linear.from_linear(torch.nn.Linear(96, 80, bias=True))
    x = torch.randn(3, 5, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(x2, layer.dequantize(torch.float32), layer.bias) * g).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.Size([80, 96]) not in saved


@pytest.mark.parametrize("shape,blocksize", [((64, 80), 64), ((12, 576), 128), ((8, 576), 256)])
def test_bnb_cpu_kernel_is_only_used_where_exact(shape, blocksize):
    """bnb 0.50's CPU kernel decodes these layouts wrongly on some CPUs (seen on an AVX-512 machine; an
    AVX2-only one decodes them right), so `dequantize` must keep to the torch ops there on every CPU."""
    torch.manual_seed(1)
    q = quantize_nf4(torch.randn(shape), blocksize=blocksize, double_quant=False)
    assert not bnb_cpu_kernel_is_exact(shape, blocksize)
    assert torch.equal(q.dequantize(torch.float32), q.dequantize_torch(torch.float32))
