"""NF4 dequantisation bandwidth: phicore's Triton kernel, its PyTorch fallback, bitsandbytes;
and the NF4 matrix-vector product of batch-1 decoding (x @ W^T from the 4-bit bytes).

    python bench/kernels.py                      # the device's default, Phi-3-mini's linear shapes
    python bench/kernels.py --device cpu --quick

For each weight shape, each backend turns a double-quantised NF4 weight (blocksize 64) into a
dense one; GB/s counts the bytes it must read (packed 4-bit codes, 8-bit absmax, nested fp32
absmax) plus the bytes it writes (the dense weight in --dtype), divided by the median time.
In the same run, a device-to-device copy of a buffer as large as the dense weight (bytes read
+ written) gives the ceiling those figures are judged against. Each backend's output is
checked against the PyTorch reference dequantising the same bytes (max abs difference recorded).
`peak MiB`: the memory one call adds above what was in use before it, its output included (on CUDA
max_memory_allocated; on a CPU the peak RSS after a clear_refs reset): a call that keeps no
temporary buffer shows the output's size, rows x cols x the dtype's bytes.

backends:
  triton        kernels.dequantize_nf4(..., backend="triton"): CUDA only (on a CPU it runs only in
                Triton's interpreter, which is no speed figure, so it is skipped there)
  torch         kernels.dequantize_nf4(..., backend="torch"): the PyTorch fallback, any device
  bitsandbytes  bitsandbytes.functional.dequantize_4bit of a bnb.functional.quantize_4bit weight
gemv (x of --gemv-rows rows, default 1: one decode token; weights 3072x3072 and 8192x3072 as
Phi-3-mini's o_proj / gate_up half, 2560x10240 as Phi-2's fc2; --quick: one tiny shape). GB/s
counts the NF4 bytes read (packed codes, absmax, nested absmax, tables; x and y are noise) over
the median time; `vs dequant+matmul` is the dense path's time over the row's:
  triton          kernels.nf4_matvec(..., backend="triton"): kernels/nf4_gemv_triton.py (CUDA;
                  skipped on a CPU, where only the interpreter runs it)
  dequant+matmul  what NF4Linear did before: kernels.dequantize_nf4 (the device's default backend)
                  then F.linear; on a CPU this is also kernels.nf4_matvec's torch reference
  bitsandbytes    bnb.matmul_4bit (its gemv_4bit for one row) on bnb's own quantisation
Each row's output is compared with the torch reference on the same bytes (max relative diff).
On CUDA every row (and the copy) is also timed on the GPU alone (`device_s`, `GPU GB/s`): calls
queued behind a spin kernel run back to back, so the host's launch cost drops out. The median
wall time includes that launch, which is what a host-bound step pays; the GPU time is what the
kernel costs once launches are hidden (CUDA graphs, a host that keeps ahead).
--backends applies to the dequantisation table only; the gemv case runs all three.
A table is printed; a JSON file is written to bench/results/kernels-<device>-<date>.json
(or --json PATH).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# phicore from this checkout: the repository root goes first on the path (bench/ off it).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from phicore import kernels  # noqa: E402
from bench._measure import DTYPES, MemoryProbe, cpu_name, device_name, set_threads, sync  # noqa: E402
from bench.throughput import UsageError, load_average, versions, write_json  # noqa: E402
from phicore.nf4 import quantize_nf4  # noqa: E402

# Phi-3-mini's linear layers (out, in): qkv_proj, o_proj, gate_up_proj, down_proj
PHI3_MINI_SHAPES = [(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192)]
QUICK_SHAPES = [(256, 512), (512, 256)]
# gemv: Phi-3-mini (3072x3072 o_proj/qkv-sized, 8192x3072 half of gate_up), Phi-2 fc2 (2560x10240)
GEMV_SHAPES = [(3072, 3072), (8192, 3072), (2560, 10240)]
QUICK_GEMV_SHAPES = [(128, 256)]
GEMV_BACKENDS = ("triton", "dequant+matmul", "bitsandbytes")
BACKENDS = ("triton", "torch", "bitsandbytes")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"],
                        help="device (default: cuda, else mps, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="dense output dtype; auto: bf16 on cuda, fp32 elsewhere")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated OUTxIN weight shapes (default: Phi-3-mini's four linear shapes)")
    parser.add_argument("--quick", action="store_true", help="two small shapes, few repeats (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per backend and shape "
                                                                  "(default: 50 on cuda, 5 elsewhere; 3 with --quick)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ", ".join(BACKENDS))
    parser.add_argument("--gemv-shapes", default=None,
                        help="comma-separated OUTxIN shapes for the gemv case "
                             "(default: 3072x3072,8192x3072,2560x10240; 'none' skips it)")
    parser.add_argument("--gemv-rows", type=int, default=1, help="rows of x in the gemv case (tokens per step)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--json", dest="json_path", default=None, help="where to write the results")
    return parser.parse_args(argv)


def parse_shapes(text: str) -> list:
    shapes = []
    for item in text.split(","):
        try:
            out_features, in_features = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UsageError(f"--shapes: {item!r} is not OUTxIN (e.g. 3072x8192)") from None
        if out_features < 1 or in_features < 1:
            raise UsageError(f"--shapes: {item!r} has a zero size")
        shapes.append((out_features, in_features))
    return shapes


def time_call(fn, device: torch.device, repeats: int, warmup: int = 2) -> list:
    """Seconds per call, each synchronised, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def device_seconds_per_call(fn, device: torch.device, calls: int = 20) -> dict | None:
    """`_device_seconds_per_call`, or {"device_time_error": why} when it fails: a first run on a new
    GPU or torch must not lose the rest of the table to it."""
    try:
        return _device_seconds_per_call(fn, device, calls)
    except Exception as err:  # noqa: BLE001 - recorded in the results instead
        return {"device_time_error": f"{type(err).__name__}: {err}"}


def _device_seconds_per_call(fn, device: torch.device, calls: int = 20) -> dict | None:
    """GPU seconds per call with the host's launch cost taken out; None off CUDA.

    `time_call` times each call from the host, launch included: on a host slower than the GPU
    (the H200 VM of 2026-11-26 took ~40 us per Triton launch) that measures the launch, not the
    kernel. Here a spin kernel (torch.cuda._sleep) holds the GPU while the host queues `calls`
    calls behind a start event, so they run back to back and the events time only the GPU.
    `queued_behind_spin` says the spin outlasted the queueing (else the figure still includes
    host time: the spin is lengthened and tried once more before reporting so)."""
    if device.type != "cuda":
        return None
    fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host_s = time.perf_counter() - started  # queueing time (the GPU may finish some meanwhile)
    sync(device)
    # the spin kernel's cycles per second, measured: sm clocks vary
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    sync(device)
    cycles_per_s = 1_000_000 / (begin.elapsed_time(end) / 1e3)
    spin_s = max(0.02, 3 * host_s)
    for _attempt in range(2):
        torch.cuda._sleep(int(spin_s * cycles_per_s))
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        queued = not begin.query()  # the GPU is still spinning: every call waits in the queue
        sync(device)
        if queued:
            break
        spin_s *= 4
    return {"device_s": begin.elapsed_time(end) / 1e3 / calls, "calls": calls, "queued_behind_spin": queued,
            "host_queue_s": host_s / calls}


# the MemoryProbe.current() field that peak_since_reset() measures, per device type
PEAK_MEASURE = {"cuda": "allocated_bytes", "mps": "driver_allocated_bytes"}


def call_peak_bytes(fn, device: torch.device) -> int | None:
    """Memory one call of fn adds at its peak above what was in use before it (output included);
    None where the platform gives no peak (a CPU without /proc/self/clear_refs)."""
    probe = MemoryProbe(device)
    sync(device)
    before = probe.current()[PEAK_MEASURE.get(device.type, "rss_bytes")]
    probe.reset_peak()
    out = fn()
    sync(device)
    peak = probe.peak_since_reset()
    del out
    return None if peak is None or before is None else peak - before


def nf4_bytes(n: int, dtype: torch.dtype, blocksize: int = 64, nested_blocksize: int = 256) -> dict:
    """Bytes a double-quantised NF4 dequantisation of n elements reads and writes."""
    n_blocks = math.ceil(n / blocksize)
    read = (n + 1) // 2 + n_blocks + 4 * math.ceil(n_blocks / nested_blocksize) + 4 * 16 + 4 * 256
    written = n * torch.empty((), dtype=dtype).element_size()
    return {"read": read, "written": written, "total": read + written}


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> dict:
    """Device-to-device copy of an nbytes buffer: (read + written) bytes / median seconds."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, repeats)
    median = statistics.median(times)
    out = {"bytes": nbytes, "median_s": median, "gb_per_s": 2 * nbytes / median / 1e9}
    device_time = device_seconds_per_call(lambda: dst.copy_(src), device)
    if device_time is not None:
        out.update(device_time)
        if "device_s" in device_time:
            out["device_gb_per_s"] = 2 * nbytes / device_time["device_s"] / 1e9
    return out


def _state_from_bnb(quant_state):
    """phicore's NF4State for a bitsandbytes QuantState (the same numbers, for the reference)."""
    from phicore.nf4 import NF4State

    nested = getattr(quant_state, "state2", None)
    return NF4State(absmax=quant_state.absmax, shape=quant_state.shape, dtype=quant_state.dtype,
                    blocksize=quant_state.blocksize, code=quant_state.code,
                    nested_absmax=None if nested is None else nested.absmax,
                    nested_code=None if nested is None else nested.code,
                    offset=None if nested is None else float(quant_state.offset),
                    nested_blocksize=256 if nested is None else nested.blocksize)


def triton_skip_reason(device: torch.device) -> str:
    """Why the Triton backend gives no speed figure on `device`."""
    if device.type == "cpu":
        return "runs on CPU only in Triton's interpreter (no speed figure)"
    return f"needs triton and a CUDA device ({device.type} here)"


def backend_runner(backend: str, weight: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """(call making the dense weight, call making the PyTorch reference of the same packed bytes)
    or (None, the reason the backend cannot run here)."""
    if backend in ("triton", "torch"):
        if backend == "triton" and not kernels.triton_available(device):
            return None, triton_skip_reason(device)
        packed, state = quantize_nf4(weight)
        return (lambda: kernels.dequantize_nf4(packed, state, dtype, backend=backend),
                lambda: kernels.dequantize_nf4(packed, state, dtype, backend="torch"))
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as err:
        return None, f"bitsandbytes is not installed ({err})"
    if device.type == "mps":
        return None, "bitsandbytes has no MPS backend"
    # bnb quantises its own copy (its CPU op picks another 8-bit absmax code for a few blocks
    # than phicore does); the reference dequantises bnb's bytes with phicore's PyTorch path.
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return (lambda: bnbf.dequantize_4bit(packed, state),
            lambda: kernels.dequantize_nf4(packed, _state_from_bnb(state), dtype, backend="torch"))


def gemv_runner(backend: str, weight: torch.Tensor, x: torch.Tensor, device: torch.device):
    """(call computing x @ W^T from NF4 bytes, call computing the torch reference on the same
    bytes) or (None, the reason the backend cannot run here)."""
    if backend in ("triton", "dequant+matmul"):
        if backend == "triton" and not kernels.triton_available(device):
            return None, triton_skip_reason(device)
        packed, state = quantize_nf4(weight)
        reference = lambda: kernels.nf4_matvec(x, packed, state, backend="torch")  # noqa: E731
        if backend == "triton":
            return lambda: kernels.nf4_matvec(x, packed, state, backend="triton"), reference
        return lambda: torch.nn.functional.linear(x, kernels.dequantize_nf4(packed, state, x.dtype)), reference
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        return None, f"bitsandbytes is not installed ({err})"
    if device.type == "mps":
        return None, "bitsandbytes has no MPS backend"
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = _state_from_bnb(state)
    return (lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
            lambda: kernels.nf4_matvec(x, packed, ours, backend="torch"))


def run_gemv(shapes: list, rows: int, dtype: torch.dtype, device: torch.device, repeats: int,
             backends: list, skipped: dict) -> list:
    """One row per (shape, backend): median time, NF4 GB/s read, speed-up over dequant+matmul."""
    generator = torch.Generator().manual_seed(1)
    results = []
    for out_features, in_features in shapes:
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(device=device, dtype=dtype)
        x = torch.randn(rows, in_features, generator=generator).to(device=device, dtype=dtype)
        rows_out = []
        for backend in backends:
            fn, reference = gemv_runner(backend, weight, x, device)
            if fn is None:
                skipped[backend] = reference
                continue
            median_times = time_call(fn, device, repeats)
            median = statistics.median(median_times)
            ref = reference().float()
            diff = float((fn().float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
            read = nf4_bytes(weight.numel(), dtype)["read"]
            rows_out.append({"shape": [out_features, in_features], "rows": rows, "backend": backend,
                             "nf4_bytes_read": read, "median_s": median, "min_s": min(median_times),
                             "gb_per_s": read / median / 1e9, "max_rel_diff_vs_torch": diff})
            device_time = device_seconds_per_call(fn, device)
            if device_time is not None:
                rows_out[-1].update(device_time)
                if "device_s" in device_time:
                    rows_out[-1]["device_gb_per_s"] = read / device_time["device_s"] / 1e9
        dense = next((r["median_s"] for r in rows_out if r["backend"] == "dequant+matmul"), None)
        for r in rows_out:
            r["speedup_vs_dequant_matmul"] = None if dense is None else dense / r["median_s"]
        results += rows_out
    return results


def run(args: argparse.Namespace, argv: list) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else
                                          "mps" if torch.backends.mps.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: torch sees no MPS device")
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    threads = set_threads(args.threads or (os.cpu_count() if device.type == "cpu" else None))
    shapes = parse_shapes(args.shapes) if args.shapes else QUICK_SHAPES if args.quick else PHI3_MINI_SHAPES
    repeats = args.repeats or (3 if args.quick else 50 if device.type == "cuda" else 5)
    if args.gemv_rows < 1:
        raise UsageError(f"--gemv-rows must be at least 1, got {args.gemv_rows}")
    gemv_shapes = ([] if args.gemv_shapes == "none" else parse_shapes(args.gemv_shapes) if args.gemv_shapes
                   else QUICK_GEMV_SHAPES if args.quick else GEMV_SHAPES)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UsageError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")

    record = {
        "command": " ".join(["python", "bench/kernels.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {"type": device.type, "name": device_name(device), "cpu": cpu_name(), "threads": threads,
                   "load_average_at_start": load_average()},
        "settings": {"dtype": dtype_name, "blocksize": 64, "double_quant": True, "repeats": repeats,
                     "shapes": [list(s) for s in shapes], "backends": backends,
                     "bytes_counted": "read: packed codes n/2 + uint8 absmax n/64 + fp32 nested absmax + code "
                                      "tables; written: n * element size of dtype"},
        "copy": None,
        "results": [],
        "skipped": {},
        "gemv": {"rows": args.gemv_rows, "shapes": [list(s) for s in gemv_shapes], "backends": list(GEMV_BACKENDS),
                 "bytes_counted": "NF4 bytes read: packed codes n/2 + uint8 absmax n/64 + fp32 nested absmax + "
                                  "code tables (x and y not counted)",
                 "results": [], "skipped": {}},
    }
    largest = max(o * i for o, i in shapes) * torch.empty((), dtype=dtype).element_size()
    record["copy"] = copy_bandwidth(largest, device, repeats)
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in shapes:
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(device=device, dtype=dtype)
        rows = []
        for backend in backends:
            fn, reference = backend_runner(backend, weight, dtype, device)
            if fn is None:
                record["skipped"][backend] = reference  # the reason
                continue
            times = time_call(fn, device, repeats)
            median = statistics.median(times)
            counted = nf4_bytes(weight.numel(), dtype)
            diff = float((fn().float() - reference().float()).abs().max())
            peak = call_peak_bytes(fn, device)
            rows.append({"shape": [out_features, in_features], "backend": backend, "elements": weight.numel(),
                         "bytes": counted, "median_s": median, "min_s": min(times),
                         "gb_per_s": counted["total"] / median / 1e9, "elements_per_s": weight.numel() / median,
                         "fraction_of_copy": counted["total"] / median / 1e9 / record["copy"]["gb_per_s"],
                         "max_abs_diff_vs_torch": diff, "call_peak_bytes": peak})
            device_time = device_seconds_per_call(fn, device)
            if device_time is not None:  # the kernel alone, launch excluded (CUDA)
                rows[-1].update(device_time)
                if "device_s" in device_time and "device_gb_per_s" in record["copy"]:
                    device_gb_per_s = counted["total"] / device_time["device_s"] / 1e9
                    rows[-1].update(device_gb_per_s=device_gb_per_s,
                                    device_fraction_of_copy=device_gb_per_s / record["copy"]["device_gb_per_s"])
        record["results"] += rows
    g = record["gemv"]
    g["results"] = run_gemv(gemv_shapes, args.gemv_rows, dtype, device, repeats, list(GEMV_BACKENDS), g["skipped"])
    return record


def table(record: dict) -> str:
    d, s = record["device"], record["settings"]
    lines = [f"NF4 dequantisation on {d['name']} [{d['type']}, out {s['dtype']}, {d['threads']} threads], "
             f"median of {s['repeats']}",
             f"device copy ceiling: {record['copy']['gb_per_s']:.1f} GB/s ({record['copy']['bytes'] / 2**20:.1f} MiB "
             "buffer, read + write)"
             + (f"; GPU time alone: {record['copy']['device_gb_per_s']:.1f} GB/s" if "device_gb_per_s" in record["copy"]
                else ""), ""]
    header = ["shape", "backend", "GB/s", "of copy", "ms", "Gelem/s", "peak MiB", "max|diff| vs torch"]
    rows = [[f"{r['shape'][0]}x{r['shape'][1]}", r["backend"], f"{r['gb_per_s']:.2f}",
             f"{100 * r['fraction_of_copy']:.0f}%", f"{1e3 * r['median_s']:.3f}", f"{r['elements_per_s'] / 1e9:.2f}",
             "-" if r.get("call_peak_bytes") is None else f"{r['call_peak_bytes'] / 2**20:.0f}",
             "-" if r.get("max_abs_diff_vs_torch") is None else f"{r['max_abs_diff_vs_torch']:.1e}"]
            for r in record["results"]]
    if any("device_gb_per_s" in r for r in record["results"]):  # CUDA: the kernel alone, launch excluded
        header += ["GPU GB/s", "GPU of copy"]
        for row, r in zip(rows, record["results"]):
            row += [f"{r['device_gb_per_s']:.1f}", f"{100 * r['device_fraction_of_copy']:.0f}%"] \
                if "device_gb_per_s" in r else ["-", "-"]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for backend, why in record["skipped"].items():
        lines.append(f"{backend}: skipped ({why})")
    g = record.get("gemv") or {}
    if g.get("results") or g.get("skipped"):
        lines += ["", f"NF4 gemv: x ({g['rows']}, in) @ W^T, W NF4 (out, in); GB/s of NF4 bytes read"]
        header = ["shape", "backend", "GB/s", "ms", "vs dequant+matmul", "max rel diff vs torch"]
        rows = [[f"{r['shape'][0]}x{r['shape'][1]}", r["backend"], f"{r['gb_per_s']:.2f}",
                 f"{1e3 * r['median_s']:.3f}",
                 "-" if r["speedup_vs_dequant_matmul"] is None else f"{r['speedup_vs_dequant_matmul']:.2f}x",
                 f"{r['max_rel_diff_vs_torch']:.1e}"] for r in g["results"]]
        if any("device_gb_per_s" in r for r in g["results"]):
            header += ["GPU GB/s"]
            for row, r in zip(rows, g["results"]):
                row.append(f"{r['device_gb_per_s']:.1f}" if "device_gb_per_s" in r else "-")
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        for row in [header] + rows:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        for backend, why in g["skipped"].items():
            lines.append(f"gemv {backend}: skipped ({why})")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        record = run(args, argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json_path:
        path = Path(args.json_path)
    else:
        tag = record["device"]["type"]
        if tag == "cuda":
            tag += "-" + "".join(c if c.isalnum() else "-" for c in record["device"]["name"].lower()).strip("-")
        path = ROOT / "bench" / "results" / f"kernels-{tag}-{record['date'][:10]}.json"
    write_json(record, path)
    print(table(record))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
