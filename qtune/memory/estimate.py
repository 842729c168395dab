"""Peak memory of a QLoRA / LoRA training step, predicted from the shapes alone (`qtune estimate`).

The prediction follows what the step keeps alive, part by part (N = micro_batch x seq_len tokens, b =
bytes per element of the compute dtype, L layers, D hidden, I intermediate):

    weights           NF4 codes (n/2 bytes per weight) and the 16-bit embedding / lm_head / norms
    quant constants   absmax codes and double-quant statistics
    adapters          fp32 A and B, their gradients and the optimizer moments (steady state: after step 1)
    checkpoints       with checkpointing, each layer's input: L x N x D x b (offloaded to host memory: two
                      on the device, the one recomputed and the next one fetched; `host_bytes` the rest)
    layer             one layer's backward: the activations autograd saves (`saved_activation_bytes`), and
                      the larger of the dequantization temporaries (fp32 levels and product of the largest
                      weight; NF4Linear dequantizes again in backward instead of keeping a dense copy) and
                      the MLP backward's gradient buffers (tiled: one chunk's), or an RMSNorm backward's
                      three fp32 (N, D) temporaries
    loss              hidden states, their gradient and the fused cross-entropy's logit tiles (on CUDA the
                      Triton path's chunk x vocabulary logit-gradient buffer, `triton_loss`)

Without checkpointing every layer's activations are saved during the forward.
Backward walks the layers from last to first while adapter gradients accumulate and checkpoints are
freed, so the peak is taken at the first and at the last layer processed, whichever is higher. The
numbers are for qtune's plain-torch path (what runs on a CPU and what the tracer replays); on a GPU the
fused Triton path saves less (it recomputes the SwiGLU product and keeps K and V unrepeated).

Family differences: Gemma's two extra norms per layer and Qwen3 / Gemma 3's q/k norms save their inputs;
Gemma 2's soft-capped attention runs as plain matrix products that save the (T x T) scores and
probabilities of every head; a mixture of experts runs each token through its top-k experts, so its MLP
activations are those of a dense MLP k experts wide (plus the router's logits).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from qtune.config import SHAPES, ModelConfig, shape_config
from qtune.memory.accounting import (
    DTYPE_BYTES,
    linear_shapes,
    VIRTUAL_METHODS,
    lora_state_nbytes,
    nf4_model_nbytes,
    residual_pair_nbytes,
    param_counts,
    target_names,
    virtual_state_nbytes,
    virtual_token_numels,
)

CE_CHUNK = 1024  # tokens per tile of the fused cross-entropy (its default chunk_size)


@dataclass
class StepShape:
    """Everything the peak depends on: the model shape and the recipe's training settings."""

    cfg: ModelConfig
    micro_batch_size: int = 1
    seq_len: int = 512
    dtype: str = "bfloat16"
    r: int = 16
    targets: object = "all-linear"
    quantize: str = "nf4"
    double_quant: bool = True
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"
    triton_loss: bool = False  # the loss runs the Triton kernels (CUDA) rather than the plain-torch one-pass path
    method: str = "lora"  # the recipe's [peft] method
    peft: object = None  # the recipe's [peft] section, for the methods with settings of their own
    init: str = "default"  # lora.init: PiSSA / LoftQ keep an fp32 residual pair per adapted layer
    virtual_numels: tuple[int, ...] = ()  # prompt / P-tuning / prefix: the sizes of the tensors that train
    virtual_tokens: int = 0  # their N virtual positions (prompt and P-tuning run them through every layer)
    offload_checkpoints: bool = False  # checkpoints wait in pinned host memory (qtune/offload.py)
    tiled_mlp: str = "off"  # "auto" | "on" | "off": the MLP over CHUNK_TOKENS-row chunks (qtune/tiled_mlp.py)

    @property
    def tiles(self) -> bool:
        """Whether the MLP runs tiled at this step's token count."""
        from qtune.tiled_mlp import tiling_applies  # here: the estimator itself needs no torch

        return tiling_applies(self.tiled_mlp, self.tokens)

    @property
    def mlp_tokens(self) -> int:
        """Tokens whose MLP activations exist at once: all of them, or one chunk when tiled."""
        from qtune.tiled_mlp import CHUNK_TOKENS  # here: the estimator itself needs no torch

        return min(self.tokens, CHUNK_TOKENS) if self.tiles else self.tokens

    @property
    def tokens(self) -> int:
        extra = self.virtual_tokens if self.method in ("prompt", "p_tuning") else 0
        return self.micro_batch_size * (self.seq_len + extra)

    @property
    def b(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class Estimate:
    """Predicted peak bytes and the parts that add up to it."""

    peak_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    peak_at: str = ""
    trainable_params: int = 0

    def as_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "peak_at": self.peak_at, "trainable_params": self.trainable_params,
                **self.parts}


def saved_activation_bytes(s: StepShape, first_layer: bool) -> int:
    """Bytes autograd saves for one decoder layer's backward (plain path), besides the layer's input.

    first_layer: layer 0, whose input (the embedding output) needs no gradient, so its first RMSNorm
    saves nothing. The frozen NF4 products save nothing either: their backward dequantizes again.
    """
    from qtune.kernels.cpu.attention import saved_scores_per_token  # here: the estimator itself needs no torch

    cfg, N, b = s.cfg, s.tokens, s.b
    D, I, H = cfg.hidden_size, active_intermediate(cfg), cfg.num_attention_heads
    q, kv = H * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    # Without a mask (the step's unpadded batch) SDPA takes K and V unrepeated (enable_gqa); a padded or packed
    # batch on a CPU repeats them up to H heads, which adds 2 b (q - kv) per token to this estimate.
    shapes = linear_shapes(cfg)
    adapted = lora_targets(s)
    per_token = 0 if first_layer else 4  # norm 1: 1/rms (x itself is the layer's input)
    if set(adapted) & {"q_proj", "k_proj", "v_proj"}:
        per_token += b * D  # normed input, kept for dA of q / k / v
    if cfg.qk_norm:
        per_token += b * (q + kv) + 4 * (H + cfg.num_key_value_heads)  # q and k before their norms, 1/rms
    if cfg.gemma_norms:
        per_token += 2 * (b * D + 4)  # the attention and MLP outputs before their norms, 1/rms
    if cfg.num_experts:
        per_token += 4 * cfg.num_experts  # router logits
    scores = saved_scores_per_token(H, s.seq_len)
    if cfg.attn_logit_softcapping is not None:
        # q, k and v repeated to H heads; the capped scores and the probabilities (fp32 and cast) of every key
        per_token += 3 * b * q + H * s.seq_len * (2 * b + 4)
    elif s.dtype == "float32" and scores <= I:
        # CPU fp32 block attention (kernels/cpu/attention.py): scaled q, k, v and the probabilities of
        # each causal query block; its output is already in o_proj's layout
        per_token += b * q + 2 * b * kv + 4 * scores
    else:
        per_token += 2 * b * q + 2 * b * kv + 4 * H  # SDPA: q, k, v, output and a log-sum-exp per head
    per_token += b * q if "o_proj" in adapted else 0  # o_proj's input (for SDPA, a contiguous copy)
    per_token += b * D + 4  # norm 2: the residual sum and 1/rms
    # a tiled MLP keeps only its input (the chunks' views of it); its activations are one chunk's, transient
    per_token += b * D if s.tiles else mlp_saved_per_token(s)
    # x_d A^T of every adapter, for dB; fp32 adapters without dropout take the merged-weight path
    # (kernels/cpu/merged_lora.py), which recomputes it in backward instead
    per_token += b * s.r * len(adapted) if s.dtype != "float32" else 0
    # A and B cast to a 16-bit compute dtype are saved as such (fp32 adapters are used as they are)
    casts = sum(s.r * sum(shapes[n]) for n in adapted) * b if b < 4 else 0
    if s.method == "adapter":  # each bottleneck saves its input, the down-projection and the activation (m wide)
        places = 2 if s.peft.adapter.after == "both" else 1
        per_token += places * b * (D + 2 * s.peft.adapter.size)
    per_token += rescaling_bytes_per_token(s)
    return N * per_token + casts


def lora_targets(s: StepShape) -> tuple[str, ...]:
    """The layers that carry a LoRA-shaped adapter (A, B): none for IA3 and bottleneck adapters, whatever [lora]
    says (the virtual-token methods have no targets)."""
    return () if s.method in ("adapter", "ia3") else target_names(s.targets, bool(s.cfg.num_experts))


def rescaling_bytes_per_token(s: StepShape) -> int:
    """What DoRA and IA3 save per token and layer besides LoRA's terms, for their vectors' gradients: DoRA the
    direction x Wᵀ and the scaled branch s x_d Aᵀ Bᵀ of each adapted layer, both multiplied by g (and x_d Aᵀ
    itself in fp32, where LoRA's merged-weight path would not save it), and IA3 the output it scales (k / v)
    or the input (feed-forward); their own inputs stay saved where LoRA saves them."""
    cfg, b, shapes = s.cfg, s.b, linear_shapes(s.cfg)
    moe = bool(cfg.num_experts)
    if s.method == "dora":
        rank = s.r if s.dtype == "float32" else 0  # 16-bit: counted with LoRA's x_d Aᵀ
        return sum(b * (2 * shapes[n][0] + rank) for n in lora_targets(s))
    if s.method == "ia3":
        ff = set(target_names(s.peft.ia3.feedforward_modules, moe))
        scaled = target_names(s.peft.ia3.target_modules, moe)
        return sum(b * (shapes[n][1] if n in ff else shapes[n][0]) for n in scaled)
    return 0


def mlp_saved_per_token(s: StepShape) -> int:
    """Bytes the MLP saves for backward per token: the normed input for the gate / up adapters, gate(x) (SiLU's
    input), silu(gate(x)) and up(x) (the product's inputs), and the product for an adapted down projection."""
    b, adapted = s.b, lora_targets(s)
    I = active_intermediate(s.cfg)
    per_token = b * s.cfg.hidden_size if set(adapted) & {"gate_proj", "up_proj"} else 0
    return per_token + 3 * b * I + (b * I if "down_proj" in adapted else 0)


def active_intermediate(cfg) -> int:
    """The MLP width one token runs through: intermediate_size, or top-k experts of a mixture of experts."""
    return cfg.num_experts_per_tok * cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size


def dequant_bytes(out_features: int, in_features: int, b: int) -> int:
    """Bytes alive while one NF4 weight is dequantized to a b-byte dtype.

    With 64-value blocks and in_features a multiple of 64 one kernel writes the result directly (n b
    bytes: bitsandbytes' C++ kernel on a CPU, the Triton workspace on a GPU); otherwise the torch ops hold
    the fp32 levels and the fp32 product (8n bytes) plus the result in a narrower dtype.
    """
    from qtune.weights.nf4 import bnb_cpu_kernel_is_exact  # here: the estimator itself needs no torch

    n = out_features * in_features
    if bnb_cpu_kernel_is_exact((out_features, in_features), 64):
        return b * n
    return 8 * n + (b * n if b < 4 else 0)


def layer_transient_bytes(s: StepShape) -> int:
    """Short-lived buffers on top of what the layer saves: the larger of the two peaks inside a layer.

    Dequantizing a weight holds `dequant_bytes` (the largest over the layer's linears). The MLP backward
    peaks at six (N, I) tensors, saved or gradients: with an adapted down projection its saved input
    lives until the first gradient is formed, and two gradients join the four saved tensors; without it,
    three gradients join the three saved by SiLU and the product. A tiled MLP holds one chunk's saved tensors and
    gradients, recomputed in its backward; then an RMSNorm's backward may be the larger, with three fp32 (N, D)
    tensors (x r, the weighted gradient and their product, `RMSNormFn.backward`). DoRA's row norms
    ||W + s B A|| (outside autograd, every forward) hold W in fp32 (a copy unless the base is fp32 already),
    B A and s B A: up to 12 bytes per weight of the largest adapted linear.
    """
    dequant = max(dequant_bytes(o, i, s.b) for o, i in linear_shapes(s.cfg).values()) if s.quantize == "nf4" else 0
    gradients = 2 if "down_proj" in lora_targets(s) else 3
    mlp_backward = gradients * s.b * s.mlp_tokens * active_intermediate(s.cfg)
    if s.tiles:
        mlp_backward += s.mlp_tokens * mlp_saved_per_token(s)
    norm_backward = 3 * 4 * s.tokens * s.cfg.hidden_size
    dora_norm = 0
    if s.method == "dora":
        shapes, w_copy = linear_shapes(s.cfg), 0 if s.quantize == "none" and s.b == 4 else 4
        dora_norm = max((8 + w_copy) * math.prod(shapes[n]) for n in lora_targets(s))
    return max(dequant, mlp_backward, norm_backward, dora_norm)


def triton_loss_bytes(s: StepShape) -> int:
    """The loss on CUDA (kernels/triton/logprobs.py): the hidden states, their scored copy and the final norm's
    saved input in the compute dtype, and the forward's per-split statistics (4 fp32 per token and
    2048-column vocabulary split). Backward holds dL/dh in fp32, the logit gradients of one chunk of tokens
    (at most CE_CHUNK tokens x vocabulary in the compute dtype, bounded by LOGIT_GRAD_BYTES: 64 MB for Llama-3's
    128,256 words in bf16), that chunk's
    product with the lm_head and its fp32 copy, and at the end dL/dh cast to the compute dtype."""
    from qtune.kernels.logprobs import bounded_chunk  # here: the estimator itself needs no torch

    N, D, V, b = s.tokens, s.cfg.hidden_size, s.cfg.vocab_size, s.b
    chunk = min(N, bounded_chunk(CE_CHUNK, V, b))
    held = 3 * N * D * b
    forward = held + 4 * 4 * math.ceil(V / 2048) * N + 3 * 4 * N
    backward = held + N * D * 4 + chunk * V * b + chunk * D * (b + 4) + N * D * b
    return max(forward, backward)


def loss_bytes(s: StepShape) -> int:
    """The loss: the final norm's saved input, the hidden states and their scored copy, their fp32 copy,
    and the one-pass cross-entropy of a frozen lm_head (`cross_entropy_one_pass_torch`).

    Its forward holds one fp32 logit tile (1024 tokens x VOCAB_CHUNK columns, exponentiated in place; soft-capped
    logits add their derivative's tile) and the fp32 gradient being accumulated (N x D); at the end the target
    rows of the lm_head are gathered (in its dtype and in fp32) while the last tile is still referenced. Backward holds the saved
    gradient and its scaled copy (cast to a 16-bit compute dtype). A 16-bit lm_head slice is upcast to
    fp32 per vocabulary chunk.
    """
    from qtune.kernels.logprobs import VOCAB_CHUNK  # here: the estimator itself needs no torch

    if s.triton_loss:
        return triton_loss_bytes(s)
    N, D, b = s.tokens, s.cfg.hidden_size, s.b
    chunk = min(VOCAB_CHUNK, s.cfg.vocab_size)
    tile = min(N, CE_CHUNK) * chunk * 4 * (2 if s.cfg.final_logit_softcapping else 1)  # and Gemma 2's dc/dz tile
    widened = 4 if b < 4 else 0
    held = N * D * (b + widened + 2 * b + widened) + (4 * chunk * D if b < 4 else 0)
    grad = N * D * 4
    forward = held + grad + tile + N * D * (b + widened)
    backward = held + 2 * grad + N * D * (b if b < 4 else 0)
    return max(forward, backward)


def adapter_state_nbytes(s: StepShape) -> dict[str, int]:
    """The adapter's fp32 weights, gradients and optimizer state, whatever the method."""
    if s.method in VIRTUAL_METHODS:
        return virtual_state_nbytes(list(s.virtual_numels), s.optimizer)
    return lora_state_nbytes(s.cfg, s.r, s.targets, s.optimizer, s.method, s.peft)


def prefix_kv_bytes(s: StepShape) -> int:
    """Prefix tuning: the N prefix keys and values each layer's attention saves besides the tokens' own."""
    if s.method != "prefix":
        return 0
    return s.micro_batch_size * s.virtual_tokens * 2 * s.cfg.num_key_value_heads * s.cfg.head_dim * s.b


def resident_parts(s: StepShape) -> dict[str, int]:
    """Memory held for the whole run: weights, quantization constants, adapters, optimizer state."""
    p = param_counts(s.cfg)
    lora = adapter_state_nbytes(s)
    if s.quantize == "nf4":
        codes, consts = nf4_model_nbytes(s.cfg, s.double_quant)
        weights = codes + s.b * (p.total - p.linear)
    else:
        weights, consts = s.b * p.total, 0
    return {"weights": weights, "quant_constants": consts, "adapter_weights": lora["adapter_weights"],
            "optimizer_state": lora["optimizer_state"],
            "residual_pairs": residual_pair_nbytes(s.cfg, s.r, s.targets, s.init)}


def estimate(s: StepShape) -> Estimate:
    """The predicted peak of one steady-state training step and its parts.

    Three moments compete: the loss (every layer input still stored, the cross-entropy's buffers), the
    backward of the last layer (all checkpoints, few adapter gradients yet) and that of the first layer
    (one checkpoint left, the other layers' adapter gradients). The highest is the prediction.
    """
    cfg, N, b, L = s.cfg, s.tokens, s.b, s.cfg.num_hidden_layers
    resident = resident_parts(s)
    grads = adapter_state_nbytes(s)["adapter_grads"]
    boundary = N * cfg.hidden_size * b  # one layer's input
    last, first = (saved_activation_bytes(s, layer0) + prefix_kv_bytes(s) for layer0 in (False, True))
    if s.gradient_checkpointing and s.offload_checkpoints:
        # the layer being recomputed and the next one down, on its way back from the host
        stored, stored_first = 2 * boundary, boundary
        layers_before_loss = boundary  # the last layer's input, until its host copy is done
    elif s.gradient_checkpointing:
        stored, stored_first = L * boundary, boundary
        layers_before_loss = L * boundary
    else:
        # every layer's activations were saved in the forward; backward frees them from the last layer down
        stored, stored_first = (L - 1) * (last + boundary) + boundary, boundary
        layers_before_loss = first + (L - 1) * last + L * boundary
    flowing = N * cfg.hidden_size * 4  # the fp32 gradient of the hidden states entering a layer's backward
    candidates = {
        "loss": {"checkpoints": layers_before_loss, "loss": loss_bytes(s)},
        "last layer": {"checkpoints": stored, "layer_saved": last, "layer_transient": layer_transient_bytes(s),
                       "gradient_flow": flowing, "adapter_grads": grads // L},
        "first layer": {"checkpoints": stored_first, "layer_saved": first,
                        "layer_transient": layer_transient_bytes(s), "gradient_flow": flowing,
                        "adapter_grads": grads * (L - 1) // L},
    }
    where = max(candidates, key=lambda k: sum(candidates[k].values()))
    parts = {**resident, **candidates[where]}
    return Estimate(sum(parts.values()), parts, where, adapter_state_nbytes(s)["adapter_weights"] // 4)


def host_bytes(s: StepShape) -> int:
    """Pinned host memory the step needs: every layer's input when checkpoints are offloaded, else 0."""
    if not (s.gradient_checkpointing and s.offload_checkpoints):
        return 0
    return s.cfg.num_hidden_layers * s.tokens * s.cfg.hidden_size * s.b


def fit_budget(s: StepShape, budget_bytes: int, seq_lens=(256, 512, 1024, 2048, 4096, 8192),
               batch_sizes=(1, 2, 4, 8, 16, 32)) -> dict:
    """Under `budget_bytes`: the largest micro-batch at the recipe's sequence length, the longest sequence
    at its micro-batch, and whether gradient checkpointing is needed for the recipe as it is."""
    def peak(**changes) -> int:
        return estimate(StepShape(**{**s.__dict__, **changes})).peak_bytes

    fits = lambda **c: peak(**c) <= budget_bytes
    best_batch = max((m for m in batch_sizes if fits(micro_batch_size=m)), default=0)
    best_seq = max((t for t in seq_lens if fits(seq_len=t)), default=0)
    without = peak(gradient_checkpointing=False)
    return {"budget_bytes": budget_bytes, "fits": peak() <= budget_bytes,
            "max_micro_batch_size": best_batch, "max_seq_len": best_seq,
            "checkpointing_needed": without > budget_bytes, "peak_without_checkpointing": without}


def parse_size(text: str) -> int:
    """'8GB', '8 GiB', '7.5G', '24000MB' -> bytes (GB and GiB both mean 2^30, as GPU memory is quoted)."""
    t = text.strip().upper().replace(" ", "").removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    scale = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"memory size {text!r} is not a number with a unit, e.g. 8GB or 24000MB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value * scale)


def model_config_for(path: str, shape: str | None = None) -> ModelConfig:
    """The model shape: `shape` from SHAPES, else model.path's config.json, else a SHAPES name or alias."""
    if shape:
        return shape_config(shape)
    directory = Path(path).expanduser()
    if (directory / "config.json").exists():
        return ModelConfig.from_json(directory)
    name = directory.name.lower()
    if name in SHAPES:
        return shape_config(name)
    raise ValueError(f"model.path {path!r} is not a model directory with a config.json; give its shape with "
                     f"--shape (one of: {', '.join(SHAPES)})")


def step_shape_from_recipe(recipe, device: str = "cuda", shape: str | None = None) -> StepShape:
    """The StepShape a training recipe runs with on `device` ("cuda": bf16 compute and the Triton loss unless
    the recipe says kernels = "torch"; "cpu": fp32 and the plain-torch loss)."""
    m = recipe.model
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    targets, cfg = recipe.lora.target_modules, model_config_for(m.path, shape)
    peft, virtual = recipe.peft, {}
    r = peft.adalora.init_r if peft.method == "adalora" else recipe.lora.r
    init = recipe.lora.init if peft.method in ("lora", "dora") else "default"  # IA3 and the others read no lora.init
    if peft.method in VIRTUAL_METHODS:  # no LoRA layers: the virtual tokens and their encoder train instead
        targets, r = (), 0
        virtual = dict(virtual_numels=tuple(virtual_token_numels(cfg, peft)),
                       virtual_tokens=getattr(peft, peft.method).num_virtual_tokens)
    return StepShape(cfg, micro_batch_size=recipe.train.micro_batch_size,
                     seq_len=recipe.data.max_seq_len, dtype=dtype, r=r,
                     targets=targets if isinstance(targets, str) else tuple(targets), quantize=m.quantize,
                     double_quant=m.double_quant, gradient_checkpointing=m.gradient_checkpointing,
                     optimizer=recipe.train.optimizer, triton_loss=device == "cuda" and m.kernels != "torch",
                     method=peft.method, peft=peft, init=init, offload_checkpoints=recipe.train.offload_checkpoints,
                     tiled_mlp=recipe.train.tiled_mlp, **virtual)
