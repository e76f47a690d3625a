"""The memory planner (phicore/memory_plan.py) against measured peaks, on CPU.

    python bench/memory_plan_check.py --json bench/results/memory-plan-cpu-2026-11-26.json
    python bench/memory_plan_check.py --cases small-lora-ckpt,phi-3-mini-4k-qlora-ckpt

Each case builds a random-weight model of a bench shape (bench/_shapes.py) in a fresh process,
applies LoRA (and NF4), makes AdamW and trains one warm-up step, then measures:
- static: the bytes malloc hands out above the process's baseline (before the model) once
  the model, LoRA and the optimizer's moments exist (glibc mallinfo2: exact tensor bytes, not
  RSS, which keeps freed pages),
- step: the peak of those bytes above static during one more training step (MallocPeak),
and compares static + step with the planner's total (its "fixed" term left out: the baseline is
subtracted from the measurement). Goal (issue 17): every prediction within 10 %.
Real-size shapes run QLoRA only (a dense fp32 Phi-3-mini is 15 GB), at 128 tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# name -> (shape, quantize, grad_checkpointing, batch, seq)
CASES = {}
for _shape, _batch, _seq in (("tiny", 4, 64), ("small", 2, 256), ("small-phi-2", 2, 256)):
    for _quantize in (None, "nf4"):
        for _ckpt in (True, False):
            CASES[f"{_shape}-{'qlora' if _quantize else 'lora'}-{'ckpt' if _ckpt else 'no-ckpt'}"] = (
                _shape, _quantize, _ckpt, _batch, _seq)
for _shape in ("phi-3-mini-4k", "phi-2"):
    for _ckpt in (True, False):
        CASES[f"{_shape}-qlora-{'ckpt' if _ckpt else 'no-ckpt'}"] = (_shape, "nf4", _ckpt, 1, 128)


STATIC_TERMS = ("base weights", "base weights (NF4)", "LoRA", "AdamW moments")  # held between steps


def measure(name: str) -> dict:
    """Build, warm up and measure one case in this process."""
    import torch

    from _measure import MallocPeak, _MALLOC_IN_USE
    from _shapes import shape_config
    from phicore.config import ModelConfig
    from phicore.frozen_linear import quantize_model_linears
    from phicore.lora import apply_lora
    from phicore.memory_plan import TrainingShape, plan_training
    from phicore.model import PhiForCausalLM

    shape, quantize, ckpt, batch, seq = CASES[name]
    torch.set_num_threads(2)
    config = ModelConfig.from_dict(shape_config(shape))
    dropout = 0.05
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))

    def build(config):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = PhiForCausalLM(config)
        # one part at a time, each quantised before the next exists: a real-size base is never
        # dense in memory as a whole (Phi-3-mini in fp32 is 15 GB)
        parts = [*model.model.layers, model.model.embed_tokens, model.model.final_norm, model.lm_head]
        with torch.no_grad():
            for part in parts:
                part.to_empty(device="cpu")
                for param in part.parameters():
                    param.normal_(0, 0.02)
                if quantize and part in model.model.layers:
                    quantize_model_linears(part)
            model.rotary = type(model.rotary)(config)  # its buffers, made on the CPU
            if config.tie_word_embeddings:
                model.tie_weights()
        apply_lora(model, r=16, alpha=32, dropout=dropout)
        model.train()
        model.gradient_checkpointing = ckpt
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(model, optimizer):
        loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The first model of a process also pays for lazy imports and the matmul library's
    # per-thread buffers (the planner's "fixed" term): build and train one, then measure a second.
    # For a real-size shape the first has 2 layers (the same widths: the same buffers).
    real_size = shape.startswith(("phi-2", "phi-3", "phi-4"))
    warm_config = ModelConfig.from_dict({**shape_config(shape), "num_hidden_layers": 2}) if real_size else config
    start = _MALLOC_IN_USE()
    model, optimizer = build(warm_config)
    step(model, optimizer)
    gc.collect()
    first = _MALLOC_IN_USE() - start
    del model, optimizer
    gc.collect()
    baseline = _MALLOC_IN_USE()
    model, optimizer = build(config)
    step(model, optimizer)
    gc.collect()
    static = _MALLOC_IN_USE() - baseline
    warm_static = plan_training(warm_config, TrainingShape(batch, seq, quantize=quantize, lora_dropout=dropout,
                                                           grad_checkpointing=ckpt))
    warm_static = sum(t.bytes for t in warm_static.terms if t.name in STATIC_TERMS)
    first_step_libraries = first - (warm_static if real_size else static)
    with MallocPeak() as probe:
        step(model, optimizer)
    plan = plan_training(config, TrainingShape(batch_size=batch, seq_len=seq, weight_bytes=4, activation_bytes=4,
                                               quantize=quantize, lora_r=16, lora_dropout=dropout,
                                               grad_checkpointing=ckpt))
    predicted_static = sum(t.bytes for t in plan.terms if t.name in STATIC_TERMS)
    measured = static + probe.peak_bytes
    return {"case": name, "first_step_libraries": first_step_libraries, "shape": shape, "quantize": quantize, "grad_checkpointing": ckpt, "batch": batch,
            "seq_len": seq, "measured_static": static, "measured_step_peak": probe.peak_bytes,
            "measured_total": measured, "predicted_static": predicted_static,
            "predicted_step": plan.peak_bytes - predicted_static, "predicted_total": plan.peak_bytes,
            "ratio": plan.peak_bytes / measured, "terms": {t.name: t.bytes for t in plan.terms}}


def compare_gpu(paths) -> list:
    """The planner against the CUDA peaks (max allocated) that bench/throughput.py measured for
    phicore's engines (bf16, autocast, checkpointing on)."""
    from _shapes import planned_training

    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        settings = record["settings"]
        for engine, quantize in (("phicore-qlora", "nf4"), ("phicore-lora", None)):
            result = record["engines"].get(engine, {})
            if "peak_mem_bytes" not in result:
                continue
            predicted = planned_training(settings, quantize).peak_bytes
            rows.append({"file": str(path), "device": record["device"].get("name"), "shape": settings["shape"],
                         "engine": engine, "measured_max_allocated": result["peak_mem_bytes"],
                         "predicted": predicted, "ratio": predicted / result["peak_mem_bytes"]})
            print(f"{settings['shape']:<16} {engine:<14} measured {result['peak_mem_bytes'] / 2**30:.3f} GiB  "
                  f"predicted {predicted / 2**30:.3f} GiB  ratio {predicted / result['peak_mem_bytes']:.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: all): " + ", ".join(CASES))
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one case, print its JSON
    parser.add_argument("--compare-gpu", nargs="+", metavar="JSON", default=(),
                        help="instead: compare with bench/throughput.py results measured on a GPU")
    args = parser.parse_args(argv)
    if args.compare_gpu:
        rows = compare_gpu(args.compare_gpu)
        if args.json_path:
            record = {"command": "python bench/memory_plan_check.py " + " ".join(argv or sys.argv[1:]),
                      "measure": "torch.cuda.max_memory_allocated in bench/throughput.py's training steps",
                      "worst_miss": max(abs(row["ratio"] - 1) for row in rows), "rows": rows}
            Path(args.json_path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return 0
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    rows = []
    print(f"{'case':<28} {'measured':>10} {'predicted':>10} {'ratio':>6}   static m/p (GiB)     step m/p (MiB)")
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"--cases: unknown case {name!r}")
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:<28} {row['measured_total'] / 2**30:>9.3f}G {row['predicted_total'] / 2**30:>9.3f}G "
              f"{row['ratio']:>6.3f}   {row['measured_static'] / 2**30:.3f} / {row['predicted_static'] / 2**30:.3f}"
              f"     {row['measured_step_peak'] / 2**20:.0f} / {row['predicted_step'] / 2**20:.0f}", flush=True)
    worst = max(abs(row["ratio"] - 1) for row in rows)
    print(f"worst miss: {worst:.1%}")
    if args.json_path:
        record = {"command": "python bench/memory_plan_check.py " + " ".join(argv or sys.argv[1:]),
                  "device": "cpu", "goal": "every prediction within 10 % of the measurement", "worst_miss": worst,
                  "cases": rows}
        Path(args.json_path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
