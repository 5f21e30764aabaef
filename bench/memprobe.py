"""Memory probes shared by the benchmarks and the memory tests.

* ``peak_extra_bytes(fn, device)``: the memory ``fn()`` needs beyond what is allocated when it
  starts. CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around one
  call after ``reset_peak_memory_stats()`` (exact, allocator bytes). CPU (Linux): the rise of the
  process's peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
  over ``VmRSS`` before the call, after ``malloc_trim(0)`` has handed free heap pages back to the
  system, so that a temporary must fault in fresh pages to exist. It sees every allocation
  (torch's allocator and plain ``malloc``/``std::vector`` inside a C++ kernel alike); a few
  pages of noise, and a temporary that fits in memory already resident (the thread stacks, glibc's
  kept top-of-heap) goes unseen, so on CPU the number is a lower bound.
* ``allocation_trace(fn)``: torch's own view of one call, from ``torch.profiler`` with
  ``profile_memory=True``: every allocation and free made through torch's allocator during the
  call, in order. ``largest`` is the biggest single allocation, ``peak`` the highest sum of live
  allocations made during the call (blocks that existed before it are not counted, nor their
  frees). On CPU this is the only allocator-level peak torch exposes; it does not see ``malloc``
  inside C++ kernels (the RSS probe does).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import time
from typing import Callable, Iterable

import torch


def available_memory_bytes(device) -> int | None:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return proc_meminfo_bytes("MemAvailable")


def proc_meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def proc_status_bytes(*keys) -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``VmSize``, ... of this process from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_rss_peak() -> bool:
    """Set VmHWM to the current VmRSS. False where /proc/self/clear_refs cannot do that."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in proc_status_bytes("VmHWM")
    except OSError:
        return False


_LIBC = None


def malloc_trim() -> None:
    """Give free heap memory back to the system (glibc), so that RSS rises measure new pages."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter


@contextlib.contextmanager
def exact_rss(threshold: int = 128 * 1024):
    """glibc: while active, every allocation of ``threshold`` bytes or more is its own mapping,
    returned to the system when freed (no dynamic threshold, no reuse of kept heap), so the
    resident-set probe sees each large temporary as fresh pages, to within a few pages, and
    freed blocks do not stay resident (bench_memory.py --mmap-threshold-mib). Programs that
    allocate large blocks over and over get slower. Afterwards the
    threshold is 32 MiB, the most glibc's dynamic threshold grows to."""
    malloc_trim()  # loads libc
    ok = bool(_LIBC) and _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    try:
        yield ok
    finally:
        if ok:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    else:
        malloc_trim()


_CPU_RSS = None


def peak_extra_bytes(fn: Callable[[], object], device, *,
                     settle: bool = False) -> tuple[int | None, str | None]:
    """Bytes ``fn()`` needs beyond what is allocated when it starts, and the method used.
    ``settle`` (CPU): call ``fn`` once more after ``malloc_trim`` and before the measured call, so
    that heap pages it reuses for small blocks (released by the trim; how many depends on what
    ran before in the process) are not counted; under ``exact_rss`` every block above the
    threshold is mapped afresh by each call and still is."""
    global _CPU_RSS
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base), "cuda_max_memory_allocated"
    if _CPU_RSS is None:
        _CPU_RSS = reset_rss_peak()
    if not _CPU_RSS:
        return None, None
    malloc_trim()
    if settle:
        fn()
    reset_rss_peak()
    base = proc_status_bytes("VmRSS")["VmRSS"]
    fn()
    peak = proc_status_bytes("VmHWM")["VmHWM"]
    return max(0, peak - base), "cpu_rss_hwm_lower_bound"


@dataclasses.dataclass
class AllocationTrace:
    largest: int  # the biggest single allocation, bytes
    peak: int  # the highest sum of live allocations made during the call, bytes
    count: int  # number of allocations


def allocation_trace(fn: Callable[[], object], device="cpu") -> AllocationTrace:
    """torch's allocator events on ``device`` during ``fn()`` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, profile_memory=True, record_shapes=False) as prof:
        fn()
    want = "CUDA" if device.type == "cuda" else "CPU"
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == want]
    events.sort(key=lambda e: e.start_ns())
    live = peak = largest = count = 0
    for e in events:
        n = e.nbytes()
        live += n
        peak = max(peak, live)
        if n > 0:
            largest = max(largest, n)
            count += 1
    return AllocationTrace(largest=largest, peak=peak, count=count)


def tensor_bytes(tensors: Iterable) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            total += tensor_bytes(t.values())
        elif isinstance(t, (list, tuple)):
            total += tensor_bytes(t)
    return total


MARGIN = int(1.5 * 2**30)  # left free for the rest of the machine


def cpu_limit(limit_bytes: int, estimate_bytes: int | None, wait_s: float, log) -> tuple[int, str]:
    """The address-space limit of a CPU case: ``limit_bytes``, unless less than that (plus a
    margin) is free. A case whose estimate (x 1.2) would not fit in the free memory waits up to
    ``wait_s`` for other processes to finish; then it runs with the lower limit, and says so."""
    need = limit_bytes if not estimate_bytes else min(limit_bytes, int(1.2 * estimate_bytes))
    deadline = time.monotonic() + wait_s
    while True:
        free = (proc_meminfo_bytes("MemAvailable") or 0) - MARGIN
        if free >= need or time.monotonic() >= deadline:
            break
        log(f"    waiting for memory: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} needed")
        time.sleep(20)
    if free >= limit_bytes:
        return limit_bytes, ""
    low = max(2**29, free)
    return low, (f"limit lowered from {limit_bytes / 2**30:.1f} to {low / 2**30:.1f} GiB: "
                 "the rest of the machine's memory was in use")
