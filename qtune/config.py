"""Model configuration, read from a Hugging Face `config.json`.

One dataclass covers the Llama family: Llama-2, Llama-3/3.1, Mistral, SmolLM2 and Qwen2. Fields keep
Hugging Face's names so a `config.json` maps onto them one to one. `SHAPES` names the shapes of public
checkpoints (one line each) so the memory planner can size a model without its files.
"""

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Llama-family shapes of public checkpoints (their config.json), one line each.
SHAPES: dict[str, dict] = {
    "llama2-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0, "max_position_embeddings": 4096},
    "llama2-13b": {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "rope_theta": 10000.0, "max_position_embeddings": 4096},
    "llama3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "mistral-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "smollm2-360m": {"vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True},
}


class ConfigError(ValueError):
    """A config.json that qtune cannot use; the message names the file and the field."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias) put a bias on q, k, v
    o_bias: bool = False  # Llama's attention_bias also covers o_proj
    sliding_window: int | None = None  # Mistral v0.1 attends to at most this many past tokens
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict, repr=False)  # the rest of config.json, written back unchanged

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json; errors name `source` and the offending field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of model settings, got {type(d).__name__} {d!r:.60}")
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise ConfigError(f"{source}: field {key!r} is missing or not a positive integer (found {d.get(key)!r})")
        for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
            if d.get(key) is not None and (not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] <= 0):
                raise ConfigError(f"{source}: field {key!r} must be a positive integer or absent (found {d[key]!r})")
        eps = d.get("rms_norm_eps", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ConfigError(f"{source}: field 'rms_norm_eps' must be a small positive number (found {eps!r})")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope_theta, rope_scaling = _rope_fields(d, source)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported (no Llama-family checkpoint uses it)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu', the SwiGLU MLP)")
        window = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        known = {f.name for f in fields(cls)} | {"attention_bias", "num_key_value_heads", "rope_parameters",
                                                 "use_sliding_window", "dtype"}
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=rope_theta,
            rope_scaling=rope_scaling, max_position_embeddings=d.get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, o_bias=o_bias,
            sliding_window=window, model_type=model_type, bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_json(path, ConfigError, "no config.json here; a model directory needs config.json and *.safetensors")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """A Hugging Face config.json dict (what `qtune merge` / `qtune quantize` write)."""
        d = dict(self.extra)
        d.update(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        d.setdefault("architectures", [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                        "qwen2": "Qwen2ForCausalLM"}[self.model_type]])
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        return d


def _positive_number(value, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{source}: field {key!r} must be a positive number (found {value!r})")
    return float(value)


def _rope_fields(d: dict, source: str) -> tuple[float, dict | None]:
    """RoPE base and scaling from either the classic fields or the newer `rope_parameters` dict."""
    params = d.get("rope_parameters")
    if isinstance(params, dict):
        theta = _positive_number(params.get("rope_theta", d.get("rope_theta", 10000.0)), source, "rope_theta")
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = _positive_number(d.get("rope_theta", 10000.0), source, "rope_theta")
        scaling = d.get("rope_scaling")
    if scaling:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object such as {{\"rope_type\": \"linear\", "
                              f"\"factor\": 2.0}}, or null (found {scaling!r:.60})")
        for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
            if key in scaling:
                _positive_number(scaling[key], source, f"rope_scaling.{key}")
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    return theta, scaling or None


def shape_config(name: str) -> ModelConfig:
    """The ModelConfig of a named shape in SHAPES (e.g. "llama2-7b")."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    d = {"model_type": "llama", **SHAPES[name]}
    return ModelConfig.from_dict(d, source=f"shape {name!r}")


def read_json(path: Path, error: type[Exception], missing: str):
    """The parsed JSON file `path`; `error` naming the file when it is absent (`missing` says what belongs
    there) or is not valid JSON."""
    if not path.exists():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
