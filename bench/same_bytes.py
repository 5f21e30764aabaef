"""The same-bytes reference of every bandwidth fraction the benchmarks report.

An update's bandwidth fraction is ``time(same-bytes stream) / time(update)``, both measured in
the same process, interleaved call by call (``timing.time_interleaved``), so that load from other
processes hits both alike; the median and p20 / p80 of the per-round ratios are reported.

The same-bytes stream moves exactly the update's fewest bytes (docs/spec.md, bench/shapes.py) in
the update's own pattern, with no arithmetic besides an integer xor:

* ``lomo_update``: read p and g, write p (3 x element size per element);
* ``adalomo_update``, 2-d and more: (1) read g and p, (2) read g, (3) read g and p, write p
  (6 x element size); 0-d / 1-d: (1) read g, p, v, (2) read g, p, v, write p and v;

On CPU it is ``lomo_kernels._C.same_bytes`` (csrc/cpu/same_bytes.cpp): the same work units,
threads, pass barriers and tensors as the native update, storing p (and v) back unchanged, so
the reference sees the same addresses, pages and cache reuse between passes as the update. A
copy moving the same bytes to a separate destination (``dst.copy_(src)``) is NOT such a
reference: it reads and writes different arrays, and on a CPU a store to a line not in the cache
first reads it (write-allocate), so it moves more than it counts, and it has no reuse between
passes; an update can beat it by a fifth or more without being closer to the memory bound.

Elsewhere (CUDA, or without the native extension) the stream is made of torch ops on the same
tensors: ``p ^= g & 0`` as one in-place ``bitwise_xor_`` of a masked view is not possible
without a temporary, so it runs on clones of p and g: LOMO ``p2 ^= g2`` in place; AdaLomo
``sum(g2)``, ``sum(p2)``; ``sum(g2)``; ``p2 ^= g2`` (the same bytes, passes (1) split in two
streams). This is an approximation, named in every row (``same_bytes_impl``).
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch

from bench import timing as timers

NATIVE_IMPL = "native stream (csrc/cpu/same_bytes.cpp)"
TORCH_IMPL = "torch ops on clones (bitwise_xor_, sum)"


def _native():
    try:
        from lomo_kernels import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "same_bytes") else None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def implementation(device) -> str:
    return NATIVE_IMPL if torch.device(device).type == "cpu" and _native() else TORCH_IMPL


def stream_fn(op: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict] | None = None) -> Callable[[], object]:
    """A function whose call streams the fewest bytes of one ``op`` update ("lomo_update" or
    "adalomo_update") of every parameter, in the update's pattern; ``states``: AdaLomo's state
    dicts (a 0-d / 1-d parameter's ``exp_avg_sq`` is part of its traffic)."""
    op = op.removesuffix("_")
    if op not in ("lomo_update", "adalomo_update"):
        raise ValueError(f"op must be 'lomo_update' or 'adalomo_update', got {op!r}")
    states = list(states) if states is not None else [{} for _ in params]
    vs = [s.get("exp_avg_sq") if op == "adalomo_update" and p.dim() < 2 else None
          for p, s in zip(params, states)]
    if any(p.dim() < 2 and v is None for p, v in zip(params, vs) if op == "adalomo_update"):
        raise ValueError("a 0-d / 1-d AdaLomo parameter needs its exp_avg_sq state")
    c = _native()
    if c is not None and all(p.device.type == "cpu" for p in params):
        name = op + "_"
        items = list(zip(params, grads, vs))

        def native():
            for p, g, v in items:
                c.same_bytes(name, p, g, v)
        return native

    pairs = [(_bits(p.detach().clone()), _bits(g.detach().clone()),
              None if v is None else _bits(v.detach().clone()))
             for p, g, v in zip(params, grads, vs)]

    def torch_ops():
        sums = []
        for p, g, v in pairs:
            if op == "adalomo_update" and v is None:  # (1) g, p  (2) g
                sums += [g.sum(), p.sum(), g.sum()]
            elif op == "adalomo_update":  # (1) g, p, v; (2) also writes v
                sums += [g.sum(), p.sum(), v.sum()]
                v.bitwise_xor_(v)
            p.bitwise_xor_(g)  # the last pass: read p and g, write p
        return sums
    return torch_ops


def ratios(ref: Sequence[float], op: Sequence[float]) -> list[float]:
    """Per-round ``ref / op`` of two interleaved sample lists (round i of each)."""
    return [a / b for a, b in zip(ref, op) if b > 0]


def fraction_stats(ref: Sequence[float], op: Sequence[float]) -> dict:
    """Median, p20 and p80 of the per-round same-bytes fractions."""
    r = sorted(ratios(ref, op))
    if not r:
        return {"frac_same_bytes": None, "frac_same_bytes_p20": None, "frac_same_bytes_p80": None}
    return {"frac_same_bytes": statistics.median(r),
            "frac_same_bytes_p20": timers.quantile(r, 0.2),
            "frac_same_bytes_p80": timers.quantile(r, 0.8)}


def time_against_stream(fn: Callable[[], object], ref: Callable[[], object], device,
                        **timing) -> tuple[timers.Timing, timers.Timing, dict]:
    """``fn`` and the same-bytes stream ``ref`` timed round-robin: (timing of fn, timing of
    ref, fraction statistics)."""
    t = timers.time_interleaved({"op": fn, "same_bytes": ref}, device, **timing)
    if t["op"].samples and t["same_bytes"].samples:
        stats = fraction_stats(t["same_bytes"].samples, t["op"].samples)
    else:  # CUDA: no per-round samples (do_bench); the ratio of the medians
        frac = t["same_bytes"].median_ms / t["op"].median_ms
        stats = {"frac_same_bytes": frac, "frac_same_bytes_p20": None,
                 "frac_same_bytes_p80": None}
    return t["op"], t["same_bytes"], stats
