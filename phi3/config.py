"""`Phi3Config`: the model's hyper-parameters, in the checkpoint's own (Hugging Face) field names.

Read from `config.json` (or GGUF metadata, see `phi3.gguf`). Unknown keys are ignored, except
`quantization`, which a quantized checkpoint records so that loading can build its packed modules
before the weights arrive; known keys are validated, and every error names the field and the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

# Architectures whose tensors map onto this model: Phi-3 itself, and Llama (separate q/k/v and
# gate/up, fused on load). Everything else is refused by name.
SUPPORTED_MODEL_TYPES = ("phi3", "llama")
_ROPE_ALIASES = {"su": "longrope", "longrope": "longrope", "yarn": "longrope", "default": None}


class ConfigError(ValueError):
    """A config that cannot describe a model this engine runs."""


@dataclass
class Phi3Config:
    model_type: str = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Normalised to None (plain RoPE) or {"type": "longrope", "short_factor": [...],
    # "long_factor": [...], optional "attention_factor", "factor"}.
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    quantization: dict | None = None  # the scheme of a quantized checkpoint (see phi3.quantize)
    source: str = field(default="<dict>", repr=False, compare=False)  # where it was read from

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.original_max_position_embeddings is None:
            self.original_max_position_embeddings = self.max_position_embeddings
        self._validate()

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def is_longrope(self) -> bool:
        return self.rope_scaling is not None

    def num_parameters(self) -> int:
        """Parameters of the model this config describes (embeddings and lm_head counted once each)."""
        h, L = self.hidden_size, self.num_hidden_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h  # qkv_proj, o_proj
        per_layer += 3 * h * self.intermediate_size + 2 * h  # gate_up, down, two norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + L * per_layer + h + head

    def kv_cache_bytes(self, tokens: int, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes * tokens

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Phi3Config":
        """Build from a `config.json`-style dict; accepts `rope_scaling` or `rope_parameters`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}; Phi-3-small is 'phi3small', a different architecture)"
            )
        known = {f.name for f in fields(cls)} - {"source", "rope_scaling", "rope_theta", "partial_rotary_factor"}
        kwargs: dict[str, Any] = {k: d[k] for k in known if k in d}
        if "torch_dtype" not in d and isinstance(d.get("dtype"), str):
            kwargs["torch_dtype"] = d["dtype"]
        rope = _rope_from(d, source)
        kwargs.update(rope)
        try:
            return cls(**kwargs, source=source)
        except TypeError as e:  # a field of the wrong type that arithmetic tripped over
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Phi3Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; a model directory needs config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    # -- validation ------------------------------------------------------------------------------
    def _validate(self) -> None:
        def fail(field_name: str, why: str) -> None:
            raise ConfigError(f"{self.source}: field {field_name!r} {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                 f"({self.num_attention_heads})")
        if self.hidden_act != "silu":
            fail("hidden_act", f"is {self.hidden_act!r}; only 'silu' is supported")
        if self.attention_bias or self.mlp_bias:
            fail("attention_bias", "is true; Phi-3 and Llama checkpoints this engine runs have no biases")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            fail("rms_norm_eps", f"must be a small positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            fail("rope_theta", f"must be positive, got {self.rope_theta!r}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            fail("partial_rotary_factor", f"{self.partial_rotary_factor} gives an odd or empty rotary dim")
        if self.quantization is not None and not isinstance(self.quantization, dict):
            fail("quantization", f"must be an object or null, got {self.quantization!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            fail("sliding_window", f"must be a positive integer or null, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            for key in ("short_factor", "long_factor"):
                factors = self.rope_scaling.get(key)
                if factors is None and self.rope_scaling.get("partial"):
                    continue  # a shape-only preset (see presets/): running it needs the real config
                if (not isinstance(factors, list) or len(factors) != self.rotary_dim // 2
                        or not all(isinstance(x, (int, float)) and x > 0 for x in factors)):
                    n = len(factors) if isinstance(factors, list) else factors
                    fail(f"rope_scaling.{key}", f"must be {self.rotary_dim // 2} positive numbers "
                         f"(rotary dim / 2), got {n}")


def _rope_from(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalise old (`rope_scaling`, `rope_theta`) and new (`rope_parameters`) rope fields."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    out: dict[str, Any] = {}
    theta = d.get("rope_theta")
    prf = d.get("partial_rotary_factor")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        prf = params.get("partial_rotary_factor", prf)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = params
        if params.get("original_max_position_embeddings") and "original_max_position_embeddings" not in d:
            out["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    elif params is not None:
        raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {params!r}")
    if theta is not None:
        out["rope_theta"] = theta
    if prf is not None:
        out["partial_rotary_factor"] = prf
    if scaling is None:
        return out
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: field 'rope_scaling' must be an object or null, got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in _ROPE_ALIASES:
        raise ConfigError(f"{source}: field 'rope_scaling.type' is {kind!r}; supported: su, longrope (and default)")
    if _ROPE_ALIASES[kind] is None:
        return out
    out["rope_scaling"] = {"type": "longrope", **{k: scaling[k] for k in
                           ("short_factor", "long_factor", "attention_factor", "factor", "partial")
                           if scaling.get(k) is not None}}
    return out


# -- presets -------------------------------------------------------------------------------------
PRESETS = ("phi-3-mini-128k-instruct", "phi-3-mini-4k-instruct", "phi-3.5-mini-instruct",
           "phi-3-medium-4k-instruct", "phi-3-medium-128k-instruct")


def preset(name: str) -> Phi3Config:
    """The published config of a named model (shapes and RoPE), without any weights.

    `phi-3-medium-128k-instruct` is shape-only: its short RoPE factors were not available when
    the preset was written, so running it needs the checkpoint's own config.json.
    """
    key = name.lower().removeprefix("microsoft/")
    if key not in PRESETS:
        raise ConfigError(f"no preset named {name!r}; known: {', '.join(PRESETS)}")
    folder = resources.files("phi3") / "presets"
    if key == "phi-3-medium-128k-instruct":
        partial = json.loads((folder / f"{key}.PARTIAL.json").read_text())
        full = json.loads((folder / "phi-3-medium-4k-instruct.json").read_text())
        full.update({k: partial[k] for k in ("max_position_embeddings", "original_max_position_embeddings",
                                             "pad_token_id")})
        full["sliding_window"] = None
        full["rope_scaling"] = {"type": "longrope", "long_factor": partial["rope_scaling"]["long_factor"],
                                "partial": True}
        return Phi3Config.from_dict(full, source=f"preset {key}")
    data = json.loads((folder / f"{key}.json").read_text())
    return Phi3Config.from_dict(data, source=f"preset {key}")


def longrope_attention_factor(config: Phi3Config) -> float:
    """The cos/sin scale of LongRoPE: sqrt(1 + ln(s) / ln(original)), s = max / original."""
    scaling = config.rope_scaling or {}
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    s = scaling.get("factor") or config.max_position_embeddings / config.original_max_position_embeddings
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(config.original_max_position_embeddings))
