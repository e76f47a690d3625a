"""GGUF weight quantisation: phicore's PyTorch quantisers against llama.cpp's own.

    python bench/gguf_quant.py --threads 1                 # Phi-3-mini shapes, every type
    python bench/gguf_quant.py --quick                     # small shapes (a smoke test)
    python bench/gguf_quant.py --full-model q4_k_m         # also quantise all 3.8B weights of a Phi-3-mini-size model

Per GGML type (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0), on a Phi-3-mini layer's weights (3072x3072 as
o_proj, 8192x3072 as half of gate_up; random normal, std 0.02 as Hugging Face initialises them,
fp32): the RMS error of phicore's bytes (the gguf package dequantises them) and of llama.cpp's
(`ggml_quantize_chunk` from llama-cpp-python's libggml: the function `llama-quantize` calls, without
an importance matrix), their ratio, bits per weight, the time and weights/s of each, and the memory phicore's call adds at its peak
(peak RSS above what was in use before it, its output bytes included; the fp32 weight is given). phicore
writes Q4_K/Q5_K/Q6_K/Q4_0 itself (phicore/export/kquants.py) and Q8_0 with the gguf package.
llama.cpp's call runs on one thread (llama-quantize splits the rows over its threads); phicore's
uses torch's --threads.

Per --gguf-type (llama-quantize's mixtures, phicore/export/quant_plan.py) for a Phi-3-mini-size
model (32 layers, hidden 3072, intermediate 8192, vocab 32064, untied output: 3.82B weights): the
bits per weight of the whole file's weights (exact, from the type plan) and the weights/s of
quantising it, extrapolated from the per-type rates measured above (sum of numel / rate over the
model's tensors); with --full-model FTYPE, measured by quantising every tensor of the model (random
normal weights made one tensor at a time, their making not timed).

A table is printed; JSON goes to bench/results/gguf-quant-cpu-<date>.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._measure import cpu_name, set_threads  # noqa: E402
from bench.kernels import call_peak_bytes  # noqa: E402
from bench.throughput import load_average, versions, write_json  # noqa: E402
from phicore.export import kquants, quant_plan  # noqa: E402

SHAPES = [(3072, 3072), (8192, 3072)]
QUICK_SHAPES = [(64, 512), (32, 768)]
GGML_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0")
FTYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0")
PHI3_MINI = {"layers": 32, "hidden": 3072, "intermediate": 8192, "vocab": 32064}


def phi3_mini_tensors(layers=32, hidden=3072, intermediate=8192, vocab=32064) -> list:
    """(GGUF name, torch shape) of every 2-D weight of a Phi-3-mini-size phi3 GGUF file."""
    out = [("token_embd.weight", (vocab, hidden)), ("output.weight", (vocab, hidden))]
    for i in range(layers):
        out += [(f"blk.{i}.attn_qkv.weight", (3 * hidden, hidden)), (f"blk.{i}.attn_output.weight", (hidden, hidden)),
                (f"blk.{i}.ffn_up.weight", (2 * intermediate, hidden)),
                (f"blk.{i}.ffn_down.weight", (hidden, intermediate))]
    return out


# ----------------------------------------------------------------------------- the two quantisers
def llama_cpp_quantize(array: np.ndarray, ggml_type: str):
    """llama.cpp's bytes for `array` (rows, n) in `ggml_type`, by ggml_quantize_chunk (no imatrix),
    or None without llama-cpp-python."""
    try:
        import gguf
        from llama_cpp._ggml import libggml
    except ImportError:
        return None
    qtype = gguf.GGMLQuantizationType[ggml_type]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    array = np.ascontiguousarray(array, dtype=np.float32)
    rows, n = array.shape
    out = np.empty((rows, n // block * nbytes), dtype=np.uint8)
    fn = libggml.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    written = fn(int(qtype), array.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def phicore_quantize(weight: torch.Tensor, ggml_type: str) -> np.ndarray:
    """The bytes phicore's GGUF writer produces for this type (gguf.py `_encode`)."""
    if ggml_type in kquants.QUANTIZERS:
        return kquants.quantize(weight, ggml_type)
    import gguf

    return gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[ggml_type])


def rms_error(data: np.ndarray, ggml_type: str, weight: np.ndarray) -> float:
    import gguf

    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml_type]).reshape(weight.shape)
    return float(np.sqrt(np.mean((back.astype(np.float64) - weight) ** 2)))


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


# ----------------------------------------------------------------------------- the runs
def per_type(shapes, types, repeats: int, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    rows, reason = [], None
    for shape in shapes:
        weight = torch.randn(*shape, generator=generator) * 0.02
        as_numpy = weight.numpy()
        for ggml_type in types:
            phicore_quantize(weight[:8], ggml_type)  # warm-up
            data, seconds = timed(lambda w=weight, t=ggml_type: phicore_quantize(w, t), repeats)
            peak = call_peak_bytes(lambda w=weight, t=ggml_type: phicore_quantize(w, t), torch.device("cpu"))
            row = {"shape": list(shape), "type": ggml_type, "weights": weight.numel(),
                   "writer": "phicore kquants" if ggml_type in kquants.QUANTIZERS else "gguf package",
                   "bits_per_weight": data.nbytes * 8 / weight.numel(), "phicore_rms": rms_error(data, ggml_type, as_numpy),
                   "phicore_s": seconds, "phicore_weights_per_s": weight.numel() / seconds,
                   "phicore_call_peak_bytes": peak, "fp32_weight_bytes": weight.numel() * 4,
                   "llama_cpp_rms": None, "llama_cpp_s": None, "ratio": None, "bytes_identical_fraction": None}
            reference, seconds = timed(lambda a=as_numpy, t=ggml_type: llama_cpp_quantize(a, t), repeats)
            if reference is None:
                reason = "llama-cpp-python is not installed: no llama.cpp figures"
            else:
                row["llama_cpp_rms"] = rms_error(reference, ggml_type, as_numpy)
                row["llama_cpp_s"] = seconds
                row["ratio"] = row["phicore_rms"] / row["llama_cpp_rms"]
                blocks = weight.numel() // quant_plan.BLOCK_SIZE[ggml_type]
                row["bytes_identical_fraction"] = float(np.mean(np.all(
                    data.reshape(blocks, -1) == reference.reshape(blocks, -1), axis=1)))
            rows.append(row)
    return rows, reason


def model_plan(ftype: str, tensors: list) -> dict:
    """Types, bits per weight and weight counts of a Phi-3-mini-size file in `ftype`."""
    import gguf

    counts, nbytes = {}, 0
    for name, shape in tensors:
        ggml_type = quant_plan.tensor_type(name, shape, ftype, PHI3_MINI["layers"], False).ggml_type
        n = int(np.prod(shape))
        counts[ggml_type] = counts.get(ggml_type, 0) + n
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
        nbytes += n // block * size
    total = sum(counts.values())
    return {"weights": total, "weights_by_type": counts, "bits_per_weight": nbytes * 8 / total}


def extrapolated_rate(plan: dict, rates: dict):
    if any(t not in rates for t in plan["weights_by_type"]):
        return None
    seconds = sum(n / rates[t] for t, n in plan["weights_by_type"].items())
    return plan["weights"] / seconds


def full_model(ftype: str, tensors: list, seed: int = 0) -> dict:
    """Quantise every 2-D weight of a Phi-3-mini-size model, one random tensor at a time."""
    generator = torch.Generator().manual_seed(seed)
    seconds, weights = 0.0, 0
    for name, shape in tensors:
        weight = torch.randn(*shape, generator=generator) * 0.02
        ggml_type = quant_plan.tensor_type(name, shape, ftype, PHI3_MINI["layers"], False).ggml_type
        start = time.perf_counter()
        phicore_quantize(weight, ggml_type)
        seconds += time.perf_counter() - start
        weights += weight.numel()
        del weight
    return {"ftype": ftype, "weights": weights, "seconds": seconds, "weights_per_s": weights / seconds}


def run(args, argv) -> dict:
    threads = set_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    record = {
        "command": " ".join(["python", "bench/gguf_quant.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**versions(), **_more_versions()},
        "device": {"type": "cpu", "cpu": cpu_name(), "threads": threads, "llama_cpp_threads": 1,
                   "load_average_at_start": load_average()},
        "settings": {"shapes": [list(s) for s in shapes], "init": "normal, std 0.02, fp32", "repeats": args.repeats,
                     "model": PHI3_MINI},
    }
    rows, reason = per_type(shapes, GGML_TYPES, args.repeats)
    record["per_type"] = rows
    record["llama_cpp_missing"] = reason
    rates = {}
    for ggml_type in GGML_TYPES:  # weights/s over both shapes
        mine = [r for r in rows if r["type"] == ggml_type]
        rates[ggml_type] = sum(r["weights"] for r in mine) / sum(r["phicore_s"] for r in mine)
    tensors = phi3_mini_tensors(**PHI3_MINI)
    record["model"] = []
    for ftype in FTYPES:
        plan = model_plan(ftype, tensors)
        record["model"].append({"ftype": ftype, **plan, "extrapolated_weights_per_s": extrapolated_rate(plan, rates),
                                "extrapolated_seconds": plan["weights"] / extrapolated_rate(plan, rates)})
    record["full_model"] = [full_model(f, tensors) for f in args.full_model]
    return record


def _more_versions() -> dict:
    import importlib.metadata

    out = {}
    for name in ("gguf", "llama_cpp_python", "numpy"):
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def table(record: dict) -> str:
    d = record["device"]
    lines = [f"GGUF quantisation on {d['cpu']}: phicore with {d['threads']} torch thread(s), llama.cpp "
             f"ggml_quantize_chunk on 1 thread", ""]
    header = ["shape", "type", "writer", "bits/w", "RMS phicore", "RMS llama.cpp", "ratio", "same bytes",
              "phicore s", "phicore Mw/s", "llama.cpp s", "peak MiB (weight MiB)"]
    fmt = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
    rows = [[f"{r['shape'][0]}x{r['shape'][1]}", r["type"], r["writer"], f"{r['bits_per_weight']:.4f}",
             f"{r['phicore_rms']:.4e}", fmt(r["llama_cpp_rms"], "{:.4e}"), fmt(r["ratio"], "{:.6f}"),
             fmt(r["bytes_identical_fraction"], "{:.1%}"), f"{r['phicore_s']:.3f}",
             f"{r['phicore_weights_per_s'] / 1e6:.1f}", fmt(r["llama_cpp_s"], "{:.3f}"),
             f"{_mib(r['phicore_call_peak_bytes'])} ({_mib(r['fp32_weight_bytes'])})"] for r in record["per_type"]]
    lines += _aligned(header, rows)
    if record["llama_cpp_missing"]:
        lines.append(record["llama_cpp_missing"])
    lines += ["", f"Phi-3-mini-size model ({record['model'][0]['weights'] / 1e9:.2f}B weights), extrapolated from "
              "the per-type rates above:"]
    header = ["ftype", "bits/w", "Mw/s", "seconds", "types (weights)"]
    rows = [[m["ftype"], f"{m['bits_per_weight']:.3f}", f"{m['extrapolated_weights_per_s'] / 1e6:.1f}",
             f"{m['extrapolated_seconds']:.0f}",
             ", ".join(f"{t} {n / 1e6:.0f}M" for t, n in sorted(m["weights_by_type"].items()))]
            for m in record["model"]]
    lines += _aligned(header, rows)
    for m in record["full_model"]:
        lines.append(f"measured, whole model in {m['ftype']}: {m['weights'] / 1e9:.2f}B weights in "
                     f"{m['seconds']:.0f} s = {m['weights_per_s'] / 1e6:.1f} M weights/s")
    return "\n".join(lines)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _aligned(header, rows) -> list:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [header] + rows]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for phicore (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="two small shapes (a smoke test)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per shape and type (the median is kept)")
    parser.add_argument("--full-model", nargs="*", default=[], choices=FTYPES, metavar="FTYPE",
                        help=f"also quantise every weight of a Phi-3-mini-size model in these types ({', '.join(FTYPES)})")
    parser.add_argument("--json", dest="json_path", default=None, help="results file (default: bench/results/...)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    record = run(args, argv)
    path = Path(args.json_path) if args.json_path else \
        ROOT / "bench" / "results" / f"gguf-quant-cpu-{record['date'][:10]}-t{record['device']['threads']}.json"
    write_json(record, path)
    print(table(record))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
