"""Peak host memory while loading a Phi-2-size checkpoint as NF4 (issue 4's memory claim).

    python bench/nf4_load_memory.py [--checkpoint DIR] [--dtype float32|bfloat16] [--json PATH]

The first run writes a random 2.78B-parameter fp16 checkpoint with Phi-2's real shapes (config
from shared/docs/reference.md, two safetensors shards as on the hub) to DIR, outside the repo
(default /tmp/phicore-bench/phi-2-random-fp16, 5.6 GB); later runs reuse it. Then a fresh
subprocess loads it with `phicore.load_model(DIR, device="cpu", quantize="nf4")` while a thread
samples /proc/self/status every 5 ms, and the figures are compared with what the loaded model
holds (packed NF4 weights + the dense embeddings, lm_head, norms and biases) and with the
largest single dense tensor of the checkpoint:

- peak RSS (VmHWM, what `ru_maxrss` reports), and its two parts at their peaks: anonymous memory
  (RssAnon: the model, tensors in flight) and file-backed pages (RssFile: the checkpoint's
  pages mapped by safetensors, which the kernel can drop at any time and reads back on demand);
- the claim checked: peak anonymous memory <= model bytes + one dense tensor + the interpreter
  baseline + slack.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/ holds a kernels.py: keep it from shadowing phicore's `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from bench._measure import proc_status  # noqa: E402

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
DEFAULT_DIR = Path("/tmp/phicore-bench/phi-2-random-fp16")

# microsoft/phi-2 config.json (reference.md section 1)
PHI2_CONFIG = {
    "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560,
    "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
    "max_position_embeddings": 2048, "tie_word_embeddings": False, "qk_layernorm": False, "resid_pdrop": 0.1,
    "embd_pdrop": 0.0, "attention_dropout": 0.0, "bos_token_id": 50256, "eos_token_id": 50256,
    "torch_dtype": "float16",
}


def phi2_tensor_shapes(config: dict) -> dict:
    """name -> shape for every tensor of a Phi-2 checkpoint (Hugging Face names)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.final_layernorm.weight": (h,),
              "model.final_layernorm.bias": (h,), "lm_head.weight": (v, h), "lm_head.bias": (v,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,)})
        for name in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes.update({p + f"self_attn.{name}.weight": (h, h), p + f"self_attn.{name}.bias": (h,)})
        shapes.update({p + "mlp.fc1.weight": (f, h), p + "mlp.fc1.bias": (f,),
                       p + "mlp.fc2.weight": (h, f), p + "mlp.fc2.bias": (h,)})
    return shapes


def write_random_checkpoint(directory: Path, max_shard_bytes: int = 5 * 10**9) -> None:
    """Random fp16 Phi-2 weights (std 0.02; norms 1, biases 0.01 std) as hub-style shards."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shapes = phi2_tensor_shapes(PHI2_CONFIG)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"writing a random {total / 1e9:.2f}B-parameter fp16 Phi-2 checkpoint to {directory}", flush=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    index = {"metadata": {"total_size": total * 2}, "weight_map": {}}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            if "layernorm.weight" in name:
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            else:
                std = 0.01 if name.endswith(".bias") else 0.02
                tensors[name] = (torch.randn(shape, generator=generator) * std).to(torch.float16)
            index["weight_map"][name] = file
        save_file(tensors, str(directory / (file + ".tmp")), metadata={"format": "pt"})
        os.replace(directory / (file + ".tmp"), directory / file)
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(PHI2_CONFIG, indent=2))  # last: marks the folder complete


class MemorySampler(threading.Thread):
    """Samples /proc/self/status every `interval` seconds and keeps each field's peak (bytes)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peaks, self._halt = interval, {}, threading.Event()

    def run(self):
        while not self._halt.is_set():
            for key, value in proc_status(*STATUS_FIELDS).items():
                self.peaks[key] = max(self.peaks.get(key, 0), value)
            time.sleep(self.interval)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        for key, value in proc_status(*STATUS_FIELDS).items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)
        return self.peaks


def measure(checkpoint: Path, dtype: str) -> dict:
    """Runs inside the measuring subprocess: load as NF4 and report memory figures (bytes)."""
    import torch

    import phicore
    from phicore.frozen_linear import NF4Linear
    from phicore.weights import read_header_shapes

    torch.set_num_threads(os.cpu_count() or 1)
    baseline = proc_status(*STATUS_FIELDS)
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    model = phicore.load_model(checkpoint, device="cpu", dtype=dtype, quantize="nf4")
    seconds = time.perf_counter() - started
    peaks = sampler.stop()
    after = proc_status(*STATUS_FIELDS)

    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # tied weights count once here
    packed = sum(m.weight.numel() for m in model.modules() if isinstance(m, NF4Linear))
    element_size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    shapes = read_header_shapes(sorted(checkpoint.glob("*.safetensors")))  # key -> (file, shape)
    largest = max(math.prod(shape) for _, shape in shapes.values()) * element_size
    return {
        "load_seconds": round(seconds, 2),
        "baseline_rss_bytes": baseline["VmRSS"],
        "peak_rss_bytes": peaks["VmHWM"],
        "peak_anon_bytes": peaks["RssAnon"],
        "peak_file_backed_bytes": peaks["RssFile"],
        "rss_after_load_bytes": after["VmRSS"],
        "anon_after_load_bytes": after["RssAnon"],
        "model_state_bytes": held,
        "packed_nf4_weight_bytes": packed,
        "largest_dense_tensor_bytes": largest,
        "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")),
        "nf4_layers": sum(isinstance(m, NF4Linear) for m in model.modules()),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help="where the random checkpoint lives")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of the dense parts (fp32 is phicore's CPU default)")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/nf4-load-memory-cpu-<dtype>-<date>.json)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args.checkpoint, args.dtype)))
        return 0
    if not (args.checkpoint / "config.json").exists():
        write_random_checkpoint(args.checkpoint)
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", "--checkpoint", str(args.checkpoint),
               "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return done.returncode
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    budget = figures["model_state_bytes"] + figures["largest_dense_tensor_bytes"] + figures["baseline_rss_bytes"]
    figures["anon_budget_bytes"] = budget
    figures["anon_within_budget"] = figures["peak_anon_bytes"] <= budget * 1.10
    import torch

    result = {
        "benchmark": "nf4-load-memory", "date": date.today().isoformat(), "device": "cpu",
        "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "compute_dtype": args.dtype,
        "checkpoint": {"dir": str(args.checkpoint), "parameters": sum(torch.Size(s).numel() for s in
                                                                        phi2_tensor_shapes(PHI2_CONFIG).values()),
                       "dtype": "float16", "weights": "random, written by this script"},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "figures": figures,
    }
    out = args.json or REPO / "bench" / "results" / f"nf4-load-memory-cpu-{args.dtype}-{date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [("checkpoint on disk (fp16)", figures["checkpoint_bytes"]),
            ("loaded model (NF4 + dense parts)", figures["model_state_bytes"]),
            ("  of which packed NF4 weights", figures["packed_nf4_weight_bytes"]),
            ("largest dense tensor", figures["largest_dense_tensor_bytes"]),
            ("baseline RSS (python + torch)", figures["baseline_rss_bytes"]),
            ("peak anonymous memory", figures["peak_anon_bytes"]),
            ("budget: model + 1 tensor + baseline", budget),
            ("peak file-backed pages (page cache)", figures["peak_file_backed_bytes"]),
            ("peak RSS (VmHWM = ru_maxrss)", figures["peak_rss_bytes"]),
            ("RSS after load", figures["rss_after_load_bytes"])]
    for label, value in rows:
        print(f"{label:40s} {gib(value):>12s}")
    print(f"load time {figures['load_seconds']} s; anonymous peak within budget (+10%): {figures['anon_within_budget']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
