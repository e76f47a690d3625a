"""Model configuration: one small dataclass built from a checkpoint's own config.json.

Phi-2 (`model_type: phi`) and the Phi-3 family (`model_type: phi3`, which also covers
Phi-3.5, Phi-4-mini and Phi-4) differ in a handful of structural choices. Those choices are
written down once, in `LAYOUTS`, and the model code reads them from the config; nothing
else in phicore branches on `model_type`.

Two spellings of the rotary settings exist on the hub and are both accepted:
- legacy: top-level `rope_theta`, `partial_rotary_factor`, `rope_scaling` with a `type` of
  `su` / `longrope` / `yarn` (all meaning longrope for Phi-3),
- transformers 5: `rope_parameters` with `rope_type`, `rope_theta`, `partial_rotary_factor`,
  `short_factor`, `long_factor`, and optionally `factor` / `attention_factor`.

A config.json is checked once, when the `ModelConfig` is built (`__post_init__`): every field
must have its JSON type (an integer, not `"128"`; a bool, not `"false"`) and a usable value
(positive sizes, heads that divide the hidden size, token ids inside the vocabulary, finite
rotary settings). A bad one raises `ConfigError` naming the config.json field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .json_file import read_json

# Short names users type, mapped to Hugging Face hub ids.
PRESETS = {
    "phi-2": "microsoft/phi-2",
    "phi-3-mini-4k": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-128k": "microsoft/Phi-3-mini-128k-instruct",
    "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    "phi-3-medium-4k": "microsoft/Phi-3-medium-4k-instruct",
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "phi-4": "microsoft/phi-4",
}


@dataclass(frozen=True)
class Layout:
    """The structural choices that tell one Phi family apart from the other.

    Module names are Hugging Face's, so checkpoints and PEFT adapters map 1:1 onto ours.
    """

    norm: str  # "layernorm" (with bias) or "rmsnorm"
    parallel_block: bool  # Phi-2: attention and MLP both read the same normed input
    fused_qkv: bool  # Phi-3: one qkv_proj [Q | K | V]; Phi-2: q_proj, k_proj, v_proj
    gated_mlp: bool  # Phi-3: gate_up_proj (gate first) + SiLU; Phi-2: fc1 -> gelu_tanh -> fc2
    linear_bias: bool  # biases on attention and MLP projections
    lm_head_bias: bool
    attn_out_name: str  # "dense" (Phi-2) or "o_proj" (Phi-3)
    mlp_in_name: str  # "fc1" or "gate_up_proj"
    mlp_out_name: str  # "fc2" or "down_proj"
    final_norm_name: str  # "final_layernorm" or "norm"
    eps_key: str  # which config.json field holds the norm epsilon
    upcast_attention: bool  # Phi-2 overflows fp16 in QK^T: compute attention in fp32 then
    activations: tuple  # hidden_act spellings of the one activation the MLP computes


LAYOUTS = {
    "phi": Layout(
        norm="layernorm", parallel_block=True, fused_qkv=False, gated_mlp=False,
        linear_bias=True, lm_head_bias=True, attn_out_name="dense", mlp_in_name="fc1",
        mlp_out_name="fc2", final_norm_name="final_layernorm", eps_key="layer_norm_eps",
        upcast_attention=True, activations=("gelu_new", "gelu_pytorch_tanh"),
    ),
    "phi3": Layout(
        norm="rmsnorm", parallel_block=False, fused_qkv=True, gated_mlp=True,
        linear_bias=False, lm_head_bias=False, attn_out_name="o_proj", mlp_in_name="gate_up_proj",
        mlp_out_name="down_proj", final_norm_name="norm", eps_key="rms_norm_eps",
        upcast_attention=False, activations=("silu", "swish"),
    ),
}

_LONGROPE_ALIASES = {"longrope", "su", "yarn"}


class ConfigError(ValueError):
    """A config.json that phicore cannot build a model from: one line naming the field
    (messages start with "config.json: "; `from_file` puts the real path there)."""


# dataclass fields spelled differently in config.json (the rest use their own name)
_JSON_NAMES = {"rope_short_factor": "rope_scaling.short_factor", "rope_long_factor": "rope_scaling.long_factor",
               "rope_factor": "rope_scaling.factor", "rope_attention_factor": "rope_scaling.attention_factor"}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelConfig:
    """Everything the model code needs, with derived sizes filled in by `__post_init__`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    original_max_position_embeddings: Optional[int] = None
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_type: str = "default"  # "default" or "longrope"
    rope_short_factor: Optional[tuple] = None
    rope_long_factor: Optional[tuple] = None
    rope_factor: Optional[float] = None  # explicit `factor`; else max / original positions
    rope_attention_factor: Optional[float] = None  # explicit, else derived for longrope
    norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attention_dropout: float = 0.0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None  # int or list of ints, as in config.json
    pad_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None
    source: dict = field(default_factory=dict, repr=False)  # the config.json as read
    source_dir: Optional[str] = None  # folder (or hub id) the checkpoint came from

    def __post_init__(self):
        if not isinstance(self.model_type, str) or self.model_type not in LAYOUTS:
            raise ConfigError(
                f"config.json: model_type {self.model_type!r} is not supported "
                f"(phicore supports {sorted(LAYOUTS)})"
            )
        for name in _REQUIRED + ("max_position_embeddings",):
            self._positive_int(name)
        for name in ("num_key_value_heads", "head_dim", "original_max_position_embeddings", "sliding_window"):
            if getattr(self, name) is not None:  # None: derived below, or (sliding_window) no window
                self._positive_int(name)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"config.json: hidden_size {self.hidden_size} is not divisible by "
                                  f"num_attention_heads {self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.original_max_position_embeddings is None:
            self.original_max_position_embeddings = self.max_position_embeddings
        self._number("rope_theta", low=0.0)
        self._number("partial_rotary_factor", low=0.0, high=1.0, high_ok=True)
        self._number("norm_eps", low=0.0)
        for name in ("embd_pdrop", "resid_pdrop", "attention_dropout"):
            self._number(name, low=0.0, low_ok=True, high=1.0)
        for name in ("rope_factor", "rope_attention_factor"):
            if getattr(self, name) is not None:
                self._number(name, low=0.0)
        for name in ("tie_word_embeddings", "qk_layernorm"):
            if not isinstance(getattr(self, name), bool):
                self._refuse(name, "must be true or false")
        if self.hidden_act not in self.layout.activations:
            self._refuse("hidden_act", f"must be one of {', '.join(self.layout.activations)} for model_type "
                                       f"{self.model_type!r} (its MLP computes that activation)")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(f"config.json: head_dim {self.head_dim} x partial_rotary_factor "
                              f"{self.partial_rotary_factor} gives {self.rotary_dim} rotary dimensions; "
                              "it must be a positive even number")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            for token_id in (value if name == "eos_token_id" and isinstance(value, list) else [value]):
                if token_id is not None and (not _is_int(token_id) or not 0 <= token_id < self.vocab_size):
                    self._refuse(name, f"must be a token id in [0, vocab_size {self.vocab_size})")
        if self.rope_type == "longrope":
            half = self.rotary_dim // 2
            for name in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != half:
                    raise ConfigError(
                        f"config.json: longrope {name[5:]} must have rotary_dim/2 = {half} values, "
                        f"got {None if factors is None else len(factors)}"
                    )
                if not all(_is_number(f) and math.isfinite(f) and f > 0 for f in factors):
                    self._refuse(name, "must hold positive finite numbers")

    # ----- checks: one line naming the config.json field -----
    def _refuse(self, name: str, why: str):
        key = self.layout.eps_key if name == "norm_eps" else _JSON_NAMES.get(name, name)
        raise ConfigError(f"config.json: {key} {why}, got {getattr(self, name)!r}")

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < 1:
            self._refuse(name, "must be a positive integer")

    def _number(self, name: str, *, low: float, high: float = math.inf, low_ok: bool = False,
                high_ok: bool = False) -> None:
        """A finite number in (low, high) (brackets closed by low_ok / high_ok), stored as float."""
        value = getattr(self, name)
        if not _is_number(value) or not math.isfinite(value):
            self._refuse(name, "must be a finite number")
        above = value >= low if low_ok else value > low
        below = value <= high if high_ok else value < high
        if not (above and below):
            bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            self._refuse(name, f"must be in {bounds}")
        setattr(self, name, float(value))

    # ----- derived sizes -----
    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.model_type]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (GQA); 1 without GQA."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_scaling_factor(self) -> float:
        if self.rope_factor is not None:
            return float(self.rope_factor)
        return self.max_position_embeddings / self.original_max_position_embeddings

    @property
    def attention_scaling(self) -> float:
        """Multiplier applied to cos and sin. Longrope always applies it, short inputs too."""
        if self.rope_type != "longrope":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        factor = self.rope_scaling_factor
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    @property
    def eos_token_ids(self) -> list:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    # ----- construction -----
    @classmethod
    def from_dict(cls, raw: dict, source_dir: Optional[str] = None) -> "ModelConfig":
        """Build from a config.json dict in either the legacy or the transformers-5 form.
        Raises ConfigError naming the field that is missing, of the wrong type or out of range."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json: expected a JSON object, got a JSON {_json_kind(raw)}")
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in LAYOUTS:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported (phicore supports {sorted(LAYOUTS)})"
            )
        for key in _REQUIRED:
            if raw.get(key) is None:
                raise ConfigError(f"config.json: missing field {key!r}")
        rope = _read_rope(raw)
        layout = LAYOUTS[model_type]
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads"),
            head_dim=raw.get("head_dim"),
            max_position_embeddings=_or_default(raw.get("max_position_embeddings"), 2048),
            original_max_position_embeddings=_or_default(raw.get("original_max_position_embeddings"),
                                                         rope.get("original_max_position_embeddings")),
            rope_theta=_or_default(rope.get("rope_theta"), 10000.0),
            partial_rotary_factor=rope["partial_rotary_factor"],
            rope_type=rope["rope_type"],
            rope_short_factor=_tuple_or_none(rope.get("short_factor"), "rope_scaling.short_factor"),
            rope_long_factor=_tuple_or_none(rope.get("long_factor"), "rope_scaling.long_factor"),
            rope_factor=rope.get("factor"),
            rope_attention_factor=rope.get("attention_factor"),
            norm_eps=_or_default(raw.get(layout.eps_key), 1e-5),
            hidden_act=_or_default(raw.get("hidden_act"), layout.activations[0]),
            sliding_window=raw.get("sliding_window"),
            tie_word_embeddings=_or_default(raw.get("tie_word_embeddings"), False),
            qk_layernorm=_or_default(raw.get("qk_layernorm"), False),
            embd_pdrop=_or_default(raw.get("embd_pdrop"), 0.0),
            resid_pdrop=_or_default(raw.get("resid_pdrop"), 0.0),
            attention_dropout=_or_default(raw.get("attention_dropout"), 0.0),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            source=dict(raw),
            source_dir=source_dir,
        )

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        """Read and check a config.json; ConfigError (a ValueError) names the file and the field,
        FileNotFoundError a missing file."""
        path = Path(path)
        try:
            raw = read_json(path, ConfigError)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: not found (a model folder needs its config.json)") from None
        try:
            return cls.from_dict(raw, source_dir=str(path.parent))
        except ConfigError as err:
            raise ConfigError(str(err).replace("config.json", str(path), 1)) from None

    def to_hf_dict(self) -> dict:
        """The config.json to write next to saved weights: the hub's legacy form, which both
        transformers 4.x and 5.x read (transformers 5 converts it on load)."""
        layout = self.layout
        out = {
            "architectures": ["PhiForCausalLM" if self.model_type == "phi" else "Phi3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            layout.eps_key: self.norm_eps,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "embd_pdrop": self.embd_pdrop,
            "resid_pdrop": self.resid_pdrop,
            "attention_dropout": self.attention_dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype or "float32",
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        if self.model_type == "phi":
            out["qk_layernorm"] = self.qk_layernorm
        else:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
            out["sliding_window"] = self.sliding_window
        if self.rope_type == "longrope":
            scaling = {
                "type": "longrope",
                "short_factor": list(self.rope_short_factor),
                "long_factor": list(self.rope_long_factor),
            }
            if self.rope_factor is not None:
                scaling["factor"] = self.rope_factor
            if self.rope_attention_factor is not None:
                scaling["attention_factor"] = self.rope_attention_factor
            out["rope_scaling"] = scaling
        else:
            out["rope_scaling"] = None
        return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _or_default(value, default):
    """config.json's null means the default, as transformers reads it."""
    return default if value is None else value


def _json_kind(value) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _tuple_or_none(values, key: str):
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not all(_is_number(v) for v in values):
        raise ConfigError(f"config.json: {key} must be a list of numbers, got {values!r:.80}")
    return tuple(float(v) for v in values)


def _read_rope(raw: dict) -> dict:
    """Merge the legacy and transformers-5 spellings of the rotary settings into one dict
    with keys rope_type, rope_theta, partial_rotary_factor and the longrope fields."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
        raise ConfigError(f"config.json: {key} must be an object or null, got {rope!r:.80}")
    rope = dict(rope)
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if rope.get("partial_rotary_factor") is None:
        rope["partial_rotary_factor"] = 1.0
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if not isinstance(kind, str):
        raise ConfigError(f"config.json: rope_scaling.type must be a string, got {kind!r:.80}")
    if kind in _LONGROPE_ALIASES:
        kind = "longrope"
    elif kind != "default":
        raise ConfigError(f"config.json: rope type {kind!r} is not supported (default or longrope)")
    rope["rope_type"] = kind
    return rope
