"""Timing of benchmark functions and the device copy bandwidth.

* CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (CUDA events, L2 flushed
  before every call; a CUDA-event loop when Triton is missing).
* CPU: one call, a warm-up of ``warmup_ms``, then individually timed calls
  (``time.perf_counter``) until ``rep_ms`` has passed and at least ``min_reps`` calls were made;
  median, p20 and p80 of those. ``time_interleaved`` times several functions round-robin so that
  load from other processes on a shared machine hits them alike.
* ``copy_bandwidth``: a large ``dst.copy_(src)``, bytes read + written / time. On CPU caches can
  hold a whole tensor, so small and medium shapes may beat it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import torch

QUANTILES = [0.5, 0.2, 0.8]

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None  # number of timed calls (None: decided inside do_bench)
    method: str
    # the timed calls in the order they ran (time_interleaved: round i of every function)
    samples: list | None = dataclasses.field(default=None, repr=False)


def quantile(sorted_vals: Sequence[float], q: float) -> float:
    # linear interpolation, as numpy's default / torch.quantile
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _time_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps) -> Timing:
    fn()  # first call: lazy state, page faults
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8),
                  len(times), "perf_counter")


def _time_cuda(fn, warmup_ms, rep_ms, min_reps, device) -> Timing:
    # A rough estimate first so that slow functions (whole models, backward passes) still get
    # at least ``min_reps`` timed calls: do_bench derives its repeat count from rep / estimate.
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    est_ms = (time.perf_counter() - t0) * 1e3 / 3
    rep = max(rep_ms, min_reps * est_ms * 1.2)
    warmup = max(warmup_ms, 2 * est_ms)
    try:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
        return Timing(float(med), float(p20), float(p80), None, "triton.testing.do_bench")
    except ImportError:
        pass
    n = max(min_reps, int(rep / max(est_ms, 1e-3)))
    for _ in range(max(1, int(warmup / max(est_ms, 1e-3)))):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    synchronize(device)
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8), n,
                  "cuda events")


def time_fn(fn: Callable[[], object], device, *, warmup_ms=25.0, rep_ms=100.0, min_reps=5,
            max_reps=100_000) -> Timing:
    """Median / p20 / p80 milliseconds of ``fn()`` on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, warmup_ms, rep_ms, min_reps, device)
    return _time_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps)


def time_interleaved(fns: dict, device, *, warmup_ms=25.0, rep_ms=100.0, min_reps=5,
                     max_reps=100_000, clock="wall") -> dict:
    """CPU: time several functions round-robin (one call of each per round) so that a burst of
    load from other processes on a shared machine hits all of them alike. ``rep_ms`` is the
    budget per function. ``clock="thread"``: each call's CPU time of the calling thread
    (``time.thread_time``), which leaves out the time other processes held the core; only
    meaningful when the work runs on the calling thread (one thread). Returns {name: Timing}.
    On CUDA: ``time_fn`` for each in turn."""
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.thread_time
    device = torch.device(device)
    if device.type == "cuda":
        return {k: time_fn(f, device, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps)
                for k, f in fns.items()}
    for f in fns.values():
        f()
    t_end = time.perf_counter() + warmup_ms * len(fns) / 1e3
    while time.perf_counter() < t_end:
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    t_end = time.perf_counter() + rep_ms * len(fns) / 1e3
    rounds = 0
    while rounds < min_reps or (time.perf_counter() < t_end and rounds < max_reps):
        for k, f in fns.items():
            t0 = now()
            f()
            times[k].append((now() - t0) * 1e3)
        rounds += 1
    out = {}
    for k, ts in times.items():
        st = sorted(ts)
        out[k] = Timing(statistics.median(st), quantile(st, 0.2), quantile(st, 0.8), len(st),
                        f"{'perf_counter' if clock == 'wall' else 'thread_time'}, interleaved",
                        samples=ts)
    return out


def copy_bandwidth(device, mib: float = 1024, **timing) -> dict:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``mib`` MiB, (read + written bytes) / time."""
    device = torch.device(device)
    n = max(1, int(mib * 2**20) // 4)
    src = torch.randn(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **timing)
    nbytes = 2 * src.numel() * src.element_size()
    out = {
        "copy_gbps": nbytes / (t.median_ms * 1e-3) / 1e9,
        "copy_mib": mib,
        "copy_median_ms": t.median_ms,
        "copy_p20_ms": t.p20_ms,
        "copy_p80_ms": t.p80_ms,
    }
    del src, dst
    return out


def timing_defaults(device, sizes: str = "small") -> dict:
    """Timer budgets: do_bench's defaults on CUDA; short, fixed budgets on CPU."""
    if torch.device(device).type == "cuda":
        return dict(warmup_ms=25.0, rep_ms=100.0, min_reps=10)
    if sizes == "tiny":
        return dict(warmup_ms=10.0, rep_ms=40.0, min_reps=3)
    return dict(warmup_ms=100.0, rep_ms=600.0, min_reps=5)


def copy_mib_default(device, sizes: str) -> int:
    if torch.device(device).type == "cuda":
        return 1024
    return 64 if sizes == "tiny" else 512
