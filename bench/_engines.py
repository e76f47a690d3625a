"""The four training stacks the benchmark compares, one class each, behind one small interface.

    engine.load(checkpoint_dir)      the base model on the device (NF4 base for the QLoRA engines)
    engine.add_lora()                LoRA on the target layers, gradient checkpointing as asked
    engine.forward_loss(batch)       mean next-token cross-entropy over the batch's target tokens
    engine.trainable_parameters()    what AdamW steps
    engine.generate(prompt, n)       greedy generation of exactly n new tokens at batch 1

Every engine reads the same random checkpoint folder, so weights, shapes, LoRA rank/targets,
dtype and checkpointing are the same on both sides; only the stack differs. The phicore engines
use what phicore's own training uses (`load_model`, `apply_lora`, the model's summed token loss,
`generate`), so a later speed change in phicore shows up here.

transformers / peft / bitsandbytes are imported inside the HF engines only: a missing library
raises `Unavailable` with one line saying which, and the benchmark records the engine as skipped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


class Unavailable(Exception):
    """The engine cannot run here (a library is missing or does not support the device)."""


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: str = "all-linear"  # "all-linear" or comma-separated module names

    def target_list(self):
        """"all-linear" as is, else a list of module names (PEFT's and phicore's meaning)."""
        if self.targets.strip().lower() == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.targets.split(",") if t.strip()]


def _require(module: str, engine: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise Unavailable(f"{engine}: {module} is not installed ({err})") from None


class Engine:
    """Common state: device, dtype, LoRA settings, gradient checkpointing; `model` once loaded."""

    name = "engine"
    quantize = False

    def __init__(self, device: torch.device, dtype: torch.dtype, lora: LoraSettings, grad_checkpointing: bool):
        self.device, self.dtype, self.lora, self.grad_checkpointing = device, dtype, lora, grad_checkpointing
        self.model = None

    def prepare(self, model_type: str) -> None:
        """Import everything the engine uses (so `load_s` times loading, not imports); raise
        Unavailable when this engine cannot run here."""

    def trainable_parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict:
        """Trainable and stored parameter counts (an NF4 weight counts its packed bytes' elements)."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        stored = sum(p.numel() for p in self.model.parameters())
        return {"trainable_params": trainable, "stored_params": stored}

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def info(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- phicore
def _chunked_loss(model, batch) -> torch.Tensor:
    """What phicore's training step computes: the model's chunked summed token loss."""
    return model(batch.input_ids, labels=batch.labels, **batch.model_inputs())


def _full_logits_loss(model, batch) -> torch.Tensor:
    """The loss before the chunked linear + cross-entropy: full (B, T, V) logits, fp32 CE."""
    from phicore.data.tokenization import IGNORE_INDEX

    logits = model(batch.input_ids, batch.attention_mask, batch.position_ids)  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def _torch_op(op: str):
    def apply(engine):
        from phicore import set_paths

        set_paths(kernels={op: "torch"})
    return apply


def _unfused_lora(engine):
    from phicore import set_paths

    set_paths(fused_lora=False)


def _torch_checkpoint(engine):
    from phicore import set_paths

    set_paths(layer_checkpoint="torch")


def _sdpa_attention(engine):
    from phicore import set_paths

    set_paths(packed_attention="sdpa")


def _offload_checkpoints(engine):
    engine.model.checkpoint_offload = True


def _compile(mode: str):
    def apply(engine):
        from phicore.compile import compile_model

        compile_model(engine.model, mode=mode)
    return apply


# --phicore-option NAME: each turns one issue-7 change off (or an optional one on), so a run
# measures that change alone against the default phicore path (bench/NOTES.md)
PHICORE_OPTIONS = {
    "full-logits-loss": ("loss from the full (tokens x vocab) logits, not the chunked linear + CE", None),
    "unfused-lora": ("LoRA through the reference path, not the fused autograd node", _unfused_lora),
    "offload-checkpoints": ("gradient-checkpointed layer inputs kept in (pinned) CPU memory", _offload_checkpoints),
    "torch-checkpoint": ("torch.utils.checkpoint per layer, not phicore's checkpoint node (more host work per "
                         "layer: bench/host_overhead.py)", _torch_checkpoint),
    "compile": ("torch.compile of the decoder layers (phicore.compile; the warm-up steps compile, "
                "warmup_step_s records them)", _compile("default")),
    "compile-cudagraphs": ("torch.compile with mode reduce-overhead: CUDA graphs replay each layer's kernels "
                           "(for steps bound by kernel launches, as measured on the H200)", _compile("reduce-overhead")),
    "default-host-memory": ("on CPU, glibc's default malloc (freed large blocks unmapped), not phicore's kept "
                            "host memory (train.py --no-keep-host-memory; phicore/host_memory.py)", None),
    "nf4-decode": ("generation from the NF4 base, not dequantised once (infer.py --dense-base no; the CPU/MPS "
                   "default dequantises when it fits)", None),
    "sdpa-attention": ("windowed or packed rows through SDPA's dense mask, not flex_attention", _sdpa_attention),
    **{f"torch-{op.replace('_', '-')}": (f"{op} through PyTorch, not its Triton kernel", _torch_op(op))
       for op in ("nf4", "rms_norm", "layer_norm", "rope", "swiglu", "gelu_tanh")},
}


class PhicoreEngine(Engine):
    """phicore: load_model (+ quantize="nf4"), apply_lora, token_loss_sum, generate.

    `options` (names in PHICORE_OPTIONS) switch single changes off for ablations."""

    name = "phicore-lora"
    options: tuple = ()

    def prepare(self, model_type: str) -> None:
        import phicore.generate  # noqa: F401
        import phicore.lora  # noqa: F401
        import phicore.train.loop  # noqa: F401
        import phicore.weights  # noqa: F401

    def load(self, checkpoint_dir) -> None:
        from phicore.weights import load_model

        self.model = load_model(checkpoint_dir, dtype=self.dtype, device=self.device,
                                quantize="nf4" if self.quantize else None)

    def add_lora(self) -> None:
        from phicore.lora import apply_lora

        apply_lora(self.model, r=self.lora.r, alpha=self.lora.alpha, dropout=self.lora.dropout,
                   targets=self.lora.target_list())
        self.model.gradient_checkpointing = self.grad_checkpointing
        if self.device.type == "cpu" and "default-host-memory" not in self.options:  # as train.py and infer.py
            from phicore.host_memory import keep_freed_host_memory

            keep_freed_host_memory()
        for option in self.options:
            apply = PHICORE_OPTIONS[option][1]
            if apply is not None:
                apply(self)

    def forward_loss(self, batch) -> torch.Tensor:
        loss_sum = _full_logits_loss if "full-logits-loss" in self.options else _chunked_loss
        return loss_sum(self.model, batch) / max(batch.num_target_tokens, 1)

    def generate(self, prompt: list, new_tokens: int) -> int:
        from phicore.frozen_linear import dequantize_frozen_linears
        from phicore.generate import generate

        if self.quantize and self.device.type != "cuda" and "nf4-decode" not in self.options:
            dequantize_frozen_linears(self.model)  # as infer.py's --dense-base auto on CPU/MPS

        return len(generate(self.model, prompt, max_new_tokens=new_tokens, temperature=0.0))

    def info(self) -> dict:
        from phicore import kernels
        from phicore.peft_io import lora_config

        out = {"lora_target_modules": lora_config(self.model)["target_modules"],
               "attention": "torch.nn.functional.scaled_dot_product_attention", "options": list(self.options)}
        if self.quantize:
            out["nf4_dequant_backend"] = kernels.resolve_backend("nf4", self.device)
            out["quantization"] = "phicore NF4Linear, blocksize 64, double quant, compute dtype " + \
                str(self.dtype).replace("torch.", "")
        return out


class PhicoreQLoraEngine(PhicoreEngine):
    name = "phicore-qlora"
    quantize = True


# ----------------------------------------------------------------------------- Hugging Face
class HFEngine(Engine):
    """transformers AutoModelForCausalLM.from_pretrained + peft get_peft_model (+ bitsandbytes 4-bit).

    Gradient checkpointing: `gradient_checkpointing_enable(use_reentrant=False)`, as phicore
    (non-reentrant, so the frozen embeddings need no `enable_input_require_grads`).
    `prepare_model_for_kbit_training` is NOT called: it would upcast norms, embeddings and lm_head
    to fp32, which phicore does not do, so the two QLoRA engines would not hold the same model.
    """

    name = "hf-lora"

    def prepare(self, model_type: str) -> None:
        transformers = _require("transformers", self.name)
        _require("peft", self.name)
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        transformers.AutoModelForCausalLM  # noqa: B018 - resolve the lazy attribute before the clock

    def _quantization_config(self):
        return None

    def load(self, checkpoint_dir) -> None:
        transformers = _require("transformers", self.name)
        transformers.logging.set_verbosity_error()  # generation-config chatter, not results
        kwargs = {"dtype": self.dtype, "device_map": {"": str(self.device)}}
        quantization = self._quantization_config()
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), **kwargs)

    def add_lora(self) -> None:
        peft = _require("peft", self.name)
        if self.grad_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False  # training: no KV cache (generate() asks for one itself)
        config = peft.LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                                 target_modules=self.lora.target_list(), bias="none", task_type="CAUSAL_LM")
        self.model = peft.get_peft_model(self.model, config)

    def forward_loss(self, batch) -> torch.Tensor:
        # labels are not shifted (phicore's Batch convention, and transformers'): it shifts inside
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    def generate(self, prompt: list, new_tokens: int) -> int:
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)  # (1, P)
        pad = self.model.config.pad_token_id
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                  pad_token_id=pad if pad is not None else 0)
        return out.shape[1] - ids.shape[1]

    def info(self) -> dict:
        base = self.model.get_base_model()
        targets = self.model.peft_config["default"].target_modules
        return {"lora_target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
                "attention": getattr(base.config, "_attn_implementation", None)}


class HFQLoraEngine(HFEngine):
    """As HFEngine, the linear layers (all but lm_head) loaded as bitsandbytes Linear4bit:
    NF4, blocksize 64, double quantisation, compute dtype = the run's dtype."""

    name = "hf-qlora"
    quantize = True

    def prepare(self, model_type: str) -> None:
        super().prepare(model_type)
        bnb = _require("bitsandbytes", self.name)
        if self.device.type == "mps":
            raise Unavailable(f"{self.name}: bitsandbytes {bnb.__version__} has no MPS backend")
        importlib.import_module("transformers.integrations.bitsandbytes")

    def _quantization_config(self):
        transformers = _require("transformers", self.name)
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=self.dtype, bnb_4bit_quant_storage=torch.uint8,
        )

    def info(self) -> dict:
        return {**super().info(), "quantization": "bitsandbytes Linear4bit nf4, blocksize 64, double quant, "
                                                  "compute dtype " + str(self.dtype).replace("torch.", "")}


ENGINES = {cls.name: cls for cls in (PhicoreEngine, PhicoreQLoraEngine, HFEngine, HFQLoraEngine)}
# each phicore engine and the Hugging Face stack it is measured against
COUNTERPARTS = {"phicore-lora": "hf-lora", "phicore-qlora": "hf-qlora"}
