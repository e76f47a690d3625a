"""How much memory a run needs, from the model's config.json and the run's settings alone.

No weights are loaded: every term is a formula over the config's shapes. The terms, with N the
tokens of one micro-batch (batch x sequence), a the bytes of an activation element (2 under
bf16/fp16 weights or autocast, 4 in fp32), w the bytes of a dense weight element, L layers:

    base weights      dense: every parameter x w (tied embeddings once). NF4: each decoder
                      nn.Linear as bitsandbytes holds it: n/2 packed bytes, absmax per 64
                      (uint8 + fp32 per 256 of those with double quantisation, else fp32), its
                      bias in w; embeddings, norms and lm_head stay dense.
    LoRA              r x (in + out) fp32 per adapted linear (DoRA: + out for the magnitude);
    gradients         the same again, during backward (freed at each optimizer step);
    AdamW             two fp32 moments per trainable element.
    layer inputs      with gradient checkpointing each layer keeps its input, N D a, until its
                      backward (L of them; none on the device with --offload-checkpoints);
                      without it every layer keeps all its saved activations (below).
    one layer         the activations one decoder layer saves for backward, per token
                      (`layer_bytes_per_token`: norms' inputs and statistics, the projections'
                      inputs and outputs that the next op saves, attention q/k/v/out/logsumexp,
                      the MLP's intermediate tensors, dropout masks, LoRA's x A^T). Under
                      checkpointing one layer's worth exists at a time, in its recompute,
                      beside the recomputed layer output and its incoming gradient (2 N D a,
                      held by phicore.layer_checkpoint's node until the layer's backward ends).
    backward          the gradient tensors alive inside one layer's backward: about
                      N (I' + 2 D) a, I' the widest projection output; plus, for NF4, the
                      largest weight dequantised into the compute dtype (out x in x a).
    loss              the chunked linear + cross-entropy (phicore/loss.py): one chunk of
                      n = min(N, 2^25 / V) tokens' logits in fp32, and before that in the
                      compute dtype when it is narrower (n V (4 + a)); the hidden states'
                      gradient it keeps (N D a), and the final norm's saved input (N D a).
    peak              what is always held, plus the larger of the two moments that never
                      coexist: the loss chunk (end of the forward pass) and a layer's backward
                      (its recomputed activations, the gradient buffers, the LoRA gradients).
    attention mask    with padded rows (or packing and windows off CUDA, where flex_attention
                      does not run) a (B, 1, T, T) bool mask, which SDPA turns into the query's
                      dtype in every layer and keeps for backward: B T^2 (1 + a) per layer.
    evaluation        runs under no_grad at the training batch: weights + one layer's outputs,
                      never above the training peak, so it adds nothing (stated in the plan).
    kept host blocks  on CPU with --keep-host-memory (phicore/host_memory.py): glibc keeps the blocks
                      a step freed, and not all fit the next step's requests, so the resident size
                      runs above the tensors' bytes: planned as one more backward moment (measured
                      0.74-0.77x of it at Phi-3 widths, 128 and 512 tokens).
    fixed             the framework's own memory: on CUDA the context the driver keeps (outside
                      PyTorch's allocator), on CPU the process as it stands (measured, at plan
                      time, by `fixed_overhead`).

Generation (`plan_generation`): base weights + LoRA + the KV cache, L x 2 x B x KV x S x d x a
for S = prompt + new tokens, + one forward's activations over the prompt (prefill: N' = B x
prompt tokens; its logits for the last position only).

`tests/test_memory_plan.py` checks `layer_bytes_per_token` against the tensors autograd really
saves (saved_tensors_hooks on a real layer), and `bench/memory_plan_check.py` the whole plan
against measured peaks (`bench/results/memory-plan-*.json`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import ModelConfig
from .loss import default_chunk_size

GIB = 2**30
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class TrainingShape:
    """What a training run holds in memory, in the planner's terms (no torch objects)."""

    batch_size: int
    seq_len: int
    weight_bytes: int = 4  # bytes per dense base weight element (--dtype)
    activation_bytes: int = 4  # bytes per activation element (autocast dtype, else --dtype)
    quantize: Optional[str] = None  # "nf4"
    double_quant: bool = True
    lora_r: int = 16
    targets: str = "all-linear"
    lora_dropout: float = 0.05
    use_dora: bool = False
    grad_checkpointing: bool = True
    offload_checkpoints: bool = False
    autocast: bool = False  # activations in a narrower dtype than the weights (LoRA saves a cast copy)
    dense_mask: bool = False  # attention takes a (B, 1, T, T) mask: padded rows, or packing/windows off CUDA
    keep_host_memory: bool = False  # CPU with phicore.host_memory: freed blocks stay in the process


@dataclass
class Term:
    name: str
    bytes: int
    how: str  # the formula, with the numbers put in
    phase: str = "always"  # "always", or one of the moments that do not overlap: "loss", "backward"


@dataclass
class MemoryPlan:
    """Terms that add up to a predicted peak, and the budget they are held against."""

    title: str
    terms: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, name: str, nbytes: float, how: str, phase: str = "always") -> None:
        self.terms.append(Term(name, int(nbytes), how, phase))

    def phase_bytes(self, phase: str) -> int:
        return sum(term.bytes for term in self.terms if term.phase == phase)

    @property
    def peak_bytes(self) -> int:
        """What is always held, plus the larger of the moments that never coexist (the loss
        at the end of the forward pass; a layer's backward)."""
        phases = {term.phase for term in self.terms} - {"always"}
        return self.phase_bytes("always") + max((self.phase_bytes(phase) for phase in phases), default=0)

    def table(self, budget: Optional["Budget"] = None) -> str:
        width = max(len(term.name) for term in self.terms)
        lines = [self.title, ""]
        phases = sorted({term.phase for term in self.terms} - {"always"})
        for term in self.terms:
            when = "" if term.phase == "always" else f"[{term.phase}] "
            lines.append(f"  {term.name:<{width}}  {_gib(term.bytes):>10}   {when}{term.how}")
        if phases:
            larger = max(phases, key=self.phase_bytes)
            lines.append(f"  {'peak':<{width}}  {_gib(self.peak_bytes):>10}   every term without [..], plus the "
                         f"[{larger}] terms ({' and '.join(f'[{p}]' for p in phases)} never coexist)")
        else:
            lines.append(f"  {'peak':<{width}}  {_gib(self.peak_bytes):>10}")
        if budget is not None:
            verdict = "fits" if self.peak_bytes <= budget.usable_bytes else "does NOT fit"
            lines.append(f"  {'available':<{width}}  {_gib(budget.usable_bytes):>10}   {budget.describe()}: {verdict}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 100 else f"{nbytes / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- shapes of the model
def decoder_linears(config: ModelConfig) -> dict:
    """{module name as in a layer: (out_features, in_features, has_bias)} for one decoder layer."""
    D, I = config.hidden_size, config.intermediate_size
    H, KV, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layout = config.layout
    bias = layout.linear_bias
    if not config.layout.fused_qkv:  # Phi-2: separate q/k/v, dense, fc1/fc2, all with biases
        return {"q_proj": (H * d, D, bias), "k_proj": (KV * d, D, bias), "v_proj": (KV * d, D, bias),
                "dense": (D, H * d, bias), "fc1": (I, D, bias), "fc2": (D, I, bias)}
    return {"qkv_proj": ((H + 2 * KV) * d, D, bias), "o_proj": (D, H * d, bias),
            "gate_up_proj": (2 * I, D, bias), "down_proj": (D, I, bias)}


def adapted(config: ModelConfig, targets: str) -> dict:
    """The decoder linears LoRA adapts under `targets` ("all-linear" or names; never lm_head)."""
    linears = decoder_linears(config)
    if targets == "all-linear":
        return linears
    wanted = {name.strip() for name in targets.replace(",", " ").split()}
    return {name: shape for name, shape in linears.items() if name in wanted}


def dense_parameter_count(config: ModelConfig) -> tuple[int, int]:
    """(elements in decoder linears' weights, every other parameter element) of the base."""
    D, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    linear_weights = sum(out * inp for out, inp, _ in decoder_linears(config).values())
    linear_biases = sum(out for out, _, bias in decoder_linears(config).values() if bias)
    norm = D * (2 if config.layout.norm == "layernorm" else 1)
    norms_per_layer = norm * (1 if config.layout.parallel_block else 2)
    head = 0 if config.tie_word_embeddings else D * V + (V if config.layout.lm_head_bias else 0)
    other = L * (linear_biases + norms_per_layer) + V * D + norm + head
    return L * linear_weights, other


def nf4_bytes(elements: int, double_quant: bool) -> int:
    """Bytes bitsandbytes' NF4 layout holds for one weight of `elements` (phicore.nf4)."""
    blocks = math.ceil(elements / NF4_BLOCKSIZE)
    if double_quant:
        nested = math.ceil(blocks / NESTED_BLOCKSIZE)
        return elements // 2 + blocks + nested * 4 + 256 * 4 + 16 * 4 + 4
    return elements // 2 + blocks * 4 + 16 * 4


def layer_bytes_per_token(config: ModelConfig, shape: TrainingShape) -> float:
    """Bytes one decoder layer saves for backward, per token (PyTorch path; the Triton kernels
    save the same or less). a = activation bytes; GQA repeats k and v to H heads for SDPA.

    Phi-3 layout: 2 (D a + 4) norms' inputs and 1/rms; 2 D a normed inputs of qkv/gate_up;
    without GQA (H + 2 KV) d a the qkv output (v is a view of it) + H d a + KV d a rotated q
    and k; with GQA 3 H d a (q rotated, k and v repeated to H heads: qkv itself is then not
    kept); H d a attention output (o_proj's input), + D a its (B, T, D) copy with GQA; 4 H logsumexp;
    2 I a gate_up output, I a silu(gate), I a the product (down_proj's input).
    Phi-2 layout: D a + 8 the LayerNorm's input and statistics; D a the normed input (q/k/v and
    fc1 share it); q, k (rotated copies) and v (H d + 2 KV d, or 3 H d with GQA's repeat); H d a
    output + D a copy; 4 H logsumexp; I a fc1's output + I a gelu's (fc2's input); 2 D a the
    residual dropout masks when resid_pdrop > 0.
    LoRA, per adapted linear: r x 4 (x A^T in fp32; r a under autocast); with dropout > 0 a
    1-byte mask per input element, and under autocast the dropped input's cast (in a).
    """
    a = shape.activation_bytes
    D, I = config.hidden_size, config.intermediate_size
    H, KV, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gqa = KV != H
    if config.layout.parallel_block:
        qkv = (3 * H * d) if gqa else (H * d + 2 * KV * d)
        total = (D * a + 8) + D * a + qkv * a + H * d * a + D * a + 4 * H + 2 * I * a
        if config.resid_pdrop > 0:
            total += 2 * D * a
    else:
        attention = 3 * H * d if gqa else (H + 2 * KV) * d + H * d + KV * d  # see the docstring
        copy = D * a if gqa else 0  # the output's (B, T, D) copy; without GQA SDPA's output reshapes as a view
        total = 2 * (D * a + 4) + 2 * D * a + attention * a + H * d * a + copy + 4 * H + 4 * I * a
        if config.resid_pdrop > 0:
            total += 2 * D * a
    lora_element = a if shape.autocast else 4
    for _, inp, _ in adapted(config, shape.targets).values():
        total += shape.lora_r * lora_element
        if shape.lora_dropout > 0:
            total += inp * (1 + (a if shape.autocast else 0))
    return float(total)


def _widest_intermediate(config: ModelConfig) -> int:
    return max(out for out, _, _ in decoder_linears(config).values())


# ----------------------------------------------------------------------------- training
def plan_training(config: ModelConfig, shape: TrainingShape, *, fixed: int = 0, fixed_how: str = "",
                  title: Optional[str] = None) -> MemoryPlan:
    """The predicted peak of one training step (see the module docstring for every term)."""
    B, T, L = shape.batch_size, shape.seq_len, config.num_hidden_layers
    N, D, V = B * T, config.hidden_size, config.vocab_size
    a, w = shape.activation_bytes, shape.weight_bytes
    plan = MemoryPlan(title or f"memory plan: batch {B} x {T} tokens")

    linear_elements, other_elements = dense_parameter_count(config)
    if shape.quantize == "nf4":
        per_layer = sum(nf4_bytes(out * inp, shape.double_quant) for out, inp, _ in decoder_linears(config).values())
        plan.add("base weights (NF4)", L * per_layer + other_elements * w,
                 f"{linear_elements / 1e9:.2f}e9 weights in NF4 (~0.5{'3' if shape.double_quant else '6'} "
                 f"byte each) + {other_elements / 1e6:.0f}M dense x {w} B")
    else:
        plan.add("base weights", (linear_elements + other_elements) * w,
                 f"{(linear_elements + other_elements) / 1e9:.2f}e9 x {w} B")

    lora = L * sum(shape.lora_r * (out + inp) + (out if shape.use_dora else 0)
                   for out, inp, _ in adapted(config, shape.targets).values())
    plan.add("LoRA", lora * 4, f"{lora / 1e6:.1f}M fp32 (r={shape.lora_r})")
    plan.add("AdamW moments", 2 * lora * 4, "2 x the LoRA weights")
    plan.add("rotary tables", 2 * N * config.rotary_dim * a, "cos and sin per token")

    layer = layer_bytes_per_token(config, shape) * N
    if shape.grad_checkpointing:
        kept = 0 if shape.offload_checkpoints else L * N * D * a
        plan.add("layer inputs", kept, "offloaded to CPU memory" if shape.offload_checkpoints
                 else f"{L} layers x {N} tokens x {D} x {a} B (gradient checkpointing)")
        plan.add("one layer's activations", layer, f"{layer / N / 1024:.1f} KiB a token, recomputed", "backward")
        plan.add("recomputed output + its gradient", 2 * N * D * a,
                 f"2 x {N} x {D} x {a} B, held by the checkpoint node through the layer's backward", "backward")
    else:
        plan.add("activations", L * layer, f"{L} layers x {layer / N / 1024:.1f} KiB a token x {N} tokens")
    if shape.dense_mask:  # SDPA converts the bool mask to the query dtype in every layer and keeps it
        per_layer = B * T * T * a
        plan.add("attention mask", B * T * T, f"{B} x {T} x {T} bools, shared by the layers")
        if shape.grad_checkpointing:
            plan.add("attention mask, per layer", per_layer, f"{B} x {T} x {T} x {a} B, one layer's", "backward")
        else:
            plan.add("attention masks, per layer", L * per_layer, f"{L} layers x {B} x {T} x {T} x {a} B")
    plan.add("loss's saved gradient", 2 * N * D * a, f"dL/dhidden + the final norm's input: 2 x {N} x {D} x {a} B")

    chunk = min(N, default_chunk_size(V))
    upcast = a if a < 4 else 0  # half-precision logits before their fp32 copy
    plan.add("loss chunk", chunk * V * (4 + upcast), f"{chunk} tokens x {V} logits x ({upcast} + 4) B", "loss")
    plan.add("LoRA gradients", lora * 4, "as the LoRA weights", "backward")
    backward = N * (_widest_intermediate(config) + 2 * D) * a
    how = f"{N} tokens x ({_widest_intermediate(config)} + 2 x {D}) x {a} B"
    if shape.quantize == "nf4":
        biggest = max(out * inp for out, inp, _ in decoder_linears(config).values())
        backward += biggest * a
        how += f" + the largest weight dequantised ({biggest / 1e6:.0f}M x {a} B)"
    plan.add("backward buffers", backward, how, "backward")
    if shape.keep_host_memory:  # glibc keeps what the steps freed; not every block fits the next request
        moment = plan.phase_bytes("backward")
        plan.add("kept host blocks", moment, "freed blocks kept for the next step (--keep-host-memory): up to one "
                 "backward moment again (measured 0.74-0.77x of it at Phi-3 widths)")
    if fixed:
        plan.add("fixed", fixed, fixed_how)
    plan.notes.append("evaluation runs without gradients at the same batch: below the training peak")
    return plan


def plan_generation(config: ModelConfig, *, batch_size: int, prompt_tokens: int, new_tokens: int,
                    weight_bytes: int, quantize: Optional[str] = None, double_quant: bool = True,
                    lora_r: int = 16, targets: str = "all-linear", adapters: int = 1, fixed: int = 0,
                    fixed_how: str = "") -> MemoryPlan:
    """The predicted peak of generating `new_tokens` after `prompt_tokens` for `batch_size` rows
    (`adapters` LoRA adapters over one base: infer.py --compare holds two)."""
    L, D, a = config.num_hidden_layers, config.hidden_size, weight_bytes
    S = prompt_tokens + new_tokens
    plan = MemoryPlan(f"memory plan: generating {new_tokens} tokens after {prompt_tokens}, batch {batch_size}")
    linear_elements, other_elements = dense_parameter_count(config)
    if quantize == "nf4":
        per_layer = sum(nf4_bytes(out * inp, double_quant) for out, inp, _ in decoder_linears(config).values())
        plan.add("base weights (NF4)", L * per_layer + other_elements * a, "NF4 decoder linears + dense rest")
    else:
        plan.add("base weights", (linear_elements + other_elements) * a,
                 f"{(linear_elements + other_elements) / 1e9:.2f}e9 x {a} B")
    lora = L * sum(lora_r * (out + inp) for out, inp, _ in adapted(config, targets).values())
    if lora_r and adapters:
        plan.add("LoRA", adapters * lora * a, f"{adapters} adapter(s) x {lora / 1e6:.1f}M x {a} B")
    cache = L * 2 * batch_size * config.num_key_value_heads * S * config.head_dim * a
    plan.add("KV cache", cache, f"{L} layers x 2 x {batch_size} x {config.num_key_value_heads} heads x {S} "
                                f"positions x {config.head_dim} x {a} B")
    N = batch_size * prompt_tokens
    prefill = N * (_widest_intermediate(config) * 2 + 4 * D) * a
    if quantize == "nf4":
        prefill += max(out * inp for out, inp, _ in decoder_linears(config).values()) * a
    plan.add("prefill buffers", prefill, f"{N} prompt tokens through one layer at a time")
    plan.add("logits", batch_size * config.vocab_size * 4 * 2, "the last position's, fp32")
    if fixed:
        plan.add("fixed", fixed, fixed_how)
    return plan


# ----------------------------------------------------------------------------- the device
@dataclass(frozen=True)
class Budget:
    """Memory a run may use on its device: what is free now, less a margin."""

    device: str
    free_bytes: int
    margin: float  # fraction kept back (allocator fragmentation, what the plan leaves out)
    source: str

    @property
    def usable_bytes(self) -> int:
        return int(self.free_bytes * (1 - self.margin))

    def describe(self) -> str:
        return f"{self.source} {_gib(self.free_bytes)} less {self.margin:.0%}"


def device_budget(device: torch.device, *, memory_gib: Optional[float] = None, margin: float = 0.1) -> Budget:
    """The budget on `device`: `memory_gib` when given (--device-memory: plan for another
    machine, or a limit of your own); else CUDA's free memory (cudaMemGetInfo, after the context
    exists), MPS's recommended working set less what is allocated, or the CPU's available RAM
    (MemAvailable, or the cgroup's limit when lower)."""
    if memory_gib is not None:
        return Budget(device.type, int(memory_gib * GIB), margin, "--device-memory")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Budget("cuda", int(free), margin, f"free on {torch.cuda.get_device_name(device)}")
    if device.type == "mps":
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return Budget("mps", int(free), margin, "MPS recommended working set, free")
    return Budget("cpu", cpu_available_bytes(), margin, "available RAM")


def cpu_available_bytes() -> int:
    """MemAvailable from /proc/meminfo, capped by a cgroup v2 memory limit (containers)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:  # not Linux: total physical memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as handle:
            limit = handle.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as handle:
            used = int(handle.read().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, available)


# Held by the driver outside PyTorch's allocator, for planning another machine (--device-memory);
# an assumption, not yet measured here: on the device itself the free memory is read after the
# context exists, so it is never needed there.
CUDA_CONTEXT_BYTES = 512 * 2**20
# What a CPU process allocates on its first training step besides tensors (lazy imports, the
# matmul library's per-thread buffers): measured by bench/memory_plan_check.py as
# first_step_libraries, 58-59 MiB at the small shapes' widths and 103-105 MiB at Phi-2's and
# Phi-3-mini's (bench/results/memory-plan-cpu-2026-11-26*.json); the larger is planned.
CPU_FIRST_STEP_BYTES = 105 * 2**20


def fixed_overhead(device: torch.device, *, planning_elsewhere: bool) -> tuple[int, str]:
    """(bytes, how) of the framework's own memory that the budget does not already exclude.
    On this CUDA device the free memory is read after the context exists: 0. On CPU, what the
    first step loads; planning for another machine (--device-memory) also this process's
    resident size now (torch and phicore imported: the baseline every run starts from), or the
    CUDA context."""
    if device.type == "cuda":
        if planning_elsewhere:
            return CUDA_CONTEXT_BYTES, "CUDA context (outside PyTorch's allocator; assumed)"
        return 0, ""
    if device.type == "cpu":
        rss = _rss_bytes() if planning_elsewhere else 0
        how = "libraries a first step loads (measured)" + (", and this process now" if rss else "")
        return CPU_FIRST_STEP_BYTES + rss, how
    return 0, ""


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ----------------------------------------------------------------------------- choosing a batch
def batch_candidates(limit: int, effective: Optional[int]) -> list:
    """Micro-batch sizes to try, largest first: the divisors of `effective` (so the effective
    batch stays exact) up to `limit`, else every size from `limit` down to 1."""
    if effective is not None:
        return [b for b in range(min(limit, effective), 0, -1) if effective % b == 0]
    return list(range(limit, 0, -1))
