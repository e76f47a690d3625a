"""Clocks and memory probes for one benchmark process, per device type.

Memory figures, by device:
- cuda: `torch.cuda.max_memory_allocated` (tensors) and `max_memory_reserved` (what the caching
  allocator holds from the driver), whole process, and again since `reset_peak()`.
- cpu:  peak resident set size. Whole process: `getrusage(RUSAGE_SELF).ru_maxrss` (Linux: KiB).
  Since `reset_peak()`: the kernel's VmHWM after writing "5" to /proc/self/clear_refs (Linux
  resets the high-water mark, and ru_maxrss with it, so the earlier peak is kept aside), None
  where that is not possible.
- mps:  `torch.mps.driver_allocated_memory()` sampled at every `sample()` call (the driver
  keeps no peak), so peaks are the largest sample.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import time
from collections import Counter
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# --dtype spellings of the bench tools
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Clock:
    """Wall-clock seconds between marks, synchronising the device at every mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or construction)."""
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def proc_status(*fields: str) -> dict:
    """{field: bytes} for memory lines of /proc/self/status ("VmHWM:   123456 kB"); {} off Linux."""
    values = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in fields:
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    return values


def _proc_status_bytes(field: str) -> Optional[int]:
    return proc_status(field).get(field)


def rss_bytes() -> Optional[int]:
    """Resident set size now (Linux), or None."""
    return _proc_status_bytes("VmRSS")


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryProbe:
    """Current and peak memory of this process on one device (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._mps_peak = 0
        self._mps_since_reset = 0
        self._hwm_reset = False
        self._cuda_before_reset = (0, 0)  # CUDA peaks (allocated, reserved) before the last reset_peak()
        self._rss_before_reset = 0  # clear_refs resets ru_maxrss too: keep the earlier peak

    def sample(self) -> None:
        """Record the current allocation (MPS only keeps peaks this way; elsewhere a no-op)."""
        if self.device.type == "mps":
            now = torch.mps.driver_allocated_memory()
            self._mps_peak = max(self._mps_peak, now)
            self._mps_since_reset = max(self._mps_since_reset, now)

    def current(self) -> dict:
        """Memory in use now: allocated/reserved on CUDA, the driver's allocation on MPS, RSS on CPU."""
        out = {"rss_bytes": rss_bytes()}
        if self.device.type == "cuda":
            out["allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        elif self.device.type == "mps":
            self.sample()
            out["allocated_bytes"] = torch.mps.current_allocated_memory()
            out["driver_allocated_bytes"] = torch.mps.driver_allocated_memory()
        return out

    def peak(self) -> dict:
        """Whole-process peaks so far. `peak_mem_bytes` is the headline figure for the device."""
        if self.device.type == "cuda":
            allocated = max(self._cuda_before_reset[0], torch.cuda.max_memory_allocated(self.device))
            reserved = max(self._cuda_before_reset[1], torch.cuda.max_memory_reserved(self.device))
            return {"peak_mem_bytes": allocated, "peak_reserved_bytes": reserved, "peak_rss_bytes": max_rss_bytes(),
                    "peak_mem_kind": "cuda max_memory_allocated"}
        if self.device.type == "mps":
            self.sample()
            return {"peak_mem_bytes": self._mps_peak, "peak_rss_bytes": max_rss_bytes(),
                    "peak_mem_kind": "mps driver_allocated_memory (max of samples)"}
        return {"peak_mem_bytes": max(self._rss_before_reset, max_rss_bytes()),
                "peak_mem_kind": "cpu peak RSS (ru_maxrss)"}

    def reset_peak(self) -> None:
        """Start a new peak window (the whole-process peak in `peak()` is kept)."""
        if self.device.type == "cuda":
            self._cuda_before_reset = (torch.cuda.max_memory_allocated(self.device),
                                       torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "mps":
            self.sample()
            self._mps_since_reset = torch.mps.driver_allocated_memory()
        else:
            self._rss_before_reset = max(self._rss_before_reset, max_rss_bytes())
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                    clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
                self._hwm_reset = True
            except OSError:
                self._hwm_reset = False

    def peak_since_reset(self) -> Optional[int]:
        """Peak in the window opened by `reset_peak()`, on the headline measure; None if unknown."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.device.type == "mps":
            self.sample()
            return self._mps_since_reset
        return _proc_status_bytes("VmHWM") if self._hwm_reset else None

    def reserved_since_reset(self) -> Optional[int]:
        return torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use_reader():
    """A function returning the bytes glibc's malloc has handed out and not taken back
    (mallinfo2: uordblks + hblkhd), or None where there is no glibc >= 2.33."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


_MALLOC_IN_USE = _malloc_in_use_reader()


class MallocPeak(TorchDispatchMode):
    """Peak of the bytes malloc has handed out, above what it had at entry, sampled after every
    torch op run inside the mode: a CPU tensor-memory peak that, unlike RSS, ignores memory the
    allocator keeps cached. Slows each op a little: use it on an untimed step.

        with MallocPeak() as probe: ...;  probe.peak_bytes
    """

    def __init__(self):
        super().__init__()
        if _MALLOC_IN_USE is None:
            raise RuntimeError("MallocPeak needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
        self.start = _MALLOC_IN_USE()
        self.peak_bytes = 0

    @staticmethod
    def available() -> bool:
        return _MALLOC_IN_USE is not None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak_bytes = max(self.peak_bytes, _MALLOC_IN_USE() - self.start)
        return out


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS (" + cpu_name() + ")"
    return cpu_name()


def set_threads(threads: Optional[int]) -> int:
    """Use `threads` intra-op threads (None: leave torch's default). Returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def environment_threads() -> dict:
    return {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}


def matmul_peak(device: torch.device, dtype: torch.dtype, size: Optional[int] = None, repeats: int = 10,
                seconds_cap: float = 20.0) -> dict:
    """The device's sustained matrix-product rate in `dtype`, measured: the denominator of MFU.

    Square products (size x size) @ (size x size) on normal random data (zeros run faster on
    some GPUs), 3 warm-ups, then `repeats` timed products; the best of three timed rounds is
    kept (the other two absorb clock ramp-up). Default size: 8192 on CUDA, 2048 elsewhere
    (a CPU product of 8192 takes minutes). Stops early after `seconds_cap` seconds on slow
    devices, with the products timed so far.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size**3
    for _ in range(3 if device.type == "cuda" else 1):
        torch.mm(a, b)
    sync(device)
    best, started = 0.0, time.perf_counter()
    for _ in range(3):
        clock, done = Clock(device), 0
        for _ in range(repeats):
            torch.mm(a, b)
            done += 1
            if device.type != "cuda" and time.perf_counter() - started > seconds_cap:
                break
        best = max(best, flops * done / clock.lap())
        if time.perf_counter() - started > seconds_cap:
            break
    return {"flops_per_s": best, "size": size, "dtype": str(dtype).replace("torch.", ""),
            "how": f"best of up to 3 rounds of {repeats} torch.mm products {size}x{size}x{size} on random normal "
                   "data, after warm-up"}


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while active (`ops`: name -> calls): host work that does
    not depend on the machine or its load."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _allocation_site(frames: list, root: str) -> str:
    """'file:line function' of the frames under `root` (this checkout) nearest the allocation,
    up to three, innermost first: where in phicore (or the bench) a block was asked for."""
    if frames and frames[0].get("name") == "<module>":  # outermost first: turn it round
        frames = frames[::-1]
    ours = [f for f in frames if f.get("filename", "").startswith(root)]
    return " < ".join(f"{f['filename'][len(root):].lstrip('/')}:{f['line']} {f['name']}" for f in ours[:3]) or "(outside)"


def live_at_peak(trace: list, root: str, top: int = 25) -> dict:
    """The CUDA caching allocator's trace (torch.cuda.memory._snapshot()["device_traces"][i],
    recorded with _record_memory_history) replayed: the highest bytes allocated above the trace's
    start, and the blocks alive at that moment summed by allocation site (`_allocation_site`).

    A block counts from "alloc" to "free_requested" (when max_memory_allocated stops counting it);
    a freed block allocated before the trace began lowers the running total below the start."""
    def replay(stop: int):
        live, total, peak, peak_at = {}, 0, 0, -1
        for index, event in enumerate(trace[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
            elif event["action"] == "free_requested":
                total -= event["size"]
                live.pop(event["addr"], None)
            if total > peak:
                peak, peak_at = total, index
        return live, peak, peak_at

    _, peak, peak_at = replay(len(trace))
    live, _, _ = replay(peak_at + 1)  # the blocks alive just after the peak's allocation
    sites: dict = {}
    for event in live.values():
        site = sites.setdefault(_allocation_site(event.get("frames", []), root), {"bytes": 0, "blocks": 0})
        site["bytes"] += event["size"]
        site["blocks"] += 1
    ordered = sorted(sites.items(), key=lambda item: -item[1]["bytes"])
    return {"peak_above_start_bytes": peak, "live_at_peak_bytes": sum(e["size"] for e in live.values()),
            "sites": [{"site": name, **numbers} for name, numbers in ordered[:top]],
            "other_sites_bytes": sum(numbers["bytes"] for _, numbers in ordered[top:])}
