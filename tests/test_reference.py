"""The pure-PyTorch reference against float64 evaluations of docs/spec.md, and its rounding hash."""

import math

import numpy as np
import pytest
import torch
from conftest import ulp_distance
from oracle import REFERENCE_F64_RTOL, f64_adalomo, f64_lomo, rand

from lomo_kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (LLM-shaped tensors: tests/test_llm_shapes.py, backend "torch")
SHAPES = [(1,), (7,), (4097,), (1, 33), (29, 1), (37, 129), (3, 17, 33), ()]


def _rand(shape, dtype, scale=1.0):
    return rand(shape, dtype, scale, seed=sum(shape) + 7 * len(shape))


def _assert_close_to_f64(out, want64, size, dtype, cancel_tol=1e-5):
    if dtype == torch.float32:
        # 1e-5 of the size of the terms (a pointwise relative error is meaningless where they cancel)
        assert ((out.double() - want64).abs() <= 1e-5 * size + 1e-30).all()
    else:
        # the stored result is the float64 value rounded once: allow one ulp for the fp32 math,
        # except where the result cancels to far below its terms (cancel_tol of their size)
        near = ulp_distance(out, want64.to(dtype)) <= 1
        assert (near | ((out.double() - want64).abs() <= cancel_tol * size)).all()


HYPER = [
    dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None),
    dict(lr=3e-3, wd=0.1, ls=1024.0, cgv=0.7, coef=0.37),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("h", HYPER)
def test_lomo_reference_vs_float64(dtype, shape, h):
    p = _rand(shape, dtype)
    g = _rand(shape, dtype, scale=h["ls"])
    want, size = f64_lomo(p, g, h)
    coef = None if h["coef"] is None else torch.tensor(h["coef"])
    out = p.clone()
    reference.lomo_update_(out, g, coef, None, h["lr"], h["wd"], h["ls"], h["cgv"], "nearest", 0, 1)
    _assert_close_to_f64(out, want, size, dtype)


def _state(shape):
    p = torch.empty(shape)
    if p.dim() >= 2:
        return {
            "exp_avg_sq_row": torch.rand(shape[:-1]) + 0.1,
            "exp_avg_sq_col": torch.rand(shape[:-2] + shape[-1:]) + 0.1,
            "exp_avg_sq": None,
        }
    return {"exp_avg_sq_row": None, "exp_avg_sq_col": None, "exp_avg_sq": torch.rand(shape) + 0.1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("h", HYPER)
@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_adalomo_reference_vs_float64(dtype, shape, h, beta):
    p = _rand(shape, dtype)
    g = _rand(shape, dtype, scale=h["ls"])
    st = _state(shape)
    want = f64_adalomo(p, g, {k: v for k, v in st.items() if v is not None},
                       dict(h, beta=beta, thr=1.0))
    coef = None if h["coef"] is None else torch.tensor(h["coef"])
    out = p.clone()
    reference.adalomo_update_(
        out, g, st["exp_avg_sq_row"], st["exp_avg_sq_col"], st["exp_avg_sq"], coef, None,
        h["lr"], h["wd"], h["ls"], h["cgv"], beta, 1e-30, 1e-3, 1.0, "nearest", 0, 1,
    )
    # The reference reduces in fp32 (vector_norm over 0.5M elements is ~2e-5 off): where the update
    # cancels the parameter, that error is more than an ulp of the tiny result.
    _assert_close_to_f64(out, want.p, want.size, dtype, cancel_tol=REFERENCE_F64_RTOL)
    for k, v in want.state.items():
        torch.testing.assert_close(st[k].double(), v, rtol=1e-5, atol=0)


def test_adalomo_update_normalisation_and_small_params():
    # 1-D at t=1 (beta=0): u = g / sqrt(g*g + eps1) = sign(g), rms(u) = 1 > clip_threshold = 0.5,
    # so the update is scaled to rms 0.5; rms(p) = 1e-6 < eps2, so the step size is lr * eps2.
    p = torch.full((64,), 1e-6)
    g = torch.randn(64)
    v = torch.zeros(64)
    out = p.clone()
    reference.adalomo_update_(out, g, None, None, v, None, None, 0.5, 0.0, 1.0, 0.0, 0.0, 1e-30,
                              1e-3, 0.5, "nearest", 0, 1)
    step = (p - out).double() / (0.5 * 1e-3)
    torch.testing.assert_close(step, 0.5 * g.sign().double(), rtol=1e-4, atol=0)


def test_nonfinite_gradients_leave_values_unchanged():
    p = torch.randn(5, 6)
    g = torch.randn(5, 6)
    g[1, 2] = float("nan")
    g[3, 0] = float("inf")
    found = torch.zeros(1)
    out = p.clone()
    reference.lomo_update_(out, g, None, found, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 1)
    assert found.item() == 1.0
    assert out[1, 2] == p[1, 2] and out[3, 0] == p[3, 0]
    finite = torch.isfinite(g)
    torch.testing.assert_close(out[finite], (p - 0.1 * g)[finite])
    # AdaLomo: the whole parameter and its state stay as they were
    row, col = torch.rand(5) + 0.1, torch.rand(6) + 0.1
    row0, col0, found2, out2 = row.clone(), col.clone(), torch.zeros(1), p.clone()
    reference.adalomo_update_(out2, g, row, col, None, None, found2, 0.1, 0.0, 1.0, 0.0, 0.5,
                              1e-30, 1e-3, 1.0, "nearest", 0, 2)
    assert found2.item() == 1.0
    assert torch.equal(out2, p) and torch.equal(row, row0) and torch.equal(col, col0)


# ---------------------------------------------------------------- stochastic rounding


def _np_mix32(x):
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def test_random_bits_match_an_independent_uint32_implementation():
    seed, step = 123456789, 77
    key = reference.rounding_key(seed, step)
    assert key == int(_np_mix32(np.array([seed ^ int(_np_mix32(np.array([step]))[0])]))[0])
    n = 5000
    bits = reference.random_bits(n, seed, step).numpy()
    i = np.arange(n, dtype=np.uint64)
    hi = _np_mix32(((i >> np.uint64(32)) ^ np.uint64(key)).astype(np.uint32))
    want = _np_mix32((i & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ hi)
    assert np.array_equal(bits.astype(np.uint32), want)
    # high element indices (tensors over 2**32 elements) use the high word too
    big = torch.tensor([2**32 + 5, 5], dtype=torch.int64)
    hi_b = reference._mix32_t((big >> 32) ^ key)
    lo_b = reference._mix32_t((big & 0xFFFFFFFF) ^ hi_b)
    assert lo_b[0] != lo_b[1]


def test_random_bits_look_uniform():
    bits = reference.random_bits(1 << 16, 3, 9)
    assert bits.min() >= 0 and bits.max() < 2**32
    top = (bits >> 31).float().mean().item()
    assert abs(top - 0.5) < 0.01
    assert len(torch.unique(bits)) > 0.999 * bits.numel()


def _from_line(i, dtype):
    # inverse of the monotonic integer line used by ulp_distance
    bits = torch.where(i < 0, (-i) | 0x8000, i).to(torch.int32)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return bits.view(dtype)


def _neighbours(x, dtype):
    """The largest dtype value <= x and the smallest >= x (finite x inside the dtype's range)."""
    n = x.to(dtype)
    i = n.view(torch.int16).to(torch.int32)
    i = torch.where(i < 0, -(i & 0x7FFF), i)
    below = n.float() <= x
    lo = torch.where(below, n, _from_line(i - 1, dtype))
    hi = torch.where(below, _from_line(i + 1, dtype), n)
    hi = torch.where(n.float() == x, n, hi)
    return lo, hi


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_brackets_and_is_unbiased(dtype):
    x = torch.randn(4096) * 3
    if dtype == torch.float16:  # include fp16 subnormals and the top of the range
        x[:64] = torch.randn(64) * 1e-6
        x[64:80] = torch.linspace(60000, 65500, 16)
    lo, hi = _neighbours(x, dtype)
    assert (lo.float() <= x).all() and (hi.float() >= x).all()
    n = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for s in range(n):
        y = reference.round_to_dtype(x, dtype, "stochastic", s, 1)
        assert ((y == lo) | (y == hi)).all()  # always one of the two neighbours of x
        acc += y.double()
    spacing = (hi.double() - lo.double()).clamp(min=1e-300)
    # the mean of n Bernoulli roundings is within 5 standard errors (<= 0.5 / sqrt(n)) of x
    err = ((acc / n - x.double()).abs() / spacing).max().item()
    assert err < 5 * 0.5 / math.sqrt(n)


def test_stochastic_rounding_is_deterministic_and_keyed():
    x = torch.randn(1000)
    a = reference.round_to_dtype(x, torch.bfloat16, "stochastic", 7, 3)
    b = reference.round_to_dtype(x, torch.bfloat16, "stochastic", 7, 3)
    c = reference.round_to_dtype(x, torch.bfloat16, "stochastic", 7, 4)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_stochastic_rounding_special_values():
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 65519.0, 65600.0, 1e-10])
    y16 = reference.round_to_dtype(x, torch.float16, "stochastic", 1, 1)
    assert y16[0] == 0 and y16[1] == 0 and torch.signbit(y16[1])
    assert torch.isnan(y16[2]) and y16[3] == math.inf and y16[4] == -math.inf
    assert y16[5] == 65504  # never Inf from a value that rounds to a finite fp16
    assert y16[6] == math.inf  # rounds to Inf under nearest too
    assert y16[7] in (0.0, 2.0**-24)
    yb = reference.round_to_dtype(x, torch.bfloat16, "stochastic", 1, 1)
    assert torch.isnan(yb[2]) and yb[3] == math.inf and yb[4] == -math.inf


def test_rounding_argument_is_checked():
    with pytest.raises(ValueError, match="rounding"):
        reference.round_to_dtype(torch.ones(2), torch.bfloat16, "up", 0, 0)


# ---------------------------------------------------------------- gradient-norm side output


@pytest.mark.parametrize("ls", [1.0, 1024.0, 3.0])
@pytest.mark.parametrize("shape", [(7,), (37, 129), (3, 5, 9)])
def test_grad_sq_adds_the_unscaled_squared_norm(shape, ls):
    p, g = _rand(shape, torch.bfloat16), _rand(shape, torch.bfloat16, scale=ls)
    want = ((g.double() / reference.f32(ls)) ** 2).sum()
    acc = torch.full((1,), 0.25)
    # value clipping and clip_coef do not change what is measured
    reference.lomo_update_(p.clone(), g, torch.tensor(0.5), None, 0.1, 0.0, ls, 1e-3, "nearest",
                           0, 1, acc)
    torch.testing.assert_close(acc.double(), want.view(1) + 0.25, rtol=1e-6, atol=0)
    st = _state(shape)
    acc.fill_(0.0)
    reference.adalomo_update_(p.clone(), g, st["exp_avg_sq_row"], st["exp_avg_sq_col"],
                              st["exp_avg_sq"], torch.tensor(0.5), None, 0.1, 0.0, ls, 1e-3, 0.5,
                              1e-30, 1e-3, 1.0, "nearest", 0, 1, acc)
    torch.testing.assert_close(acc.double(), want.view(1), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- staged (sharded) AdaLomo

STAGED_SHAPES = {(37,): [20, 17], (37, 129): [13, 0, 24], (4, 6, 9): [1, 3], (5, 33): [5],
                 (2, 3): [1, 1, 0, 0]}


@pytest.mark.parametrize("shape", list(STAGED_SHAPES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_shards_match_the_one_call_update(shape, dtype):
    from adalomo_shards import run_sharded

    h = dict(lr=3e-2, wd=0.1, ls=3.0, cgv=0.02, coef=0.7, beta=0.3, ct=0.05)
    p, g = _rand(shape, dtype), _rand(shape, dtype, scale=0.05)
    st = {k: v for k, v in _state(shape).items() if v is not None}
    want, st_want = p.clone(), {k: v.clone() for k, v in st.items()}
    reference.adalomo_update_(want, g, st_want.get("exp_avg_sq_row"), st_want.get("exp_avg_sq_col"),
                              st_want.get("exp_avg_sq"), torch.tensor(0.7), None, h["lr"], h["wd"],
                              h["ls"], h["cgv"], h["beta"], 1e-30, 1e-3, h["ct"], "nearest", 5, 2)
    got, st_got, found = run_sharded(reference.adalomo_update_, p, g, st, h, STAGED_SHAPES[shape],
                                     "torch")
    assert not any(f.item() for f in found)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    else:
        assert (ulp_distance(got, want) <= 1).all()
    for k in st_want:
        torch.testing.assert_close(st_got[k], st_want[k], rtol=1e-5, atol=0)


def test_staged_non_finite_on_one_shard_skips_every_shard():
    from adalomo_shards import run_sharded

    h = dict(lr=3e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.3, ct=1.0)
    p, g = _rand((10, 8), torch.float32), _rand((10, 8), torch.float32)
    g[7, 3] = float("inf")
    st = {k: v for k, v in _state((10, 8)).items() if v is not None}
    got, st_got, found = run_sharded(reference.adalomo_update_, p, g, st, h, [5, 5], "torch")
    assert torch.equal(got, p) and all(f.item() == 1.0 for f in found)
    for k in st:
        assert torch.equal(st_got[k], st[k])


def test_workspace_regions():
    assert reference.adalomo_workspace_regions((9,)) == ([(0, 2)], [(2, 3)])
    assert reference.adalomo_workspace_regions((4, 9)) == ([(0, 2), (4, 14)], [(2, 3)])
    assert reference.adalomo_workspace_regions((3, 4, 9)) == ([(0, 2)], [(2, 3)])


# ---------------------------------------------------------------- multi-tensor forms


def test_multi_tensor_ops_equal_the_single_tensor_op():
    shapes = [(7,), (64,), (), (5, 3)]
    ps = [_rand(s, torch.bfloat16) for s in shapes]
    gs = [_rand(s, torch.bfloat16) for s in shapes]
    k = len(shapes)
    lrs, wds, cgvs = [0.1, 0.2, 0.3, 0.4], [0.0, 0.1, 0.0, 0.2], [0.0, 0.5, 0.0, 0.0]
    seeds, steps = [1, 2, 3, 4], [5, 5, 6, 6]
    one = [p.clone() for p in ps]
    for i in range(k):
        reference.lomo_update_(one[i], gs[i], None, None, lrs[i], wds[i], 2.0, cgvs[i],
                               "stochastic", seeds[i], steps[i])
    many = [p.clone() for p in ps]
    reference.lomo_update_multi_(many, gs, None, None, lrs, wds, 2.0, cgvs, "stochastic", seeds,
                                 steps)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    ps, gs, k = ps[:3], gs[:3], 3
    vs = [torch.rand(p.shape) + 0.1 for p in ps]
    one, v1 = [p.clone() for p in ps], [v.clone() for v in vs]
    for i in range(k):
        reference.adalomo_update_(one[i], gs[i], None, None, v1[i], None, None, lrs[i], wds[i],
                                  2.0, cgvs[i], 0.5, 1e-30, 1e-3, 1.0, "nearest", seeds[i],
                                  steps[i])
    many, v2 = [p.clone() for p in ps], [v.clone() for v in vs]
    reference.adalomo_update_multi_(many, gs, v2, None, None, lrs[:k], wds[:k], 2.0, cgvs[:k],
                                    [0.5] * k, [1e-30] * k, [1e-3] * k, [1.0] * k, "nearest",
                                    seeds[:k], steps[:k])
    assert all(torch.equal(a, b) for a, b in zip(one + v1, many + v2))
