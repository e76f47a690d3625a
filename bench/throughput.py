"""Training and inference speed and memory: phicore against transformers + peft (+ bitsandbytes).

    python bench/throughput.py --shape small --device cpu
    python bench/throughput.py --shape phi-3-mini-4k --device cuda --seq-len 2048 --batch-size 1

For one model shape, sequence length, batch size, LoRA rank/targets, dtype and gradient
checkpointing setting, each engine (phicore-lora, phicore-qlora, hf-lora, hf-qlora) runs in its
own subprocess (bench/_worker.py): load a random-weight checkpoint made once on the device, add
LoRA, run warm-up then timed training steps (forward + loss, backward, clip + AdamW), then
greedy generation at batch 1. A table is printed last; a JSON file is written to
bench/results/ (or --json PATH) with versions, device, settings, the command line, one object
per engine under "engines", and each phicore engine's ratios to its HF counterpart.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py must not shadow the `kernels` package phicore imports: the repository root
# goes first on the path instead of this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench._engines import COUNTERPARTS, ENGINES, PHICORE_OPTIONS  # noqa: E402
from bench._shapes import SHAPES, parameter_count, shape_config, training_flops_per_token  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
WORKER = ROOT / "bench" / "_worker.py"
SCHEMA_VERSION = 1
HF_LIBRARIES = {"hf-lora": ("transformers", "peft"), "hf-qlora": ("transformers", "peft", "bitsandbytes")}


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape (random weights)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"],
                        help="device (default: cuda, else mps, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights and compute dtype; auto: bf16 on cuda, fp32 on cpu/mps. Half precision "
                             "trains under autocast in that dtype; LoRA weights stay fp32 in every engine")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the shape's)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the shape's): real widths with fewer layers, e.g. on a CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the shape's)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--targets", default="all-linear",
                        help="LoRA targets: all-linear or module names (q_proj,k_proj,v_proj,dense,fc1,fc2 for "
                             "Phi-2; qkv_proj,o_proj,gate_up_proj,down_proj for Phi-3)")
    checkpointing = parser.add_mutually_exclusive_group()
    checkpointing.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_true", default=True,
                               help="per-layer gradient checkpointing in every engine")
    checkpointing.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, as phicore's loop")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="generation prompt tokens (default: min(seq-len, 512))")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per generation run (0: no "
                                                                   "generation)")
    parser.add_argument("--gen-repeats", type=int, default=3, help="generation runs per length (median taken)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per engine process (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step per engine with torch.profiler (tables next to the JSON)")
    parser.add_argument("--memory-peak", action="store_true",
                        help="CUDA: one extra step per engine with the allocator's history: what is alive at the "
                             "peak, by allocating line, beside the memory planner's terms (text next to the JSON)")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="where to write the results (default: "
                             "bench/results/<device>-<date>-<shape>-seq<N>-b<B>[-t<threads>][-<options>].json)")
    parser.add_argument("--phicore-option", dest="phicore_options", action="append", default=[],
                        choices=list(PHICORE_OPTIONS), metavar="NAME",
                        help="ablation: switch one phicore change off (repeatable): " +
                             "; ".join(f"{k}: {v[0]}" for k, v in PHICORE_OPTIONS.items()))
    parser.add_argument("--peak-size", type=int, default=None,
                        help="side of the square matrix product that measures the device's peak FLOP/s for MFU "
                             "(default: 8192 on cuda, 2048 elsewhere; 0: no peak, no MFU)")
    parser.add_argument("--keep-checkpoint", default=None,
                        help="folder for the random checkpoint, kept and reused if present (default: a temp dir)")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """The settings every engine runs with, defaults filled in; UsageError on bad values."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else
                             "mps" if torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: torch sees no MPS device")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    _, default_seq, default_batch = SHAPES[args.shape]
    config = shape_config(args.shape)
    if args.layers is not None:
        if args.layers < 1:
            raise UsageError(f"--layers must be at least 1, got {args.layers}")
        config["num_hidden_layers"] = args.layers
    seq_len = args.seq_len or default_seq
    batch_size = args.batch_size or default_batch
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise UsageError(f"--engines: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(ENGINES)})")
    for name, value, low in (("--seq-len", seq_len, 2), ("--batch-size", batch_size, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0), ("--lora-r", args.lora_r, 1),
                             ("--new-tokens", args.new_tokens, 0), ("--gen-repeats", args.gen_repeats, 1),
                             ("--prompt-len", 1 if args.prompt_len is None else args.prompt_len, 1),
                             ("--threads", 1 if args.threads is None else args.threads, 1),
                             ("--peak-size", 0 if args.peak_size is None else args.peak_size, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if seq_len > config["max_position_embeddings"]:
        raise UsageError(f"--seq-len {seq_len} is longer than {args.shape}'s {config['max_position_embeddings']} "
                         "positions")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    prompt_len = args.prompt_len or min(seq_len, 512)
    if prompt_len + args.new_tokens + 1 > config["max_position_embeddings"]:
        raise UsageError(f"--prompt-len {prompt_len} + --new-tokens {args.new_tokens} exceed {args.shape}'s positions")
    threads = args.threads or (os.cpu_count() if device == "cpu" else None)
    return {
        "shape": args.shape, "model_config": config, "params": parameter_count(config),
        "device": device, "dtype": dtype, "seq_len": seq_len, "batch_size": batch_size,
        "tokens_per_step": seq_len * batch_size, "steps": args.steps, "warmup": args.warmup,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": args.targets},
        "grad_checkpointing": args.grad_checkpointing, "lr": args.lr, "max_grad_norm": args.max_grad_norm,
        "optimizer": "torch.optim.AdamW (default foreach), weight_decay 0; clip_grad_norm_ before each step",
        "autocast": dtype if dtype in ("bf16", "fp16") else None,
        "prompt_len": prompt_len, "new_tokens": args.new_tokens, "gen_repeats": args.gen_repeats,
        "threads": threads, "seed": args.seed, "engines": engines,
        "flops_per_token": training_flops_per_token(config, seq_len), "peak_size": args.peak_size,
        "phicore_options": sorted(set(args.phicore_options)),
    }


# ----------------------------------------------------------------------------- subprocesses
def run_job(job: dict, work: Path, label: str) -> dict:
    """Run one bench/_worker.py job in a fresh process and return its JSON result."""
    job_path, out_path = work / f"{label}.job.json", work / f"{label}.result.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ)
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(job["threads"])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(WORKER), str(job_path), str(out_path)], env=env, cwd=str(ROOT))
    wall = time.perf_counter() - started
    if not out_path.exists():
        reason = f"failed: worker process exited with status {proc.returncode}"
        if proc.returncode in (-9, 137):
            reason += " (killed: out of memory?)"
        return {"skipped": reason, "process_wall_s": wall}
    result = json.loads(out_path.read_text(encoding="utf-8"))
    result["process_wall_s"] = wall
    return result


def library_missing(engine: str):
    """The first library `engine` needs that is not installed, or None (nothing is imported)."""
    import importlib.util

    for name in HF_LIBRARIES.get(engine, ()):
        if importlib.util.find_spec(name) is None:
            return name
    return None


# ----------------------------------------------------------------------------- the record
def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        out["phicore_commit"] = commit.stdout.strip() or None
        out["phicore_worktree_modified"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["phicore_commit"] = None
    return out


def load_average():
    """1/5/15-minute load averages (the machine may be shared: context for noisy timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_record(settings: dict) -> dict:
    import torch

    from bench._measure import cpu_name, device_name

    device = torch.device(settings["device"])
    out = {"type": device.type, "name": device_name(device), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "threads_per_engine": settings["threads"], "platform": platform.platform(),
           "load_average_at_start": load_average()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   cuda=torch.version.cuda)
    return out


def add_mfu(record: dict) -> None:
    """Model FLOP utilisation per engine: tokens/s x model FLOPs per token / the measured peak.

    "mfu" counts the issue's 2N forward + 2N input-gradient FLOPs per token; "mfu_with_attention"
    adds the causal attention products (bench/_shapes.training_flops_per_token says how)."""
    peak = (record["device"].get("matmul_peak") or {}).get("flops_per_s")
    flops = record["settings"]["flops_per_token"]
    for result in record["engines"].values():
        if peak and "tokens_per_s" in result:
            result["model_tflops_per_s"] = result["tokens_per_s"] * flops["linear"] / 1e12
            result["mfu"] = result["tokens_per_s"] * flops["linear"] / peak
            result["mfu_with_attention"] = result["tokens_per_s"] * (flops["linear"] + flops["attention"]) / peak


def ratios(engines: dict) -> dict:
    """phicore / HF for each pair that both ran. tokens/s: > 1 means phicore is faster; memory and
    seconds: < 1 means phicore is leaner / quicker."""
    out = {}
    for ours, theirs in COUNTERPARTS.items():
        a, b = engines.get(ours, {}), engines.get(theirs, {})
        if "tokens_per_s" not in a or "tokens_per_s" not in b:
            continue
        pair = {
            "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
            "step_s_median": a["step_s_median"] / b["step_s_median"],
            "step_cpu_s_median": a["step_cpu_s"]["median"] / b["step_cpu_s"]["median"],
            "peak_mem_bytes": a["peak_mem_bytes"] / b["peak_mem_bytes"],
            "load_s": a["load_s"] / b["load_s"],
        }
        for key in ("train_increment_bytes", "step_malloc_peak_bytes"):
            if a.get(key) and b.get(key):
                pair[key] = a[key] / b[key]
        if "inference" in a and "inference" in b:
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                pair[key] = a["inference"][key] / b["inference"][key]
        out[f"{ours}/{theirs}"] = pair
    return out


def default_json_path(record: dict) -> Path:
    device = record["device"]
    tag = device["type"]
    if device["type"] == "cuda":
        tag += "-" + re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
    date, s = record["date"][:10], record["settings"]
    threads = f"-t{s['threads']}" if device["type"] == "cpu" else ""
    options = "".join(f"-{name}" for name in s.get("phicore_options", ()))
    layers = "" if s["model_config"]["num_hidden_layers"] == shape_config(s["shape"])["num_hidden_layers"] \
        else f"-l{s['model_config']['num_hidden_layers']}"
    return RESULTS_DIR / f"{tag}-{date}-{s['shape']}{layers}-seq{s['seq_len']}-b{s['batch_size']}{threads}{options}.json"


def write_json(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the table
def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}" if n >= 2**30 else f"{n / 2**20:.1f}M" if n < 2**27 else \
        f"{n / 2**20:.0f}M"


def _num(x, fmt="{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _peak_line(record: dict) -> str:
    peak, flops = record["device"].get("matmul_peak"), record["settings"]["flops_per_token"]
    if not peak or "flops_per_s" not in peak:
        return "MFU: no peak measured" + (f" ({peak['skipped']})" if peak and "skipped" in peak else "")
    return (f"MFU = tok/s x {flops['linear'] / 1e9:.3g} GFLOP/token (2N forward + 2N input gradients, N = "
            f"{flops['matmul_params']:.4g} matmul weights) / measured {peak['dtype']} peak "
            f"{peak['flops_per_s'] / 1e12:.1f} TFLOP/s ({peak['size']}^3 torch.mm)")


def table(record: dict) -> str:
    """The human summary: one row per engine, then the phicore/HF ratios."""
    s, d = record["settings"], record["device"]
    mem_label = {"cpu": "peak RSS", "cuda": "max alloc", "mps": "driver alloc"}[d["type"]]
    lines = [
        f"{s['shape']} ({s['params'] / 1e6:.1f}M params) on {d['name']} [{d['type']}, {s['dtype']}"
        f"{', ' + str(s['threads']) + ' threads' if s['threads'] else ''}], seq {s['seq_len']} x batch "
        f"{s['batch_size']}, LoRA r={s['lora']['r']} {s['lora']['targets']}, grad ckpt "
        f"{'on' if s['grad_checkpointing'] else 'off'}, {s['steps']} timed steps after {s['warmup']}",
        f"load average (1/5/15 min) {d.get('load_average_at_start')} at start, {d.get('load_average_at_end')} at end",
        _peak_line(record),
        "memory in GiB unless marked M (MiB); 'build' = after load + LoRA + optimizer; 'train +' = training peak"
        " above build; 'step Δ' (CPU) = peak bytes malloc'd during one step; 'cpu s/step' = median process CPU"
        " seconds (all threads) per step",
        "",
    ]
    header = ["engine", "tok/s", "MFU", "step s min/med/max", "cpu s/step", "fwd/bwd/opt s", f"{mem_label}", "build",
              "train +", "step Δ",
              "load s", "prefill t/s", "decode t/s", "check loss"]
    rows = []
    for name, e in record["engines"].items():
        if "skipped" in e:
            rows.append([name, "skipped: " + e["skipped"]])
            continue
        build = e["mem_after_build"].get("allocated_bytes", e["mem_after_build"].get("rss_bytes"))
        inference = e.get("inference", {})
        rows.append([
            name, _num(e["tokens_per_s"]), _num(e.get("mfu"), "{:.1%}"),
            "{:.3f}/{:.3f}/{:.3f}".format(e["step_s"]["min"], e["step_s"]["median"], e["step_s"]["max"]),
            f"{e['step_cpu_s']['median']:.3f}",
            "/".join(f"{v:.3f}" for v in e["phases_s_median"].values()),
            _gib(e["peak_mem_bytes"]), _gib(build), _gib(e.get("train_increment_bytes")),
            _gib(e.get("step_malloc_peak_bytes")),
            f"{e['load_s']:.2f}", _num(inference.get("prefill_tokens_per_s")),
            _num(inference.get("decode_tokens_per_s"), "{:.1f}"), f"{e['check_loss']:.4f}",
        ])
    widths = [max(len(str(r[i])) for r in [header] + [r for r in rows if len(r) > 2]) for i in range(len(header))]

    def fmt(row):  # engine name left-aligned, figures right-aligned
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines.append(fmt(header))
    for row in rows:
        lines.append(fmt(row) if len(row) > 2 else f"{row[0].ljust(widths[0])}  {row[1]}")
    if record["ratios"]:
        lines += ["", "phicore / HF (tok/s, prefill, decode: > 1 = phicore faster; cpu s/step, memory, load: < 1 = "
                      "phicore cheaper / leaner / quicker)"]
        for pair, r in record["ratios"].items():
            parts = [f"tok/s {r['tokens_per_s']:.2f}x", f"cpu s/step {r['step_cpu_s_median']:.2f}x",
                     f"peak mem {r['peak_mem_bytes']:.2f}x"]
            if "train_increment_bytes" in r:
                parts.append(f"train + {r['train_increment_bytes']:.2f}x")
            if "step_malloc_peak_bytes" in r:
                parts.append(f"step Δ {r['step_malloc_peak_bytes']:.2f}x")
            parts.append(f"load {r['load_s']:.2f}x")
            if "prefill_tokens_per_s" in r:
                parts += [f"prefill {r['prefill_tokens_per_s']:.2f}x", f"decode {r['decode_tokens_per_s']:.2f}x"]
            lines.append(f"  {pair}: " + ", ".join(parts))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def prepare_checkpoint(checkpoint_dir: Path, settings: dict, work: Path) -> dict:
    """Make the random checkpoint every engine loads, or reuse a kept one made for the same
    shape, dtype and seed; return how it was made."""
    made_for = {key: settings[key] for key in ("shape", "model_config", "dtype", "seed")}
    marker = checkpoint_dir / "bench-checkpoint.json"
    if marker.exists():
        if json.loads(marker.read_text(encoding="utf-8")) != json.loads(json.dumps(made_for)):
            raise UsageError(f"--keep-checkpoint {checkpoint_dir}: made for another shape, dtype or seed "
                             f"(see {marker.name}); give another folder")
        print(f"reusing the checkpoint in {checkpoint_dir}", file=sys.stderr)
        made = {"reused": str(checkpoint_dir)}
    else:
        if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
            raise UsageError(f"--keep-checkpoint {checkpoint_dir}: not empty and not a benchmark checkpoint")
        print(f"making a random {settings['shape']} checkpoint on {settings['device']}", file=sys.stderr)
        made = run_job({"job": "checkpoint", "checkpoint_dir": str(checkpoint_dir), **settings}, work, "checkpoint")
        if "skipped" in made:
            raise RuntimeError(f"could not make the checkpoint: {made['skipped']}")
        marker.write_text(json.dumps(made_for), encoding="utf-8")
    return {
        "how": "random (normal 0.02 matrices, unit norms, zero biases) made on the device in the run dtype by "
               "bench/_worker.py, saved once with phicore.weights.save_model; every engine loads that folder "
               "(phicore.load_model / transformers from_pretrained; 4-bit engines quantise while loading)",
        **made,
    }


def run(args: argparse.Namespace, argv: list) -> dict:
    settings = resolve(args)
    record = {
        "schema": SCHEMA_VERSION,
        "command": shlex.join([Path(sys.executable).name, "bench/throughput.py", *argv]),
        "argv": list(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": device_record(settings),
        "settings": settings,
        "weights": None,
        "engines": {},
        "ratios": {},
    }
    to_run = []
    for name in settings["engines"]:
        missing = library_missing(name)
        if missing:
            print(f"{name}: skipped ({missing} is not installed)", file=sys.stderr)
            record["engines"][name] = {"skipped": f"{missing} is not installed"}
        else:
            to_run.append(name)
    path = Path(args.json_path) if args.json_path else default_json_path(record)
    try:  # fail now, not after minutes of benchmarking
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--json {path}: cannot create its folder ({err})") from None
    work = Path(tempfile.mkdtemp(prefix="phicore-bench-"))
    checkpoint_dir = Path(args.keep_checkpoint) if args.keep_checkpoint else work / "checkpoint"
    try:
        if to_run:
            record["weights"] = prepare_checkpoint(checkpoint_dir, settings, work)
        if to_run and settings["peak_size"] != 0:
            print(f"measuring the {settings['dtype']} matrix-product peak on {settings['device']}", file=sys.stderr)
            record["device"]["matmul_peak"] = run_job({"job": "peak", **settings}, work, "peak")
        for name in to_run:
            print(f"{name}: running", file=sys.stderr)
            job = {"job": "engine", "engine": name, "checkpoint_dir": str(checkpoint_dir), **settings}
            if args.profile:
                job["profile_dir"] = str(work / "profiles")
            if args.memory_peak:
                job["memory_peak_dir"] = str(work / "memory-peaks")
            result = run_job(job, work, name)
            if "skipped" in result:
                print(f"{name}: skipped ({result['skipped']})", file=sys.stderr)
            record["engines"][name] = result
            write_json({**record, "partial": f"written after {name}"}, path)  # a killed run keeps what it measured
        record["engines"] = {name: record["engines"][name] for name in settings["engines"]}  # asked order
        add_mfu(record)
        record["ratios"] = ratios(record["engines"])
        record["device"]["load_average_at_end"] = load_average()
        for name, result in record["engines"].items():  # --profile / --memory-peak texts beside the JSON
            for key, suffix in (("profile", "profile"), ("memory_peak", "memory-peak")):
                if "file" in result.get(key, {}):
                    target = path.with_name(f"{path.stem}.{name}.{suffix}.txt")
                    shutil.copyfile(result[key]["file"], target)
                    result[key]["file"] = str(target.relative_to(ROOT) if target.is_relative_to(ROOT) else target)
        write_json(record, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(record))
    print(f"\nwritten: {path}")
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        run(args, argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
