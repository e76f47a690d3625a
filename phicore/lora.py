"""LoRA and DoRA adapters over frozen linear layers, saved and loaded in PEFT's format.

A LoRA layer IS its base layer with an adapter added: `LoRALinear(LoRAMixin, nn.Linear)`.
The base keeps its parameters under their own names (`q_proj.weight`, `q_proj.bias`), so a
base checkpoint loads into a LoRA model unchanged, and the adapter adds
`q_proj.lora_A.weight` (r, in), `q_proj.lora_B.weight` (out, r) and, for DoRA,
`q_proj.lora_magnitude_vector` (out,). Any other frozen linear works the same way:
`lora_class_for(NF4Linear)` builds `LoRANF4Linear(LoRAMixin, NF4Linear)` on demand; all the
mixin needs from a base is `forward(x)`, `in_features`, `out_features`, `bias`, and either a
dense `weight` or a `dequantize()` that returns one.

    y = base(x) + s * B(A(dropout(x)))          s = alpha / r   (alpha / sqrt(r) with rsLoRA)

DoRA (Liu et al. 2024) rescales each output row of the adapted weight to a learned magnitude
m: W' = m / ||W + s*B@A||_row * (W + s*B@A), the norm detached from the graph (section 4.3 of
the paper), computed exactly as peft 0.21 does (`peft/tuners/lora/variants.py`, `dora.py`).

On disk (peft 0.21, adapter name stripped):
    adapter_model.safetensors  metadata {"format": "pt"},
        base_model.model.<module path>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector
    adapter_config.json        LoraConfig's fields, peft_type "LORA", task_type "CAUSAL_LM"

Training runs through one autograd node, `LoRALinearFunction` (x @ A^T first, added onto the
base output in place; saves x, the dropout mask, x @ A^T and A, B, never a dense copy of a
quantised weight); DoRA, inference and trainable bases take the reference path of separate ops.
`set_fused_lora(False)` forces the reference path everywhere.

Model-agnostic: it works on any nn.Module tree of linear layers, named as the adapter expects.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .weights import atomic_save_safetensors, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> base model nesting
ALL_LINEAR = "all-linear"
NEVER_TARGETED = "lm_head"
# The PEFT release whose adapter files these follow (its LoraConfig fields are written below,
# and tests/test_lora.py checks the files against the installed peft both ways).
PEFT_FORMAT_VERSION = "0.21.2"
ADAPTER_NAME = "default"  # PEFT's adapter name, stripped in files, present in in-memory keys

Targets = Union[str, Sequence[str], "re.Pattern[str]"]


# ----------------------------------------------------------------------------- the layer
class LoRAMixin:
    """Adds a LoRA (optionally DoRA) adapter to a linear base class.

    Concrete classes put the mixin first: `class LoRALinear(LoRAMixin, nn.Linear)`, so
    `super().forward(x)` is the base layer's forward. Build one directly
    (`LoRALinear(64, 32, r=8, alpha=16)`) or convert an existing layer with `add_lora`.

    Per-layer state: `r`, `lora_alpha`, `scaling`, `use_rslora`, `use_dora`, `merged` (the
    adapter is folded into `weight`), `adapter_enabled` (False: forward is the base alone).
    """

    def __init__(self, *args, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False, lora_dtype: Optional[torch.dtype] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_lora(r, alpha, dropout, use_rslora, use_dora, lora_dtype)

    def _init_lora(self, r, alpha, dropout, use_rslora, use_dora, dtype) -> None:
        """Freeze the base, add the adapter modules, initialise them as PEFT does."""
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        for param in self.parameters():  # only the base's exist yet
            param.requires_grad_(False)
        device = _device_of(self)
        dtype = dtype or torch.float32
        self.r = r
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.adapter_enabled = True
        self._dora_merge_factor = None  # m / ||W + dW|| at merge time, to undo the merge
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        for module in (self.lora_dropout, self.lora_A, self.lora_B):
            module.train(self.training)  # new modules start in train mode; follow the layer's mode
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (so the adapter starts as a no-op);
        DoRA's magnitude = row norms of W + s*B@A (= ||W|| row-wise, as B = 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            weight = self._dense_weight().to(self.lora_A.weight.dtype)
            self.lora_magnitude_vector.copy_(self._dora_weight_norm(weight))

    def _dense_weight(self) -> torch.Tensor:
        """The base weight (out, in) as a dense float tensor: `dequantize()` when the base has
        one (a quantised base such as NF4Linear), else `weight`."""
        dequantize = getattr(self, "dequantize", None)
        return dequantize() if callable(dequantize) else self.weight

    def _dora_weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s * B@A|| per output row (out,), no gradient through B@A (PEFT's get_weight_norm)."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach().to(weight.dtype)  # (out, in)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if not self.merged and self.adapter_enabled and self._fused_applies(x):
            return LoRALinearFunction.apply(x, self.lora_A.weight, self.lora_B.weight, self,
                                            self._active_dropout_p())
        result = super().forward(x)  # (..., out), the frozen base
        if self.merged:
            if not self.adapter_enabled:
                raise RuntimeError("LoRA adapter disabled while merged into the weight: call unmerge() first "
                                   "(disable_adapter(model) does this for you)")
            return result
        if not self.adapter_enabled:
            return result
        x = x.to(self.lora_A.weight.dtype)  # the adapter runs in its own dtype, as in PEFT
        if self.use_dora:
            return self._dora_forward(x, result)
        xa = self.lora_A(self.lora_dropout(x))  # (..., r): the rank-r product first
        if result.dtype != xa.dtype:  # e.g. a bf16 base under an fp32 adapter: add in fp32, round once (PEFT)
            return (result + self.lora_B(xa) * self.scaling).to(result.dtype)
        # result + s * xa @ B^T as one GEMM with the add and scale fused (performance.md, LoRA order).
        # B in xa's dtype: under autocast xa is already half precision and the in-place addmm_ is
        # not autocast itself (the cast is a no-op otherwise).
        lora_b = self.lora_B.weight.to(xa.dtype).t()  # (r, out)
        result_2d, xa_2d = result.reshape(-1, self.out_features), xa.reshape(-1, self.r)  # (N, out), (N, r)
        if result.is_contiguous() and not result._is_view():
            # in place, no (N, out) temporary: autograd-safe, as the base's backward needs its input
            # and weight, never its output. Not on a view: autograd forbids modifying a view that a
            # custom Function returned (NF4Linear's output, with a bias and a 3-D input, is one).
            result_2d.addmm_(xa_2d, lora_b, alpha=self.scaling)
            return result
        return torch.addmm(result_2d, xa_2d, lora_b, alpha=self.scaling).view(result.shape)

    # -- the fused path (LoRALinearFunction)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base layer alone: x (..., in) -> (..., out)."""
        return super().forward(x)

    def _active_dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) and self.training else 0.0

    def _fused_applies(self, x: torch.Tensor) -> bool:
        """Whether forward takes LoRALinearFunction: while training the adapter (autograd on), plain
        LoRA (DoRA keeps the reference path), and a frozen base computing x @ W^T + b, W being
        `weight` (an nn.Linear) or `dequantize()` (a quantised base)."""
        if not (_FUSED_LORA and torch.is_grad_enabled() and not self.use_dora):
            return False
        if not (self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad or x.requires_grad):
            return False
        base = _base_class(type(self))
        if not (base is nn.Linear or callable(getattr(self, "dequantize", None))):
            return False
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (weight, bias))

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + (m/||W + sBA|| - 1) * x W^T + (m/||W + sBA||) * s * B(A(x)), as PEFT computes it."""
        result_dtype = result.dtype
        weight = self._dense_weight().to(x.dtype)  # (out, in)
        weight_norm = self._dora_weight_norm(weight).detach()  # (out,)
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)  # (1, out)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self, "bias", None)
            base_result = result - bias if bias is not None else result  # x W^T
        else:  # dropout changes x, so the base product is recomputed on the dropped-out input
            x = self.lora_dropout(x)
            base_result = F.linear(x, weight)
        lora_result = self.lora_B(self.lora_A(x))
        result = result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling)
        return result.to(result_dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A (out, in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _mergeable_weight(self) -> nn.Parameter:
        weight = getattr(self, "weight", None)
        if callable(getattr(self, "dequantize", None)) or not (
            isinstance(weight, torch.Tensor) and weight.is_floating_point()
        ):
            raise TypeError(
                f"cannot merge a LoRA adapter into {_base_class(type(self)).__name__}: its weight is quantised, "
                "not a dense float tensor; keep the adapter separate, or load the base unquantised to merge"
            )
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W += s*B@A (DoRA: W = m/||W + s*B@A|| * (W + s*B@A)).
        Idempotent: merging a merged layer changes nothing. Computed in fp32, stored in W's dtype."""
        if self.merged:
            return
        weight = self._mergeable_weight()
        w, delta = weight.float(), self.delta_weight()
        if self.use_dora:
            factor = self.lora_magnitude_vector.float() / torch.linalg.norm(w + delta, dim=1)  # (out,)
            self._dora_merge_factor = factor
            new = factor.view(-1, 1) * (w + delta)
        else:
            new = w + delta
        weight.copy_(new)  # in place: the same Parameter, so optimisers and ties still hold it
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()` (up to rounding). A no-op on a layer that is not merged."""
        if not self.merged:
            return
        weight = self._mergeable_weight()
        w, delta = weight.float(), self.delta_weight()
        if self.use_dora:
            new = w / self._dora_merge_factor.to(w.device).view(-1, 1) - delta
            self._dora_merge_factor = None
        else:
            new = w - delta
        weight.copy_(new)
        self.merged = False

    def adapter_parameters(self) -> dict:
        """The adapter's tensors by their names inside this layer (the state-dict suffixes)."""
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def extra_repr(self) -> str:
        extra = f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
        if self.use_rslora:
            extra += ", rslora"
        if self.use_dora:
            extra += ", dora"
        if self.merged:
            extra += ", merged"
        return f"{super().extra_repr()}, {extra}"


# ----------------------------------------------------------------------------- fused forward/backward
_FUSED_LORA = True


def set_fused_lora(enabled: bool) -> bool:
    """Switch the fused LoRA path (LoRALinearFunction) on or off for every layer; returns the
    previous setting. Off: the reference path of autograd over the separate ops (always used for
    DoRA, inference and trainable bases)."""
    global _FUSED_LORA
    previous, _FUSED_LORA = _FUSED_LORA, bool(enabled)
    return previous


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class LoRALinearFunction(torch.autograd.Function):
    """y = base(x) + s * (drop(x) @ A^T) @ B^T as one autograd node, for a frozen linear base.

    Why: autograd over the separate ops keeps, besides x, dtype-cast copies of x and of the
    frozen weight under autocast (one bf16 W per layer per step when the base is fp32), dropout's
    output and its mask, and sums two (N, in) input gradients. This node keeps one (N, in)
    tensor (x itself; under autocast its half-precision cast, dropped out), the dropout mask
    (1 byte per element, only while dropout is active), x @ A^T (N x r) and A, B. The frozen
    base's backward needs no activation: its weight is a Parameter, or NF4 bytes dequantised
    again in backward, so no dense copy of a quantised weight is ever kept.

    Forward, with x2 = x as (N, in), s the scaling, m the dropout mask, p its rate:
        y  = base(x)                               (the layer's own forward, autocast included)
        xd = x2 * m / (1 - p)                      (or x2 without dropout), in the adapter's dtype
        xa = xd @ A^T                              (N, r): the rank-r product first
        y += s * xa @ B^T                          (addmm_ in place when dtypes agree)
    Backward, g = dL/dy as (N, out), gs = s * g @ B (N, r):
        dL/dB = s * g^T @ xa                       (out, r)
        dL/dA = gs^T @ xd                          (r, in)
        dL/dx = g @ W + (gs @ A) * m / (1 - p)     (W: dense or dequantised; addmm_ in place
                                                    onto g @ W when there is no dropout)
    Dtypes as the reference path: the LoRA matmuls run in the autocast dtype under autocast,
    else in the adapter's; g @ W in the base's compute dtype; results cast back to each input's.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, layer, dropout_p: float):
        # x (..., in), lora_a (r, in), lora_b (out, r)
        out_features = lora_b.shape[0]
        scaling = layer.scaling
        autocast = _autocast_dtype(x.device.type)
        result = layer._base_forward(x)  # (..., out)
        lora_dtype = autocast or lora_a.dtype
        a, b = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
        x_lora = x.reshape(-1, x.shape[-1])  # (N, in)
        mask = None
        if dropout_p > 0:  # in the adapter's dtype, as the reference path drops out
            x_lora, mask = torch.native_dropout(x_lora.to(lora_a.dtype), dropout_p, True)  # F.dropout's draws
        x_lora = x_lora.to(lora_dtype)  # (N, in): what multiplies A (a direct cast rounds as two would)
        xa = x_lora @ a.t()  # (N, r)
        result_2d = result.reshape(-1, out_features)  # (N, out): a view when result is contiguous
        if result_2d.dtype == lora_dtype:
            result_2d.addmm_(xa, b.t(), alpha=scaling)
        else:  # e.g. a bf16 base under an fp32 adapter: add in the wider dtype, round once
            result_2d = (result_2d + (xa @ b.t()) * scaling).to(result.dtype)
        # dA needs the adapter's input; the frozen base's backward needs no x at all. Without
        # autocast keep x itself (no copy; the dropped-out input is rebuilt exactly from the mask);
        # under autocast keep the half-precision input A multiplied (as autograd would).
        ctx.saved_lora_input = autocast is not None
        ctx.save_for_backward(x_lora if ctx.saved_lora_input else x, mask, xa, a, b)
        del x_lora
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.layer, ctx.dropout_p, ctx.scaling = layer, dropout_p, scaling
        base_dtype = getattr(layer, "compute_dtype", None) or result.dtype
        ctx.base_dtype, ctx.lora_a_dtype, ctx.lora_b_dtype = autocast or base_dtype, lora_a.dtype, lora_b.dtype
        return result_2d.view(result.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, xa, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        s = ctx.scaling
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        g_lora = g.to(a.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = (g_lora.t() @ xa).mul_(s).to(ctx.lora_b_dtype)  # (out, r)
        gs = (g_lora @ b).mul_(s)  # (N, r)
        if need_a:
            if ctx.saved_lora_input:
                xd = x  # (N, in), dropped out and cast in forward
            else:
                xd = x.reshape(-1, x.shape[-1]).to(ctx.lora_a_dtype)  # (N, in)
                if mask is not None:
                    xd = xd * mask * (1.0 / (1.0 - ctx.dropout_p))
            grad_a = (gs.t() @ xd.to(a.dtype)).to(ctx.lora_a_dtype)  # (r, in)
            del xd
        if need_x:
            weight = ctx.layer._dense_weight().to(ctx.base_dtype)  # (out, in), dequantised here for NF4
            grad_x = g.to(ctx.base_dtype) @ weight  # (N, in)
            del weight
            if mask is None and grad_x.dtype == a.dtype == ctx.x_dtype:
                grad_x.addmm_(gs, a)
            else:
                grad_lora = gs @ a  # (N, in)
                if mask is not None:
                    grad_lora = grad_lora.mul_(mask).mul_(1.0 / (1.0 - ctx.dropout_p))
                grad_x = grad_x.to(ctx.x_dtype) + grad_lora.to(ctx.x_dtype)
            grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None


class LoRALinear(LoRAMixin, nn.Linear):
    """nn.Linear with a LoRA adapter."""


# base class -> its LoRA class; others are built on first use by lora_class_for
_LORA_CLASSES: dict = {nn.Linear: LoRALinear}


def lora_class_for(base_cls: type) -> type:
    """The LoRA class for a base linear class: `LoRA<Name>(LoRAMixin, base_cls)`, built once."""
    if issubclass(base_cls, LoRAMixin):
        raise TypeError(f"{base_cls.__name__} already carries a LoRA adapter")
    cls = _LORA_CLASSES.get(base_cls)
    if cls is None:
        cls = type("LoRA" + base_cls.__name__, (LoRAMixin, base_cls), {"__module__": __name__})
        _LORA_CLASSES[base_cls] = cls
    return cls


def _base_class(lora_cls: type) -> type:
    """The base linear class of a LoRA class (the class after LoRAMixin in its MRO)."""
    mro = lora_cls.__mro__
    return mro[mro.index(LoRAMixin) + 1]


def is_lora_base(module: nn.Module) -> bool:
    """A layer LoRA can adapt: an nn.Linear, or a frozen quantised linear offering dequantize()."""
    if isinstance(module, LoRAMixin):
        return False
    if isinstance(module, nn.Linear):
        return True
    return callable(getattr(module, "dequantize", None)) and hasattr(module, "in_features") \
        and hasattr(module, "out_features")


def add_lora(module: nn.Module, *, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
             use_dora: bool = False, dtype: Optional[torch.dtype] = None) -> LoRAMixin:
    """Turn a linear layer into its LoRA class in place and return it (the same object).

    The layer's class is swapped (`module.__class__ = LoRALinear`), the technique
    torch.nn.utils.parametrize uses: the object, its base Parameters and every reference to
    it stay as they are, so nothing is re-allocated or copied (an NF4 base stays packed) and
    the parent module needs no update. Then the adapter is added and the base frozen.
    """
    if not is_lora_base(module):
        raise TypeError(f"cannot add LoRA to {type(module).__name__}: not a linear layer")
    module.__class__ = lora_class_for(type(module))
    module._init_lora(r, alpha, dropout, use_rslora, use_dora, dtype)
    return module


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- model level
def lora_layers(model: nn.Module) -> Iterator:
    """(module path, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAMixin):
            yield name, module


def _parse_targets(targets: Targets):
    """"all-linear", a compiled regex, or a list of module-name suffixes (from a list or a
    comma-separated string)."""
    if isinstance(targets, re.Pattern):
        return targets
    if isinstance(targets, str):
        if targets.strip().lower() == ALL_LINEAR:
            return ALL_LINEAR
        targets = targets.split(",")
    names = [t.strip() for t in targets if t and t.strip()]
    if not names:
        raise ValueError("no LoRA target modules given")
    return sorted(set(names))


def _output_embedding(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _resolve_targets(model: nn.Module, targets: Targets) -> tuple:
    """Find the layers to adapt. Returns ([(path, module)], target_modules as saved).

    Names match PEFT's rules: a name matches a module whose path equals it or ends with
    "." + name; a regex must match the whole path. lm_head is never adapted.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already has LoRA layers; apply or load an adapter on a fresh model")
    parsed = _parse_targets(targets)
    output_embedding = _output_embedding(model)

    def never(path, module):  # lm_head, or whatever the model names as its output head
        is_head = output_embedding is not None and module is output_embedding
        return is_head or path.rpartition(".")[2] == NEVER_TARGETED

    modules = [(path, m) for path, m in model.named_modules() if path]
    linear = [(path, m) for path, m in modules if is_lora_base(m) and not never(path, m)]
    available = ", ".join(sorted({path.rpartition(".")[2] for path, _ in linear})) or "none"

    if parsed == ALL_LINEAR:
        if not linear:
            raise ValueError("all-linear: the model has no linear layers to adapt")
        short = sorted({path.rpartition(".")[2] for path, _ in linear})
        # save the short names when they select exactly these layers, else the full paths (as PEFT)
        chosen = {path for path, _ in linear}
        by_suffix = {path for path, _ in modules if any(_name_matches(path, s) for s in short)}
        return linear, short if by_suffix == chosen else sorted(chosen)

    if isinstance(parsed, re.Pattern):
        selected = [(path, m) for path, m in modules if parsed.fullmatch(path)]
        saved = parsed.pattern
        if not selected:
            raise ValueError(f"LoRA target pattern {parsed.pattern!r} matches no module; "
                             f"linear layers in this model: {available}")
    else:
        selected, saved = [], parsed
        for name in parsed:
            found = [(path, m) for path, m in modules if _name_matches(path, name)]
            if not found:
                raise ValueError(f"LoRA target {name!r} matches no module; linear layers in this model: "
                                 f"{available} ({NEVER_TARGETED} is never targeted)")
            selected += found
        selected = list({path: (path, m) for path, m in selected}.values())
    for path, module in selected:
        if never(path, module):
            raise ValueError(f"LoRA target {path!r} is the output head ({NEVER_TARGETED}), which is never adapted")
        if not is_lora_base(module):
            raise ValueError(f"LoRA target {path!r} is a {type(module).__name__}, not a linear layer; "
                             f"linear layers in this model: {available}")
    return sorted(selected, key=lambda item: item[0]), saved


def _name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05, targets: Targets = ALL_LINEAR,
               use_rslora: bool = False, use_dora: bool = False, dtype: Optional[torch.dtype] = None, *,
               rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None) -> nn.Module:
    """Add LoRA adapters to the model's target layers, in place; freeze everything else.

    targets: "all-linear" (every linear layer but lm_head), module-name suffixes as a list or
        a comma-separated string ("q_proj,k_proj,v_proj,dense,fc1,fc2" for Phi-2,
        "qkv_proj,o_proj,gate_up_proj,down_proj" for Phi-3), or a compiled regex matched
        against whole module paths (PEFT's meaning of a string target_modules).
    dtype: the adapter's dtype (default fp32, whatever the base's).
    rank_pattern / alpha_pattern: PEFT's per-module overrides {regex on the path end: value}.
    The settings are recorded as `model.lora_config` (PEFT field names) for save_adapter.
    """
    selected, target_modules = _resolve_targets(model, targets)
    _apply(model, selected, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
           dtype=dtype, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model.lora_config = {
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_modules,
        "use_rslora": use_rslora, "use_dora": use_dora,
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
    }
    return model


def _apply(model, selected, *, r, alpha, dropout, use_rslora, use_dora, dtype, rank_pattern, alpha_pattern):
    for path, module in selected:
        add_lora(module, r=_pattern_value(rank_pattern, path, r), alpha=_pattern_value(alpha_pattern, path, alpha),
                 dropout=dropout, use_rslora=use_rslora, use_dora=use_dora, dtype=dtype)
    set_adapter_trainable(model, True)


def set_adapter_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Freeze every parameter, then let the adapter's train (when `trainable`)."""
    for param in model.parameters():
        param.requires_grad_(False)
    if trainable:
        for _, layer in lora_layers(model):
            for param in layer.adapter_parameters().values():
                param.requires_grad_(True)


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter tensors keyed by model path (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    state = {}
    for path, layer in lora_layers(model):
        for suffix, tensor in layer.adapter_parameters().items():
            state[f"{path}.{suffix}"] = tensor
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (idempotent)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and turn the LoRA layers back into plain base layers (for export):
    the model's state dict is then the base's keys only, with the merged weights."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer._mergeable_weight()  # fail before changing anything when some base cannot merge
    for layer in layers:
        layer.merge()
        for name in ("lora_A", "lora_B", "lora_dropout"):
            delattr(layer, name)
        if layer.use_dora:
            del layer.lora_magnitude_vector
        for name in ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "merged", "adapter_enabled",
                     "_dora_merge_factor"):
            delattr(layer, name)
        layer.__class__ = _base_class(type(layer))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model computes its base output (merged layers are unmerged for
    the block and merged again after it)."""
    layers = [layer for _, layer in lora_layers(model)]
    saved = [(layer.adapter_enabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, (enabled, merged) in zip(layers, saved):
            layer.adapter_enabled = enabled
            if merged:
                layer.merge()


# ----------------------------------------------------------------------------- PEFT files
def _peft_config(lora_config: dict, base_model_name_or_path: Optional[str]) -> dict:
    """adapter_config.json as peft 0.21's LoraConfig.save_pretrained writes it (every field)."""
    target_modules = lora_config["target_modules"]
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": lora_config.get("alpha_pattern") or {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": lora_config["lora_alpha"],
        "lora_bias": False,
        "lora_dropout": lora_config["lora_dropout"],
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": lora_config["r"],
        "rank_pattern": lora_config.get("rank_pattern") or {},
        "revision": None,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(target_modules),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": lora_config["use_dora"],
        "use_qalora": False,
        "use_rslora": lora_config["use_rslora"],
        "velora_config": None,
    }


def _default_base_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    for attr in ("source_dir", "name_or_path"):
        value = getattr(config, attr, None)
        if value:
            return str(value)
    return None


def save_adapter(model: nn.Module, directory, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter as PEFT does: adapter_model.safetensors + adapter_config.json.

    base_model_name_or_path defaults to where the base model came from (`model.config.source_dir`,
    or a transformers config's name_or_path). Each file is written to a temporary name and
    renamed into place. Returns the directory.
    """
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None or not any(True for _ in lora_layers(model)):
        raise ValueError("save_adapter: the model has no LoRA adapter (use apply_lora or load_adapter first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = base_model_name_or_path or lora_config.get("base_model_name_or_path") or _default_base_name(model)
    tensors = {PEFT_PREFIX + key: t.detach().to("cpu").contiguous() for key, t in adapter_state_dict(model).items()}
    config = json.dumps(_peft_config(lora_config, base), indent=2, sort_keys=True)
    atomic_save_safetensors(tensors, directory / WEIGHTS_NAME)
    atomic_write_text(directory / CONFIG_NAME, config)
    return directory


# adapter_config.json fields whose non-default values change what the adapter computes or
# which tensors it holds, and that phicore does not implement
_UNSUPPORTED_FIELDS = (
    "alora_invocation_tokens", "arrow_config", "exclude_modules", "kasa_config", "layer_replication",
    "layers_pattern", "layers_to_transform", "lora_bias", "modules_to_save", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
)
# init_lora_weights values after which the saved A/B apply to the unmodified base weight
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json of a PEFT adapter folder, checked (peft_type LORA, the fields phicore reads)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) in (None, "", []):
            raise ValueError(f"{path}: missing {field}")
    for field in _UNSUPPORTED_FIELDS:
        if config.get(field) not in (None, False, [], {}, ""):
            raise ValueError(f"{path}: {field}={config[field]!r} is not supported by phicore")
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out", False):
        raise ValueError(f"{path}: bias={config.get('bias')!r}, fan_in_fan_out={config.get('fan_in_fan_out')!r}; "
                         "phicore supports bias 'none' and fan_in_fan_out false")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise ValueError(f"{path}: init_lora_weights={config['init_lora_weights']!r} also changes the base weights; "
                         "convert the adapter to plain LoRA first (PEFT: path_initial_model_for_weight_conversion)")
    return config


def _peft_key(key: str) -> str:
    """A saved key in phicore's form: no `base_model.model.` prefix, no adapter name, DoRA's
    magnitude as `...lora_magnitude_vector` (PEFT writes it so; in memory it is `.default.weight`)."""
    for prefix in (PEFT_PREFIX, "base_model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    key = key.replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.").replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B.")
    for suffix in (f".{ADAPTER_NAME}.weight", f".{ADAPTER_NAME}", ".weight"):
        if key.endswith(".lora_magnitude_vector" + suffix):
            key = key[: -len(suffix)]
            break
    return key


def _read_tensors(path: Path) -> dict:
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("adapter_model.*") if p.suffix != ".safetensors")
        hint = f" (found {', '.join(pickles)}: phicore reads safetensors only)" if pickles else ""
        raise FileNotFoundError(f"{path}: not found{hint}")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                tensors[_peft_key(key)] = reader.get_tensor(key)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
    return tensors


def load_adapter(model: nn.Module, directory, *, trainable: bool = False,
                 dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Apply a PEFT LoRA adapter folder to the model, in place, and return the model.

    Reads adapter_config.json (r, lora_alpha, use_rslora, use_dora, target_modules,
    rank_pattern, alpha_pattern), checks every tensor of adapter_model.safetensors against
    the layers it targets before changing the model, then adds and fills the adapters.
    Keys are accepted with or without the `default` adapter name. Adapter params are in
    `dtype` (default fp32) and train only when `trainable`.
    """
    directory = Path(directory)
    if any(True for _ in lora_layers(model)):
        raise ValueError("load_adapter: the model already has LoRA layers; load the adapter into a fresh model")
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    tensors = _read_tensors(weights_path)

    targets = config["target_modules"]
    if isinstance(targets, str) and targets.strip().lower() != ALL_LINEAR:
        targets = re.compile(targets)  # PEFT: a string target_modules is a regex on the whole path
    try:
        selected, _ = _resolve_targets(model, targets)
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {err}") from None

    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_dora = bool(config.get("use_dora", False))
    expected = {}
    for path, module in selected:
        rank = _pattern_value(rank_pattern, path, r)
        expected[f"{path}.lora_A.weight"] = (rank, module.in_features)
        expected[f"{path}.lora_B.weight"] = (module.out_features, rank)
        if use_dora:
            expected[f"{path}.lora_magnitude_vector"] = (module.out_features,)
    _check_tensors(weights_path, tensors, expected)

    _apply(model, selected, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0) or 0.0,
           use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora, dtype=dtype,
           rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    state = adapter_state_dict(model)
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor)
    set_adapter_trainable(model, trainable)
    model.lora_config = {
        "r": r, "lora_alpha": alpha, "lora_dropout": config.get("lora_dropout", 0.0),
        "target_modules": config["target_modules"], "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": use_dora, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }
    return model


def _check_tensors(path: Path, tensors: dict, expected: dict) -> None:
    """One error naming missing / unexpected keys or the first shape mismatch (file vs model)."""
    def peft(key):
        return PEFT_PREFIX + key

    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} adapter tensor(s) for the targeted layers, "
                         f"e.g. {', '.join(peft(k) for k in missing[:3])}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensor(s) for modules the adapter config does not target "
                         f"or this model lacks, e.g. {', '.join(peft(k) for k in unexpected[:3])}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {peft(key)} has shape {list(tensors[key].shape)} in the file "
                             f"but the model needs {list(shape)}")
