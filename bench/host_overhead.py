"""Host time of a training step: phicore's step at negligible compute, where what is left is the
work the host does to issue it (Python, autograd, the dispatcher).

    python bench/host_overhead.py --json bench/results/host-overhead-cpu-2026-11-26.json

Why: the H200 training steps were bound by the host, not the GPU (bench/NOTES.md, "Measured on a
GPU": 111 ms of GPU work in a 263-340 ms step, CPU seconds per step equal to wall seconds). Every
op, hook and Python frame a step runs costs that time there whatever its arithmetic, and the
same work can be timed on any CPU once the arithmetic is made negligible.

Model: the shape's layout (phi-3-mini-4k or phi-2: its 32 layers, norms, MLP and attention) at
width 64, 2 heads, intermediate 128, vocab 256; one row of 16 tokens; LoRA r = 16 on every linear
layer, dropout 0; fp32 on CPU, one thread. A step is forward + loss + backward. Per variant:
warm-up steps, then `--rounds` rounds of `--steps` steps with the variants alternated inside
each round (so a busy moment on a shared machine hits them all); ms/step is the best round.
`aten_ops` counts what one step dispatches (a TorchDispatchMode: the same on every machine).

Variants, each for a dense base (LoRA) and an NF4 base (QLoRA):
  checkpoint-node   phicore's gradient checkpointing (phicore/layer_checkpoint.py), the default
  torch-checkpoint  torch.utils.checkpoint per layer (`force_paths(layer_checkpoint="torch")`)
  no-checkpointing  autograd keeps every activation (forward once, no recompute)
and, when transformers and peft are installed, hf-lora: the same weights through transformers +
peft (LoRA on all linear layers, gradient_checkpointing_enable with use_reentrant=False).
On a CPU the norm, RoPE and activation ops run as PyTorch ops where a GPU launches one Triton
kernel each, so the counts are not the GPU's launches; the checkpointing and LoRA machinery are
the same code on both.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import phicore  # noqa: E402
from bench._measure import OpCount, cpu_name  # noqa: E402
from bench._shapes import shape_config  # noqa: E402
from bench.throughput import load_average, versions, write_json  # noqa: E402
from phicore.config import ModelConfig  # noqa: E402
from phicore.frozen_linear import quantize_model_linears  # noqa: E402
from phicore.lora import apply_lora  # noqa: E402
from phicore.model import PhiForCausalLM  # noqa: E402

TINY_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
                   vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CHECKPOINTING = {"checkpoint-node": "phicore", "torch-checkpoint": "torch", "no-checkpointing": None}


def tiny_config(shape: str, layers: int) -> ModelConfig:
    return ModelConfig.from_dict({**shape_config(shape), **TINY_WIDTHS, "num_hidden_layers": layers})


def phicore_step(shape: str, layers: int, nf4: bool, seq: int):
    """(make one step, the model): phicore at the tiny widths, LoRA r=16 on every linear layer."""
    torch.manual_seed(0)
    model = PhiForCausalLM(tiny_config(shape, layers))
    if nf4:
        for layer in model.model.layers:
            quantize_model_linears(layer)
    apply_lora(model, r=16, alpha=32, dropout=0.0)
    model.train()
    ids = torch.randint(0, TINY_WIDTHS["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))

    def step():
        model(ids, labels=ids).backward()
    return step, model


def hf_step(model: PhiForCausalLM, seq: int, folder: Path):
    """One step of transformers + peft on the same base weights, or None without them."""
    try:
        import peft
        import transformers
    except ImportError:
        return None
    from phicore.weights import save_model

    base = PhiForCausalLM(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    save_model(base, folder)
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    hf.train()
    ids = torch.randint(0, TINY_WIDTHS["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))

    def step():
        hf(input_ids=ids, labels=ids).loss.backward()
    return step


def measure(args) -> dict:
    torch.set_num_threads(1)
    runs = {}  # name -> (step function, code paths it runs under)
    for nf4 in (False, True):
        step, model = phicore_step(args.shape, args.layers, nf4, args.seq)
        for variant, mode in CHECKPOINTING.items():
            def run(step=step, model=model, mode=mode):
                model.gradient_checkpointing = mode is not None
                with phicore.force_paths(layer_checkpoint=mode or "auto"):
                    step()
            runs[f"{'qlora' if nf4 else 'lora'} {variant}"] = run
        if not nf4:
            with tempfile.TemporaryDirectory() as folder:
                hf = hf_step(model, args.seq, Path(folder))
            if hf is not None:
                runs["hf-lora torch-checkpoint"] = hf
    results = {}
    for name, run in runs.items():
        for _ in range(args.warmup):
            run()
        with OpCount() as count:
            run()
        results[name] = {"aten_ops": sum(count.ops.values()), "most_common_ops": dict(count.ops.most_common(8)),
                         "round_ms_per_step": []}
    for _ in range(args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                run()
            results[name]["round_ms_per_step"].append((time.perf_counter() - started) / args.steps * 1e3)
    for result in results.values():
        result["ms_per_step"] = min(result["round_ms_per_step"])
        result["ms_per_layer"] = result["ms_per_step"] / args.layers
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="phi-3-mini-4k", choices=["phi-3-mini-4k", "phi-2"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    for flag in ("layers", "seq", "steps", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    record = {"command": " ".join(["python", "bench/host_overhead.py", *argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "device": {"type": "cpu", "cpu": cpu_name(), "threads": 1,
                                                 "load_average_at_start": load_average()},
              "settings": {"shape": args.shape, "layers": args.layers, "widths": TINY_WIDTHS, "seq": args.seq,
                           "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "dtype": "fp32",
                           "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds}}
    record["results"] = measure(args)
    record["device"]["load_average_at_end"] = load_average()
    print(f"host time per training step at negligible compute: {args.shape} layout, {args.layers} layers, "
          f"{args.seq} tokens, 1 CPU thread (best of {args.rounds} rounds)")
    for name, result in record["results"].items():
        print(f"  {name:<30} {result['ms_per_step']:7.1f} ms/step  {result['ms_per_layer'] * 1e3:6.0f} us/layer  "
              f"{result['aten_ops']:6d} aten ops")
    if args.json_path:
        write_json(record, Path(args.json_path))
        print(f"written: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
