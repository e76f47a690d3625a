"""One benchmark job in its own process, so each engine's memory figures are its own.

    python bench/_worker.py JOB.json RESULT.json

JOB["job"] is "checkpoint" (write the random-weight checkpoint every engine loads), "peak" (the
device's measured matrix-product rate in the run dtype: the MFU denominator) or "engine" (load,
add LoRA, time training steps, time generation, for JOB["engine"]). The result is written
as JSON; an engine that cannot run here writes {"skipped": reason}.

Per engine, in order:
 1. load the checkpoint onto the device (timed: `load_s`), add LoRA (`lora_s`);
 2. one no-grad loss on the benchmark batch with dropout off (`check_loss`): every engine holds
    the same model, so these agree across engines (to NF4 rounding between LoRA and QLoRA);
 3. warm-up steps, then timed steps: forward + loss, backward, clip + AdamW step + zero_grad,
    the device synchronised at each phase boundary (`phases_s_median`);
 4. a profiled step when asked (torch.profiler; top ops by self time), and one with the CUDA
    allocator's history (what is alive at the step's peak, by allocating line) when asked;
 5. generation at batch 1: prefill and decode tokens/s from greedy runs of 1 and 1 + K tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py must not shadow the `kernels` package phicore imports: the repository root
# goes first on the path instead of this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._engines import ENGINES, LoraSettings, PhicoreEngine, Unavailable  # noqa: E402
from bench._measure import DTYPES, Clock, MallocPeak, MemoryProbe, matmul_peak, rss_bytes, set_threads, sync  # noqa: E402



def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the checkpoint
def make_checkpoint(job: dict) -> dict:
    """Random weights made on the device, saved as a Hugging Face folder by phicore.save_model.

    Built directly on the device in the run dtype (not on the meta device: its first `normal_`
    costs seconds of lazy imports), then filled in place: normal(0, 0.02) matrices and
    embeddings, unit norm weights, zero biases (transformers' initialisation).
    """
    from phicore.config import ModelConfig
    from phicore.model import PhiForCausalLM
    from phicore.weights import save_model

    started = time.perf_counter()
    device, dtype = torch.device(job["device"]), DTYPES[job["dtype"]]
    torch.manual_seed(job["seed"])
    config = ModelConfig.from_dict(job["model_config"])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = PhiForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # norm weights
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    save_model(model, job["checkpoint_dir"])
    size = sum(f.stat().st_size for f in Path(job["checkpoint_dir"]).glob("*.safetensors"))
    return {"seconds": time.perf_counter() - started, "bytes_on_disk": size,
            "params": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- one engine
def make_batch(job: dict, vocab_size: int, device: torch.device):
    """The benchmark batch: seeded random ids (B, T), every position a real token, every token
    but the first a target (phicore's Batch; labels not shifted)."""
    from phicore.data.collate import Batch
    from phicore.data.tokenization import IGNORE_INDEX

    B, T = job["batch_size"], job["seq_len"]
    generator = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(0, vocab_size, (B, T), generator=generator)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    batch = Batch(ids, labels, torch.ones_like(ids), torch.arange(T).expand(B, T).clone(),
                  num_target_tokens=B * (T - 1), num_tokens=B * T)
    return batch.to(device)


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Half-precision runs train under autocast in that dtype (phicore's loop and HF's Trainer
    both do); fp32 runs without."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))


@torch.no_grad()
def check_loss(engine, batch, dtype) -> float:
    """The loss of the untrained model on the benchmark batch, dropout off: every engine holds the
    same weights, so this agrees across engines (up to NF4 rounding differences).

    Computed in TRAIN mode with only the dropout modules switched to eval: bitsandbytes 0.50 on a
    CPU with AVX512-BF16 repacks a Linear4bit for inference on its first eval-mode no-grad forward,
    after which backward no longer flows through that layer (gemv_4bit has no autograd kernel), so
    an eval-mode forward here would silently change what hf-qlora trains.
    """
    engine.train_mode(True)
    dropouts = [m for m in engine.model.modules() if isinstance(m, torch.nn.Dropout)]
    for module in dropouts:
        module.eval()
    try:
        with autocast_context(engine.device, dtype):
            return float(engine.forward_loss(batch))
    finally:
        for module in dropouts:
            module.train()


def train_step(engine, batch, optimizer, params, clock: Clock, autocast_dtype, max_grad_norm: float):
    """One optimizer step. Returns (loss, {"forward_loss", "backward", "optimizer"} seconds)."""
    clock.lap()
    with autocast_context(engine.device, autocast_dtype):
        loss = engine.forward_loss(batch)
    forward = clock.lap()
    loss.backward()
    backward = clock.lap()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step = clock.lap()
    return float(loss.detach()), {"forward_loss": forward, "backward": backward, "optimizer": step}


def spread(values: list) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def profile_step(engine, batch, optimizer, params, job: dict, autocast_dtype) -> dict:
    """One more step under torch.profiler: the ops with the most self time, written to a text file."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        train_step(engine, batch, optimizer, params, Clock(engine.device), autocast_dtype, job["max_grad_norm"])
    key = "self_device_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    path = Path(job["profile_dir"]) / f"{job['engine']}.profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(averages.table(sort_by=key, row_limit=40) + "\n", encoding="utf-8")

    def time_of(event):  # microseconds
        return getattr(event, key)

    total = sum(time_of(e) for e in averages) or 1
    top = sorted(averages, key=time_of, reverse=True)[:15]
    return {"file": str(path), "sorted_by": key,
            "top_ops": [{"op": e.key, "self_ms": time_of(e) / 1e3, "share": time_of(e) / total, "calls": e.count}
                        for e in top]}


def memory_peak_step(engine, batch, optimizer, params, job: dict, autocast_dtype) -> dict:
    """One more step with the CUDA allocator's history recorded: what is alive at the step's peak,
    by the phicore (or bench) line that allocated it, next to the memory planner's terms for
    phicore's engines. A text file beside the JSON; the largest sites in the result."""
    from bench._measure import live_at_peak

    device = engine.device
    if device.type != "cuda":
        return {"skipped": "needs CUDA (the allocator's history)"}
    sync(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        train_step(engine, batch, optimizer, params, Clock(device), autocast_dtype, job["max_grad_norm"])
        sync(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = live_at_peak(snapshot["device_traces"][index], str(ROOT))
    result = {"allocated_at_start_bytes": start, "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
              **found}
    if isinstance(engine, PhicoreEngine):
        from bench._shapes import planned_training

        plan = planned_training(job, "nf4" if engine.quantize else None)  # the job carries the run's settings
        result["planner"] = {"peak_bytes": plan.peak_bytes, "terms": {t.name: t.bytes for t in plan.terms}}
    lines = [f"{job['engine']}: one training step, CUDA allocator history",
             f"allocated at start {start / 2**20:.1f} MiB; max allocated {result['max_allocated_bytes'] / 2**20:.1f} MiB; "
             f"peak above start {found['peak_above_start_bytes'] / 2**20:.1f} MiB "
             f"(alive at that moment, allocated during the step: {found['live_at_peak_bytes'] / 2**20:.1f} MiB)", "",
             "MiB alive at the peak  blocks  allocated at (this checkout's frames, innermost first)"]
    lines += [f"{site['bytes'] / 2**20:>21.1f}  {site['blocks']:>6}  {site['site']}" for site in found["sites"]]
    lines.append(f"{found['other_sites_bytes'] / 2**20:>21.1f}          (other sites)")
    if "planner" in result:
        lines += ["", f"memory planner: peak {result['planner']['peak_bytes'] / 2**20:.1f} MiB"]
        lines += [f"{size / 2**20:>21.1f}  {name}" for name, size in result["planner"]["terms"].items()]
    path = Path(job["memory_peak_dir"]) / f"{job['engine']}.memory-peak.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result["file"] = str(path)
    result["sites"] = found["sites"][:10]
    return result


def measure_generation(engine, job: dict, vocab_size: int) -> dict:
    """Prefill and decode speed at batch 1 with greedy generation.

    t1 = median time of generate(prompt, 1 new token), tk = of generate(prompt, 1 + K):
    prefill tokens/s = P / t1, decode tokens/s = K / (tk - t1).
    """
    P, K, repeats = job["prompt_len"], job["new_tokens"], job["gen_repeats"]
    generator = torch.Generator().manual_seed(job["seed"] + 1)
    prompt = torch.randint(0, vocab_size, (P,), generator=generator).tolist()
    engine.train_mode(False)
    clock = Clock(engine.device)

    def timed(n: int) -> float:
        clock.lap()
        produced = engine.generate(prompt, n)
        elapsed = clock.lap()
        if produced != n:
            raise RuntimeError(f"{engine.name}: generate made {produced} tokens, {n} asked")
        return elapsed

    timed(2)  # warm-up
    one = [timed(1) for _ in range(repeats)]
    many = [timed(1 + K) for _ in range(repeats)]
    t1, tk = statistics.median(one), statistics.median(many)
    return {"prompt_len": P, "new_tokens": K, "repeats": repeats, "t_1_token_s": one, "t_1_plus_k_tokens_s": many,
            "prefill_tokens_per_s": P / t1, "decode_tokens_per_s": K / max(tk - t1, 1e-9),
            "decode_s_per_token": (tk - t1) / K}


def _headline_memory(snapshot: dict, device: torch.device):
    """The figure of a MemoryProbe.current() snapshot that peak_since_reset() is comparable with."""
    key = {"cuda": "allocated_bytes", "mps": "driver_allocated_bytes"}.get(device.type, "rss_bytes")
    return snapshot.get(key)


def run_engine(job: dict) -> dict:
    device, dtype = torch.device(job["device"]), DTYPES[job["dtype"]]
    threads = set_threads(job.get("threads"))
    memory = MemoryProbe(device)
    result = {"engine": job["engine"], "threads": threads, "rss_after_import_bytes": rss_bytes()}
    lora = LoraSettings(**job["lora"])
    engine = ENGINES[job["engine"]](device, dtype, lora, job["grad_checkpointing"])
    if isinstance(engine, PhicoreEngine):
        engine.options = tuple(job.get("phicore_options") or ())
    engine.prepare(job["model_config"]["model_type"])
    vocab_size = job["model_config"]["vocab_size"]

    clock = Clock(device)
    engine.load(job["checkpoint_dir"])
    result["load_s"] = clock.lap()
    memory.sample()
    result["mem_after_load"] = memory.current()
    torch.manual_seed(job["seed"])
    engine.add_lora()
    result["lora_s"] = clock.lap()
    result.update(engine.parameter_counts())
    result.update(engine.info())

    batch = make_batch(job, vocab_size, device)
    result["check_loss"] = check_loss(engine, batch, dtype)
    engine.train_mode(True)
    params = engine.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0)
    memory.sample()
    result["mem_after_build"] = memory.current()
    result["mem_peak_before_training"] = memory.peak()
    memory.reset_peak()

    steps, cpu_times, losses, phases, warmup_steps = [], [], [], [], []
    total = job["warmup"] + job["steps"]
    for i in range(total):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss, phase = train_step(engine, batch, optimizer, params, clock, dtype, job["max_grad_norm"])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        memory.sample()
        losses.append(loss)
        if i >= job["warmup"]:
            steps.append(elapsed)
            cpu_times.append(cpu)
            phases.append(phase)
        else:  # the first step pays for torch.compile (--phicore-option compile)
            warmup_steps.append(elapsed)
        log(f"  {job['engine']}: step {i + 1}/{total}{' (warm-up)' if i < job['warmup'] else ''} "
            f"{elapsed:.3f} s, loss {loss:.4f}")
    sync(device)
    tokens = job["batch_size"] * job["seq_len"]
    peak = memory.peak()
    result.update({
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / statistics.median(steps),
        "step_s_median": statistics.median(steps),
        "step_s": spread(steps),
        "step_s_all": steps,
        "warmup_step_s": warmup_steps,
        "step_cpu_s": spread(cpu_times),  # process CPU time (all threads): steadier than wall on a busy host
        "phases_s_median": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "losses": losses,
        **peak,
        "train_peak_bytes": memory.peak_since_reset(),
        "train_peak_reserved_bytes": memory.reserved_since_reset(),
    })
    base = _headline_memory(result["mem_after_build"], device)
    if result["train_peak_bytes"] is not None and base is not None:
        result["train_increment_bytes"] = result["train_peak_bytes"] - base
    if device.type == "cpu" and MallocPeak.available():
        # one more (untimed) step, every op's allocations watched: RSS keeps freed pages cached,
        # so on CPU this is the figure that compares the engines' tensor memory per step
        with MallocPeak() as probe:
            train_step(engine, batch, optimizer, params, Clock(device), dtype, job["max_grad_norm"])
        result["step_malloc_peak_bytes"] = probe.peak_bytes
    if job.get("profile_dir"):
        log(f"  {job['engine']}: profiling one step")
        result["profile"] = profile_step(engine, batch, optimizer, params, job, dtype)
    if job.get("memory_peak_dir"):
        log(f"  {job['engine']}: one step with the allocator's history")
        try:
            result["memory_peak"] = memory_peak_step(engine, batch, optimizer, params, job, dtype)
        except Exception as err:  # noqa: BLE001 - a diagnostic: the engine's timings still count
            result["memory_peak"] = {"error": f"{type(err).__name__}: {err}"}
            log(f"  {job['engine']}: the allocator-history step failed: {err}")
    optimizer.zero_grad(set_to_none=True)
    if job["new_tokens"] > 0:
        log(f"  {job['engine']}: generation, prompt {job['prompt_len']}, {job['new_tokens']} new tokens")
        result["inference"] = measure_generation(engine, job, vocab_size)
    return result


def main(argv: list) -> int:
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text(encoding="utf-8"))
    try:
        if job["job"] == "checkpoint":
            result = make_checkpoint(job)
        elif job["job"] == "peak":
            set_threads(job.get("threads"))
            result = matmul_peak(torch.device(job["device"]), DTYPES[job["dtype"]], job.get("peak_size"))
        else:
            result = run_engine(job)
    except Unavailable as err:
        result = {"skipped": str(err)}
    except Exception as err:  # noqa: BLE001 - one engine failing must not lose the others' figures
        log(traceback.format_exc())
        result = {"skipped": f"failed: {type(err).__name__}: {err}", "error": traceback.format_exc(limit=8)}
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
