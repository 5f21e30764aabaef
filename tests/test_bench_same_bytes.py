"""The same-bytes stream, the reference of every bandwidth fraction the benchmarks report
(bench/same_bytes.py, csrc/cpu/same_bytes.cpp): it reads every element of each pass it stands
for, leaves every tensor unchanged (so it can run on the update's own tensors), refuses what it
cannot stream, and the fraction statistics are per-round ratios. Its speed is not asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/

from bench import same_bytes  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# 2-d with a tail of columns, several row groups, more columns than one tile; 3-d slices
FACTORED = ((7, 5), (130, 4099), (300, 9000), (3, 70, 33))
FLAT = ((), (1,), (7,), (65537,))


def _native():
    try:
        from lomo_kernels import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "same_bytes") else None


needs_native = pytest.mark.skipif(_native() is None, reason="native extension not built")


def _xor(*tensors) -> int:
    """xor of the stored words of every element (what the stream's reads return)."""
    out = 0
    for t in tensors:
        wide = t.element_size() == 4
        w = t.reshape(-1).view(torch.int32 if wide else torch.int16).numpy()
        out ^= int(np.bitwise_xor.reduce(w, initial=0)) & (0xFFFFFFFF if wide else 0xFFFF)
    return out


def _same_bits(a, b) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _fresh(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    return p, g


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FACTORED)
def test_factored_adalomo_reads_every_element_and_changes_nothing(shape, dtype):
    p, g = _fresh(shape, dtype, seed=sum(shape))
    p0, g0 = p.clone(), g.clone()
    got = _native().same_bytes("adalomo_update_", p, g)
    # pass 1 reads g and p, pass 2 g again: the xor of all reads is the xor of p
    assert got & (0xFFFFFFFF if dtype == torch.float32 else 0xFFFF) == _xor(p0)
    assert _same_bits(p, p0) and _same_bits(g, g0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FLAT)
def test_flat_adalomo_reads_every_element_and_changes_nothing(shape, dtype):
    p, g = _fresh(shape, dtype, seed=7 + sum(shape))
    v = torch.rand(shape) + 0.5
    p0, g0, v0 = p.clone(), g.clone(), v.clone()
    got = _native().same_bytes("adalomo_update_", p, g, v)
    mask = 0xFFFFFFFF  # v's 32-bit words make every bit of the result count
    assert got & mask == (_xor(g0) ^ _xor(p0) ^ _xor(v0)) & mask
    assert _same_bits(p, p0) and _same_bits(g, g0) and _same_bits(v, v0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((1,), (4097,), (300, 9000)))
def test_lomo_changes_nothing(shape, dtype):
    p, g = _fresh(shape, dtype, seed=11)
    p0, g0 = p.clone(), g.clone()
    assert _native().same_bytes("lomo_update_", p, g) == 0  # it only stores
    assert _same_bits(p, p0) and _same_bits(g, g0)


@needs_native
def test_refusals_name_the_problem():
    c = _native()
    p, g = _fresh((4, 6), torch.bfloat16, 0)
    with pytest.raises(RuntimeError, match="op must be"):
        c.same_bytes("sgd", p, g)
    with pytest.raises(RuntimeError, match="dtype and shape"):
        c.same_bytes("lomo_update_", p, g.float())
    with pytest.raises(RuntimeError, match="exp_avg_sq"):
        c.same_bytes("adalomo_update_", p[0], g[0])
    with pytest.raises(RuntimeError, match="contiguous"):
        c.same_bytes("lomo_update_", p.t(), g.t())


@pytest.mark.parametrize("op", ("lomo_update", "adalomo_update"))
def test_stream_fn_leaves_the_tensors_unchanged(op):
    """bench.same_bytes.stream_fn on CPU (the native stream, or the torch fallback on clones)."""
    params = [_fresh(s, torch.bfloat16, i)[0] for i, s in enumerate(((33, 65), (65,)))]
    grads = [_fresh(s, torch.bfloat16, 9 + i)[1] for i, s in enumerate(((33, 65), (65,)))]
    states = [{}, {"exp_avg_sq": torch.rand(65) + 0.5}]
    before = [t.clone() for t in params + grads]
    same_bytes.stream_fn(op, params, grads, states)()
    for a, b in zip(params + grads, before):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        same_bytes.stream_fn("adalomo_update", params, grads)
    with pytest.raises(ValueError, match="op must be"):
        same_bytes.stream_fn("sgd", params, grads)


def test_fractions_are_per_round_ratios():
    ref = [1.0, 2.0, 3.0, 4.0, 5.0]
    op = [2.0, 2.0, 6.0, 4.0, 10.0]  # per round: 0.5, 1, 0.5, 1, 0.5
    st = same_bytes.fraction_stats(ref, op)
    assert st["frac_same_bytes"] == 0.5
    assert st["frac_same_bytes_p20"] == 0.5 and st["frac_same_bytes_p80"] == 1.0
    # not the ratio of the medians (3 / 4)
    assert st["frac_same_bytes"] != pytest.approx(3.0 / 4.0)


def test_thread_clock_leaves_out_sleeping():
    # the thread's CPU time does not count time the thread does not run (here: a sleep), the
    # wall clock does; each function gets one sample per round either way
    import time

    from bench import timing

    fns = {"sleep": lambda: time.sleep(0.02), "spin": lambda: sum(range(20000))}
    wall = timing.time_interleaved(fns, "cpu", warmup_ms=0, rep_ms=0, min_reps=3)
    cpu = timing.time_interleaved(fns, "cpu", warmup_ms=0, rep_ms=0, min_reps=3, clock="thread")
    assert len(cpu["sleep"].samples) == len(cpu["spin"].samples) == 3
    assert wall["sleep"].median_ms >= 19.0 and cpu["sleep"].median_ms < 5.0
    with pytest.raises(ValueError, match="clock"):
        timing.time_interleaved(fns, "cpu", clock="process")
