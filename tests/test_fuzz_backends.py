"""Property-based fuzzing (hypothesis) of every backend on the same drawn inputs: the reference,
the native C++ kernels, the CUDA kernels in the SIMT emulation (``cuda_emulated``), Triton (its
interpreter on CPU) and, with a GPU, native CUDA and Triton on it (oracle.BACKENDS_HERE).

Each example draws a shape (0-d, 1 x n, m x 1, >= 32 slices of a 3-d parameter, 4-d, odd sizes,
last dimensions that are multiples of 16, sizes over several work units), storage offsets of the
parameter and the gradient (views 0..7 elements past a 16-byte boundary), a dtype, a rounding and
hyper-parameters including the extremes (lr 0, gradients from 1e-30 to 1e30, loss scales from
1e-3 to 2**16, value clipping from 1e-8 to off, clip coefficients down to 1e-6, eps, first steps
from zero state, NaN/Inf gradient elements), runs ``lomo_update_``, ``adalomo_update_``, their
multi-tensor ops and ``golore_update_`` through the checked entry points of ``lomo_kernels.ops``
on every backend, and checks each against the reference and a float64 evaluation within
docs/spec.md's tolerances (oracle.py). Invalid inputs must raise a TypeError/ValueError naming the
argument, with nothing changed.

Profiles (environment variable ``LOMO_KERNELS_FUZZ``): ``ci`` (the default: derandomized, so every
run draws the same examples, no example database, a bounded count; about a minute on 2 CPU
cores) and ``long`` (random draws, 20x the examples, hypothesis' example database in
``.hypothesis/`` so that a failure is replayed first next time)::

    LOMO_KERNELS_FUZZ=long python -m pytest tests/test_fuzz_backends.py      # ~20-30 minutes
    LOMO_KERNELS_FUZZ=long LOMO_KERNELS_FUZZ_SCALE=100 python -m pytest ...  # longer still
"""

import math
import os

import pytest
import torch
from conftest import ulp_distance
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from oracle import (BACKENDS_HERE, REFERENCE_F64_RTOL, bits, check_param, check_state,
                    check_stochastic, f64_adalomo, f64_golore, f64_lomo, unaligned_view)

from lomo_kernels import ops, reference

pytestmark = pytest.mark.usefixtures("one_thread")

_PROFILE = os.environ.get("LOMO_KERNELS_FUZZ", "ci")
if _PROFILE not in ("ci", "long"):
    raise ValueError(f"LOMO_KERNELS_FUZZ must be 'ci' or 'long', got {_PROFILE!r}")
_SCALE = 1 if _PROFILE == "ci" else int(os.environ.get("LOMO_KERNELS_FUZZ_SCALE", "20"))
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture]


def fuzz(examples: int):
    """The settings of one fuzz test: ``examples`` in CI (times the long profile's scale)."""
    if _PROFILE == "ci":
        return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                        suppress_health_check=_QUIET, print_blob=True)
    return settings(max_examples=examples * _SCALE, deadline=None, suppress_health_check=_QUIET,
                    print_blob=True)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUNDINGS = ["nearest", "stochastic"]


# ---------------------------------------------------------------- strategies


def log10_between(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda e: 10.0 ** e)


# The CI profile keeps the sizes small: the Triton interpreter takes seconds for an AdaLomo
# update of a few thousand elements (more for many slices) on a loaded 2-core machine.
_BIG = _PROFILE == "long"


def shapes():
    last = st.one_of(st.integers(1, 300), st.integers(1, 32 if _BIG else 16).map(lambda k: 16 * k))
    return st.one_of(
        st.just(()),
        st.tuples(st.integers(1, 3000 if _BIG else 1500)),
        st.tuples(st.just(1), last),
        st.tuples(st.integers(1, 300), st.just(1)),
        st.tuples(st.integers(1, 20 if _BIG else 6), last),
        st.tuples(st.integers(32, 40 if _BIG else 33), st.integers(1, 6 if _BIG else 2),
                  st.one_of(st.integers(1, 24 if _BIG else 9), st.just(16), st.just(32))),
        st.tuples(st.integers(1, 3), st.integers(1, 4 if _BIG else 2), st.integers(1, 5),
                  st.integers(1, 16)),
        # several work units / blocks
        st.sampled_from([(4097,), (70001,), (3, 4097)] if _BIG else [(4097,), (2, 2053)]),
    )


@st.composite
def tensors(draw, shape, dtype, scale, device="cpu"):
    """A tensor of ``shape`` (normal * scale, in ``dtype``) as a view ``offset`` elements into its
    storage, and that offset; sometimes with a NaN or Inf element."""
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.integers(0, 7))
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel + offset + 3, generator=gen, dtype=torch.float64) * scale)
    base = base.to(dtype).to(device)
    return unaligned_view(base, offset, shape)


def poison(draw, g):
    """Sometimes one NaN/Inf element (LOMO: that element is skipped; AdaLomo/GoLore: all)."""
    if g.numel() == 0 or not draw(st.booleans()) or not draw(st.booleans()):
        return g
    i = draw(st.integers(0, g.numel() - 1))
    g.view(-1)[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return g


@st.composite
def preprocessing(draw):
    """lr, weight decay, loss scale, value clipping, clip coefficient (the oracle's keys)."""
    return dict(
        lr=draw(st.one_of(st.just(0.0), log10_between(-8, 0))),
        wd=draw(st.one_of(st.just(0.0), log10_between(-4, 0))),
        ls=draw(st.sampled_from([1.0, 2.0**-3, 3.0, 2.0**10, 2.0**16, 1e-3])),
        cgv=draw(st.one_of(st.just(0.0), log10_between(-8, 30))),
        coef=draw(st.one_of(st.none(), st.just(1.0), log10_between(-6, 0))),
    )


def _fresh(t, device):
    """A copy of the view ``t`` at the same storage offset (the same alignment), on ``device``."""
    off = t.storage_offset()
    base = torch.empty(off + t.numel() + 3, dtype=t.dtype, device=device)
    view = unaligned_view(base, off, t.shape)
    view.copy_(t)
    return view


def _coef(h, device):
    return None if h["coef"] is None else torch.tensor(h["coef"], device=device)


def _scalar(device):
    return torch.zeros(1, device=device)


def _min_equal(t):
    """The share of stochastically rounded elements that must equal the reference's bits: a few
    differ where the float32 values differ by an ulp (oracle.check_stochastic), which says
    nothing on a handful of elements."""
    return 0.99 if t.numel() >= 1000 else 0.0


def _check_norm_side_output(got, g, ls, backend):
    """grad_sq: sum((g / loss_scale)**2), NaN/Inf when g holds NaN/Inf."""
    want = ((g.double() / reference.f32(ls)) ** 2).sum().item()
    if not math.isfinite(want) or not math.isfinite(got):
        assert math.isfinite(want) == math.isfinite(got) or not torch.isfinite(g).all(), backend
        return
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-37), (backend, got, want)


# ---------------------------------------------------------------- LOMO


@st.composite
def lomo_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    h = draw(preprocessing())
    eff = draw(log10_between(-30, 30))  # the unscaled gradient's size
    p = draw(tensors(shape, dtype, draw(log10_between(-3, 3))))
    g = poison(draw, draw(tensors(shape, dtype, eff * h["ls"])))
    rounding = draw(st.sampled_from(ROUNDINGS))
    seed, step = draw(st.integers(0, 2**40)), draw(st.integers(0, 2**31))
    return p, g, h, rounding, seed, step


def _run_lomo(backend, device, p, g, h, rounding, seed, step):
    out, gd = _fresh(p, device), _fresh(g, device)
    found, acc = _scalar(device), _scalar(device)
    ws = torch.zeros(ops.workspace_numel("lomo_update_", [p.shape], backend=backend,
                                         device=device), device=device)
    ops.lomo_update_(out, gd, lr=h["lr"], weight_decay=h["wd"], loss_scale=h["ls"],
                     clip_grad_value=h["cgv"], clip_coef=_coef(h, device), found_inf=found,
                     grad_sq=acc, workspace=ws, rounding=rounding, seed=seed, step=step,
                     backend=backend)
    assert torch.equal(bits(gd.cpu()), bits(g)), "the gradient is read only"
    return out.cpu(), found.item(), acc.item()


def _lomo_want(p, g, h):
    want, size = f64_lomo(p, g, h)
    finite = torch.isfinite(g)
    return (torch.where(finite, want, p.double()), torch.where(finite, size, p.double().abs()))


@fuzz(30)
@given(lomo_cases())
def test_lomo_update_agrees_on_every_backend(case):
    p, g, h, rounding, seed, step = case
    note(f"shape {tuple(p.shape)} {p.dtype} offsets {p.storage_offset()}/{g.storage_offset()} "
         f"{h} {rounding} seed {seed} step {step}")
    ref, ref_found, ref_sq = _run_lomo("torch", "cpu", p, g, h, rounding, seed, step)
    want, size = _lomo_want(p, g, h)
    stochastic = rounding == "stochastic" and p.dtype != torch.float32
    if not stochastic:
        check_param(ref, ref, want, size, f64_rtol=REFERENCE_F64_RTOL)
    assert ref_found == float(not torch.isfinite(g).all())
    _check_norm_side_output(ref_sq, g, h["ls"], "torch")
    for backend, device in BACKENDS_HERE[1:]:
        out, found, sq = _run_lomo(backend, device, p, g, h, rounding, seed, step)
        note(f"backend {backend} on {device}")
        if stochastic:
            check_stochastic(out, ref, want, size, ref_rtol=1e-6, min_equal=_min_equal(out))
        else:
            check_param(out, ref, want, size, ref_rtol=1e-6)
        assert found == ref_found, backend
        _check_norm_side_output(sq, g, h["ls"], backend)


# ---------------------------------------------------------------- AdaLomo


@st.composite
def adalomo_hyper(draw):
    h = draw(preprocessing())
    first = draw(st.booleans())  # the first step: zero state, beta = 0
    h.update(
        beta=0.0 if first else draw(st.one_of(st.just(1.0), st.floats(0.0, 1.0))),
        eps1=draw(st.sampled_from([1e-30, 1e-16, 1e-8])),
        eps2=draw(st.sampled_from([1e-3, 0.0, 1.0])),
        thr=draw(log10_between(-3, 3)),
        first=first,
        state_scale=draw(log10_between(-20, 20)),
    )
    return h


def _adalomo_state(draw, shape, h):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.zeros(s) if h["first"] else
            (torch.rand(s, generator=gen, dtype=torch.float64) * h["state_scale"]
             + h["state_scale"] * 1e-3).float()
            for k, s in ops.adalomo_state_shapes(shape).items()}


@st.composite
def adalomo_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    h = draw(adalomo_hyper())
    eff = draw(log10_between(-30, 15))  # g*g stays finite in float32
    p = draw(tensors(shape, dtype, draw(log10_between(-3, 3))))
    g = poison(draw, draw(tensors(shape, dtype, eff * h["ls"])))
    state = _adalomo_state(draw, shape, h)
    rounding = draw(st.sampled_from(ROUNDINGS))
    seed, step = draw(st.integers(0, 2**40)), draw(st.integers(0, 2**31))
    return p, g, state, h, rounding, seed, step


def _run_adalomo(backend, device, p, g, state, h, rounding, seed, step):
    out, gd = _fresh(p, device), _fresh(g, device)
    st_ = {k: v.to(device, copy=True) for k, v in state.items()}
    found, acc = _scalar(device), _scalar(device)
    ws = torch.zeros(ops.workspace_numel("adalomo_update_", [p.shape], backend=backend,
                                         device=device), device=device)
    ops.adalomo_update_(out, gd, **st_, lr=h["lr"], beta=h["beta"], weight_decay=h["wd"],
                        loss_scale=h["ls"], clip_grad_value=h["cgv"], eps1=h["eps1"],
                        eps2=h["eps2"], clip_threshold=h["thr"], clip_coef=_coef(h, device),
                        found_inf=found, grad_sq=acc, workspace=ws, rounding=rounding,
                        seed=seed, step=step, backend=backend)
    assert torch.equal(bits(gd.cpu()), bits(g)), "the gradient is read only"
    return out.cpu(), {k: v.cpu() for k, v in st_.items()}, found.item(), acc.item()


def _check_adalomo(out, st_out, ref, st_ref, p, g, state, h, rounding, backend):
    if not torch.isfinite(g).all():  # the whole parameter and its state are left unchanged
        assert torch.equal(bits(out), bits(p)), backend
        assert all(torch.equal(st_out[k], state[k]) for k in state), backend
        return
    want = f64_adalomo(p, g, state, {**h, "thr": h["thr"]})
    check_state(st_out, st_ref, want.state)
    f64_rtol = REFERENCE_F64_RTOL if backend == "torch" else 1e-5
    if rounding == "stochastic" and p.dtype != torch.float32:
        check_stochastic(out, ref, want.p, want.size, min_equal=_min_equal(out))
    else:
        check_param(out, ref, want.p, want.size, f64_rtol=f64_rtol)


def _triton_too_slow(backend, shape):
    """CI: the Triton interpreter takes about a second per slice of a factored AdaLomo update on
    a loaded 2-core machine; it runs the drawn parameters of at most 4 slices there, and one
    fixed parameter of 32 slices (the explicit example below); the long profile runs all."""
    return _PROFILE == "ci" and backend == "triton" and len(shape) >= 3 and math.prod(
        shape[:-2]) > 4


def _thirty_two_slices():
    shape, dtype = (32, 3, 16), torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    p, g = torch.randn(shape, generator=gen).to(dtype), (torch.randn(shape, generator=gen) * 3e-3)
    state = {k: torch.rand(s, generator=gen) * 1e-5 + 1e-8
             for k, s in ops.adalomo_state_shapes(shape).items()}
    h = dict(lr=1e-2, wd=0.1, ls=2.0**10, cgv=0.0, coef=0.5, beta=0.3, eps1=1e-30, eps2=1e-3,
             thr=1.0, first=False, state_scale=1e-5)
    return p, (g * 2.0**10).to(dtype), state, h, "stochastic", 3, 5


@fuzz(25)
@given(adalomo_cases())
@example(_thirty_two_slices()).via("a fixed parameter of 32 slices on every backend")
def test_adalomo_update_agrees_on_every_backend(case):
    p, g, state, h, rounding, seed, step = case
    note(f"shape {tuple(p.shape)} {p.dtype} offsets {p.storage_offset()}/{g.storage_offset()} "
         f"{h} {rounding} seed {seed} step {step}")
    ref, st_ref, ref_found, ref_sq = _run_adalomo("torch", "cpu", p, g, state, h, rounding,
                                                  seed, step)
    _check_adalomo(ref, st_ref, ref, st_ref, p, g, state, h, rounding, "torch")
    assert ref_found == float(not torch.isfinite(g).all())
    _check_norm_side_output(ref_sq, g, h["ls"], "torch")
    for backend, device in BACKENDS_HERE[1:]:
        if _triton_too_slow(backend, p.shape) and p.shape != (32, 3, 16):
            continue
        note(f"backend {backend} on {device}")
        out, st_out, found, sq = _run_adalomo(backend, device, p, g, state, h, rounding, seed,
                                              step)
        _check_adalomo(out, st_out, ref, st_ref, p, g, state, h, rounding, backend)
        assert found == ref_found, backend
        _check_norm_side_output(sq, g, h["ls"], backend)


# ---------------------------------------------------------------- the multi-tensor ops


@st.composite
def multi_cases(draw, op):
    dtype = draw(st.sampled_from(DTYPES))
    k = draw(st.integers(1, 6))
    shapes_ = [draw(st.one_of(st.just(()), st.tuples(st.integers(1, 1500)))) for _ in range(k)]
    hs = [draw(adalomo_hyper() if op == "adalomo" else preprocessing()) for _ in range(k)]
    for h in hs[1:]:  # one loss scale and one clip coefficient per call
        h.update(ls=hs[0]["ls"], coef=hs[0]["coef"])
    eff = draw(log10_between(-20, 15))
    ps = [draw(tensors(s, dtype, draw(log10_between(-3, 3)))) for s in shapes_]
    gs = [poison(draw, draw(tensors(s, dtype, eff * hs[0]["ls"]))) for s in shapes_]
    states = [_adalomo_state(draw, s, h) if op == "adalomo" else {} for s, h in zip(shapes_, hs)]
    rounding = draw(st.sampled_from(ROUNDINGS))
    seeds = [draw(st.integers(0, 2**40)) for _ in range(k)]
    steps = [draw(st.integers(0, 2**31)) for _ in range(k)]
    return ps, gs, states, hs, rounding, seeds, steps


def _run_multi(op, backend, device, ps, gs, states, hs, rounding, seeds, steps):
    outs = [_fresh(p, device) for p in ps]
    gds = [_fresh(g, device) for g in gs]
    found, acc = _scalar(device), _scalar(device)
    name = f"{op}_update_multi_"
    ws = torch.zeros(ops.workspace_numel(name, [p.shape for p in ps], backend=backend,
                                         device=device), device=device)
    common = dict(lr=[h["lr"] for h in hs], weight_decay=[h["wd"] for h in hs],
                  loss_scale=hs[0]["ls"], clip_grad_value=[h["cgv"] for h in hs],
                  clip_coef=_coef(hs[0], device), found_inf=found, grad_sq=acc, workspace=ws,
                  rounding=rounding, seed=seeds, step=steps, backend=backend)
    vs = [st_["exp_avg_sq"].to(device, copy=True) for st_ in states if st_]
    if op == "lomo":
        ops.lomo_update_multi_(outs, gds, **common)
    else:
        ops.adalomo_update_multi_(outs, gds, vs, beta=[h["beta"] for h in hs],
                                  eps1=[h["eps1"] for h in hs], eps2=[h["eps2"] for h in hs],
                                  clip_threshold=[h["thr"] for h in hs], **common)
    return [o.cpu() for o in outs], [v.cpu() for v in vs], found.item(), acc.item()


@pytest.mark.parametrize("op", ["lomo", "adalomo"])
@fuzz(10)
@given(data=st.data())
def test_multi_tensor_ops_agree_on_every_backend(op, data):
    ps, gs, states, hs, rounding, seeds, steps = data.draw(multi_cases(op))
    note(f"{[tuple(p.shape) for p in ps]} {ps[0].dtype} {hs} {rounding}")
    ref, v_ref, ref_found, _ = _run_multi(op, "torch", "cpu", ps, gs, states, hs, rounding, seeds,
                                          steps)
    assert ref_found == float(not all(torch.isfinite(g).all() for g in gs))
    for backend, device in BACKENDS_HERE:
        note(f"backend {backend} on {device}")
        outs, vs, found, _ = (ref, v_ref, ref_found, None) if backend == "torch" else _run_multi(
            op, backend, device, ps, gs, states, hs, rounding, seeds, steps)
        assert found == ref_found, backend
        for i, (p, g, h) in enumerate(zip(ps, gs, hs)):
            if op == "lomo":
                want, size = _lomo_want(p, g, h)
                if rounding == "stochastic" and p.dtype != torch.float32:
                    check_stochastic(outs[i], ref[i], want, size, ref_rtol=1e-6,
                                     min_equal=_min_equal(outs[i]))
                else:
                    check_param(outs[i], ref[i], want, size, ref_rtol=1e-6,
                                f64_rtol=REFERENCE_F64_RTOL if backend == "torch" else 1e-5)
            else:
                _check_adalomo(outs[i], {"exp_avg_sq": vs[i]}, ref[i], {"exp_avg_sq": v_ref[i]},
                               p, g, states[i], h, rounding, backend)


# ---------------------------------------------------------------- GoLore's inner update


@st.composite
def golore_cases(draw):
    inner = draw(st.sampled_from(["adamw", "sgd"]))
    momentum = 0.0 if inner == "adamw" else draw(st.one_of(st.just(0.0), st.floats(0.0, 0.99)))
    full = draw(st.booleans())  # full rank (param updated) or projected (N written into r)
    dtype = draw(st.sampled_from(DTYPES)) if full else torch.float32
    shape = draw(shapes())
    h = dict(lr=draw(st.one_of(st.just(0.0), log10_between(-8, 0))),
             weight_decay=draw(st.one_of(st.just(0.0), log10_between(-4, 0))),
             scale=draw(st.one_of(st.just(1.0), st.floats(-4.0, 4.0))),
             beta1=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.999))),
             beta2=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9999))),
             eps=draw(st.sampled_from([1e-8, 1e-30, 1.0])),
             step=draw(st.integers(1, 10**6)))
    coef = draw(st.one_of(st.none(), log10_between(-6, 0)))
    r = poison(draw, draw(tensors(shape, dtype, draw(log10_between(-15, 15)))))
    p = draw(tensors(shape, dtype, draw(log10_between(-3, 3)))) if full else None
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sc = draw(log10_between(-10, 10))
    state = {k: ((torch.rand(shape, generator=gen) if k == "exp_avg_sq" else
                  torch.randn(shape, generator=gen)) * (sc * sc if k == "exp_avg_sq" else sc))
             for k in ops.golore_state_names(inner, momentum)}
    rounding = draw(st.sampled_from(ROUNDINGS))
    return r, p, state, inner, momentum, h, coef, rounding, draw(st.integers(0, 2**40))


def _run_golore(backend, device, r, p, state, inner, momentum, h, coef, rounding, seed):
    rd = _fresh(r, device)
    pd = None if p is None else _fresh(p, device)
    st_ = {k: v.to(device, copy=True) for k, v in state.items()}
    found = _scalar(device)
    ops.golore_update_(rd, param=pd, **st_, inner=inner, momentum=momentum, **h,
                       clip_coef=None if coef is None else torch.tensor(coef, device=device),
                       found_inf=found, rounding=rounding, seed=seed, backend=backend)
    return (rd.cpu(), None if pd is None else pd.cpu(), {k: v.cpu() for k, v in st_.items()},
            found.item())


def _close(got, want, size, rel):
    return ((got.double() - want).abs() <= rel * size + 1e-37).all()


@fuzz(25)
@given(golore_cases())
def test_golore_update_agrees_on_every_backend(case):
    r, p, state, inner, momentum, h, coef, rounding, seed = case
    note(f"shape {tuple(r.shape)} {r.dtype} full={p is not None} {inner} {momentum} {h} "
         f"coef {coef} {rounding}")
    ref = _run_golore("torch", "cpu", *case)
    finite = bool(torch.isfinite(r).all())
    assert ref[3] == float(not finite)
    if finite:
        n, n_size, st64, st_size, p64, p_size = f64_golore(r, p, state, inner, momentum, coef, h)
        for k in st64:
            assert _close(ref[2][k], st64[k], st_size[k], 2e-6), k
        if p is None:
            assert _close(ref[0], n, n_size, 8e-6)
        elif p.dtype == torch.float32:
            assert _close(ref[1], p64, p_size, 8e-6)
        elif rounding == "nearest":
            assert (ulp_distance(ref[1], p64.to(p.dtype)) <= 1).all()
    else:  # nothing changes (projected: r becomes NaN, so nothing computed from it is applied)
        assert all(torch.equal(ref[2][k], state[k]) for k in state)
        if p is not None:
            assert torch.equal(bits(ref[1]), bits(p))
        else:
            assert torch.isnan(ref[0]).all()
    for backend, device in BACKENDS_HERE[1:]:
        note(f"backend {backend} on {device}")
        got = _run_golore(backend, device, *case)
        assert got[3] == ref[3], backend
        if not finite:
            assert all(torch.equal(got[2][k], state[k]) for k in state), backend
            assert (torch.equal(bits(got[1]), bits(p)) if p is not None
                    else torch.isnan(got[0]).all()), backend
            continue
        ulp = 1.2e-7
        for k in st64:
            assert ((got[2][k] - ref[2][k]).abs() <= 4 * ulp * st_size[k]).all(), (backend, k)
        if p is None:
            assert ((got[0] - ref[0]).abs() <= 16 * ulp * n_size).all(), backend
        elif p.dtype == torch.float32:
            assert ((got[1] - ref[1]).abs() <= 16 * ulp * p_size).all(), backend
        else:
            assert (ulp_distance(got[1], ref[1]) <= 1).all(), backend
        if p is not None:  # full rank: r is the gradient, only read
            assert torch.equal(bits(got[0]), bits(r)), backend


# ---------------------------------------------------------------- invalid inputs

# (what is wrong, the keyword arguments that make it wrong, a word the error must contain)
_BAD_COMMON = [
    ("lr NaN", dict(lr=math.nan), "lr"), ("lr < 0", dict(lr=-1e-3), "lr"),
    ("lr a string", dict(lr="0.1"), "lr"), ("lr Inf", dict(lr=math.inf), "lr"),
    ("weight_decay < 0", dict(weight_decay=-0.1), "weight_decay"),
    ("loss_scale 0", dict(loss_scale=0.0), "loss_scale"),
    ("loss_scale Inf", dict(loss_scale=math.inf), "loss_scale"),
    ("clip_grad_value NaN", dict(clip_grad_value=math.nan), "clip_grad_value"),
    ("rounding", dict(rounding="up"), "rounding"),
    ("clip_coef float64", dict(clip_coef=torch.tensor(0.5, dtype=torch.float64)), "clip_coef"),
    ("clip_coef 2 elements", dict(clip_coef=torch.ones(2)), "clip_coef"),
    ("clip_coef a float", dict(clip_coef=0.5), "clip_coef"),
    ("found_inf int", dict(found_inf=torch.zeros(1, dtype=torch.int32)), "found_inf"),
    ("grad_sq 2 elements", dict(grad_sq=torch.zeros(2)), "grad_sq"),
    ("workspace float16", dict(workspace=torch.zeros(64, dtype=torch.float16)), "workspace"),
    ("seed a string", dict(seed="1"), "seed"), ("seed a float", dict(seed=1.5), "seed"),
    ("step a float", dict(step=2.5), "step"), ("step < 0", dict(step=-1), "step"),
    ("backend", dict(backend="cuda"), "backend"),
]
_BAD_TENSORS = ["grad dtype", "grad shape", "grad not a tensor", "param float64",
                "param not contiguous", "grad not contiguous", "param an int tensor"]
_BAD_ADALOMO = [
    ("beta > 1", dict(beta=1.5), "beta"), ("beta < 0", dict(beta=-0.1), "beta"),
    ("eps1 < 0", dict(eps1=-1e-30), "eps1"), ("eps2 NaN", dict(eps2=math.nan), "eps2"),
    ("clip_threshold 0", dict(clip_threshold=0.0), "clip_threshold"),
    ("stage 4", dict(stage=4), "stage"), ("stage without workspace", dict(stage=1), "stage"),
    ("global_numel < 0", dict(global_numel=-5), "global"),
    ("state dtype", "state dtype", "exp_avg_sq"), ("state shape", "state shape", "exp_avg_sq"),
    ("state missing", "state missing", "exp_avg_sq"),
]


def _corrupt(what, p, g):
    """(p, g) made wrong as ``what`` says (new tensors; p, g themselves are kept to compare)."""
    if what == "grad dtype":  # (a float32 gradient of a 16-bit param is a valid buffer)
        other = torch.float16 if g.dtype != torch.float16 else torch.bfloat16
        return p, g.to(other)
    if what == "grad shape":
        return p, torch.zeros(tuple(p.shape) + (2,), dtype=g.dtype)
    if what == "grad not a tensor":
        return p, g.tolist()
    if what == "param float64":
        return p.double(), g
    if what == "param an int tensor":
        return torch.zeros(p.shape, dtype=torch.int32), g
    if what in ("param not contiguous", "grad not contiguous"):
        base = torch.zeros(tuple(p.shape) + (2,), dtype=p.dtype)[..., 0]
        base.copy_(p if what == "param not contiguous" else g)
        if base.numel() <= 1:  # a single element is contiguous whatever its strides: skip
            return None
        return (base, g) if what == "param not contiguous" else (p, base)
    raise AssertionError(what)


@st.composite
def invalid_cases(draw, op):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.one_of(st.just(()), st.tuples(st.integers(1, 40)),
                           st.tuples(st.integers(1, 9), st.integers(1, 40)),
                           st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 9))))
    p = draw(tensors(shape, dtype, 1.0))
    g = draw(tensors(shape, dtype, 0.1))
    bad = _BAD_COMMON + [(w, w, w.split()[0]) for w in _BAD_TENSORS]
    if op == "adalomo_update_":
        bad = bad + _BAD_ADALOMO
    return p, g, draw(st.sampled_from(bad))


def _state_of(p, what=None):
    shapes_ = ops.adalomo_state_shapes(p.shape)
    state = {k: torch.rand(s) + 0.1 for k, s in shapes_.items()}
    if what == "state dtype":
        state = {k: v.double() for k, v in state.items()}
    elif what == "state shape":
        state = {k: torch.rand(tuple(v.shape) + (3,)) for k, v in state.items()}
    elif what == "state missing":
        state = {}
    return state


@pytest.mark.parametrize("op", ["lomo_update_", "adalomo_update_"])
@fuzz(30)
@given(data=st.data())
def test_invalid_inputs_raise_clear_errors_and_change_nothing(op, data):
    p, g, (what, bad, word) = data.draw(invalid_cases(op))
    note(f"{op} shape {tuple(p.shape)} {p.dtype}: {what}")
    for backend, device in BACKENDS_HERE:
        pd, gd = _fresh(p, device), _fresh(g, device)
        kw = dict(lr=1e-2, backend=backend)
        args = (pd, gd)
        if isinstance(bad, str) and bad in _BAD_TENSORS:
            args = _corrupt(bad, pd, gd)
            if args is None:
                return
        elif isinstance(bad, dict):
            kw.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in bad.items()})
        state = {}
        if op == "adalomo_update_":
            state = {k: v.to(device) for k, v in _state_of(
                p, bad if isinstance(bad, str) and bad.startswith("state") else None).items()}
            kw.setdefault("beta", 0.5)
        saved = {k: v.clone() for k, v in state.items()}
        with pytest.raises((TypeError, ValueError)) as exc:
            getattr(ops, op)(*args, **state, **kw)
        assert word in str(exc.value), (backend, what, str(exc.value))
        assert torch.equal(bits(pd.cpu()), bits(p)) and torch.equal(bits(gd.cpu()), bits(g))
        assert all(torch.equal(state[k], saved[k]) for k in state)


_BAD_MULTI = [
    ("params a tensor", "params a tensor", "params"), ("grads a tensor", "grads a tensor", "grads"),
    ("one grad fewer", "one grad fewer", "grads"),
    ("lr list too short", dict(lr=[1e-2]), "lr"), ("lr NaN in the list", "lr NaN", "lr"),
    ("seed list of strings", "seeds strings", "seed"), ("step floats", dict(step=1.5), "step"),
    ("a grad of another dtype", "grad dtype", "grad"),
    ("exp_avg_sqs a tensor", "exp_avg_sqs a tensor", "exp_avg_sqs"),
    ("a 2-d tensor (adalomo)", "2-d", "0-d and 1-d"),
]


@pytest.mark.parametrize("op", ["lomo_update_multi_", "adalomo_update_multi_"])
@fuzz(15)
@given(data=st.data())
def test_invalid_multi_tensor_inputs_raise_clear_errors_and_change_nothing(op, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    k = data.draw(st.integers(2, 4))
    shapes_ = [data.draw(st.one_of(st.just(()), st.tuples(st.integers(1, 50)))) for _ in range(k)]
    ps = [data.draw(tensors(s, dtype, 1.0)) for s in shapes_]
    gs = [data.draw(tensors(s, dtype, 0.1)) for s in shapes_]
    what, bad, word = data.draw(st.sampled_from(
        [b for b in _BAD_MULTI if op.startswith("adalomo") or "adalomo" not in b[0]
         and b[1] != "exp_avg_sqs a tensor"]))
    note(f"{op} {shapes_} {dtype}: {what}")
    for backend, device in BACKENDS_HERE:
        pd, gd = [_fresh(p, device) for p in ps], [_fresh(g, device) for g in gs]
        vs = [torch.rand(p.shape, device=device) + 0.1 for p in ps]
        saved = [v.clone() for v in vs]
        kw = dict(lr=[1e-2] * k, seed=list(range(k)), backend=backend)
        args = [pd, gd] + ([vs] if op.startswith("adalomo") else [])
        if op.startswith("adalomo"):
            kw["beta"] = 0.5
        if isinstance(bad, dict):
            kw.update(bad)
        elif bad == "params a tensor":
            args[0] = pd[0]
        elif bad == "grads a tensor":
            args[1] = gd[0]
        elif bad == "one grad fewer":
            args[1] = gd[:-1]
        elif bad == "lr NaN":
            kw["lr"] = [1e-2] * (k - 1) + [math.nan]
        elif bad == "seeds strings":
            kw["seed"] = [str(i) for i in range(k)]
        elif bad == "grad dtype":
            args[1] = gd[:-1] + [gd[-1].double()]
        elif bad == "exp_avg_sqs a tensor":
            args[2] = vs[0]
        elif bad == "2-d":
            args[0] = pd[:-1] + [torch.zeros(2, 3, dtype=dtype, device=device)]
            args[1] = gd[:-1] + [torch.zeros(2, 3, dtype=dtype, device=device)]
            args[2] = vs[:-1] + [torch.zeros(2, 3, device=device)]
        with pytest.raises((TypeError, ValueError)) as exc:
            getattr(ops, op)(*args, **kw)
        assert word in str(exc.value), (backend, what, str(exc.value))
        assert all(torch.equal(bits(a.cpu()), bits(b)) for a, b in zip(pd, ps))
        assert all(torch.equal(a, b) for a, b in zip(vs, saved))


_BAD_GOLORE = [
    ("lr NaN", dict(lr=math.nan), "lr"), ("lr < 0", dict(lr=-1.0), "lr"),
    ("weight_decay < 0", dict(weight_decay=-1.0), "weight_decay"),
    ("scale Inf", dict(scale=math.inf), "scale"), ("beta1 = 1", dict(beta1=1.0), "beta1"),
    ("beta2 < 0", dict(beta2=-0.1), "beta2"), ("eps < 0", dict(eps=-1e-8), "eps"),
    ("momentum = 1", dict(momentum=1.0), "momentum"), ("inner", dict(inner="adam"), "inner"),
    ("step 0 (adamw)", dict(step=0), "step"), ("step a float", dict(step=2.5), "step"),
    ("seed a string", dict(seed="3"), "seed"), ("rounding", dict(rounding="down"), "rounding"),
    ("clip_coef a float", dict(clip_coef=0.5), "clip_coef"),
    ("found_inf float64", dict(found_inf=torch.zeros(1, dtype=torch.float64)), "found_inf"),
    ("r float16 (projected)", "r fp16", "r (the projected gradient) must be float32"),
    ("param of another dtype", "param dtype", "param"),
    ("exp_avg of another shape", "state shape", "exp_avg"),
    ("exp_avg_sq missing", "state missing", "exp_avg_sq"),
    ("r a list", "r list", "r must be a tensor"),
]


@fuzz(20)
@given(data=st.data())
def test_invalid_golore_inputs_raise_clear_errors_and_change_nothing(data):
    shape = data.draw(st.one_of(st.just(()), st.tuples(st.integers(1, 60)),
                                st.tuples(st.integers(1, 6), st.integers(1, 20))))
    full = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from(DTYPES)) if full else torch.float32
    r = data.draw(tensors(shape, dtype, 0.1))
    p = data.draw(tensors(shape, dtype, 1.0)) if full else None
    what, bad, word = data.draw(st.sampled_from(_BAD_GOLORE))
    note(f"shape {shape} {dtype} full={full}: {what}")
    for backend, device in BACKENDS_HERE:
        rd = _fresh(r, device)
        pd = None if p is None else _fresh(p, device)
        state = {k: torch.rand(shape, device=device) for k in ("exp_avg", "exp_avg_sq")}
        saved = {k: v.clone() for k, v in state.items()}
        kw = dict(param=pd, **state, inner="adamw", lr=1e-2, step=3, backend=backend)
        first = rd
        if isinstance(bad, dict):
            kw.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in bad.items()})
        elif bad == "r fp16":
            if full:
                return
            first = rd.half()
        elif bad == "param dtype":
            if not full:
                return
            kw["param"] = pd.double()
        elif bad == "state shape":
            kw["exp_avg"] = torch.zeros(tuple(shape) + (2,), device=device)
        elif bad == "state missing":
            kw["exp_avg_sq"] = None
        elif bad == "r list":
            first = rd.tolist()
        with pytest.raises((TypeError, ValueError)) as exc:
            ops.golore_update_(first, **kw)
        assert word in str(exc.value), (backend, what, str(exc.value))
        assert torch.equal(bits(rd.cpu()), bits(r))
        assert pd is None or torch.equal(bits(pd.cpu()), bits(p))
        assert all(torch.equal(state[k], saved[k]) for k in state)
