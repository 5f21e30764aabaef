"""The properties of the LOMO update, each written once and run on every backend (kernel_backends.py):
it matches the reference and a float64 evaluation, stochastic rounding is bitwise the reference's
and unbiased, non-finite gradients leave their elements unchanged and raise the flag, empty tensors
and unaligned views work, results are deterministic, and an optimizer on the backend trains as
the pure-PyTorch one does. What only one backend has (its threads, CPU clones, launcher checks,
op schema checks) is in test_native_lomo_update.py and test_triton_lomo_update.py.

Cases come from two recipes (``n`` and ``t``: the data of the former per-backend files), so every
case each backend ran before still runs, now on every backend; each backend keeps its tolerances
(kernel_backends.py: ``native`` bitwise or 1e-6 of the terms, ``triton`` 2 ulp of an unfused fma).
A table's dtype may be a pair (oracle.F32_GRADS): a 16-bit parameter with a float32 gradient, the
accumulation buffer the optimizers update from; the gradient dtype rule is checked at the end.
"""

import pytest
import torch
from conftest import ODD_SIZES, ulp_distance
from kernel_backends import (ALL, DISPATCHED, KERNELS, Backend, assert_runs_close, cases,
                             large_on_emulation, runs_compare)
from oracle import (DTYPES, F32_GRADS, LLM_SHAPES, bits, check_grad_dtype_rule, dtypes_of,
                    f64_lomo, grad_dtype_accepted, grad_dtype_error, rand)

import lomo_kernels
from lomo_kernels import ops, reference

pytestmark = pytest.mark.lomo

HYPER = {
    "plain": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None),
    "wd": dict(lr=3e-2, wd=0.1, ls=1.0, cgv=0.0, coef=None),
    "clip": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.5, coef=0.37),
    "all": dict(lr=3e-3, wd=0.1, ls=1000.0, cgv=0.7, coef=0.37),  # non-power-of-two loss scale
    "pow2_scale": dict(lr=3e-2, wd=0.01, ls=1024.0, cgv=0.0, coef=None),
    "pow2_scale_small_lr": dict(lr=1e-2, wd=0.01, ls=1024.0, cgv=0.0, coef=None),
}


def _data(shape, dtype, h, recipe):
    """(p0, g): recipe "n" draws g at scale 3 (the loss scale then shrinks it), "t" at the loss
    scale (an unscaled gradient of size 1). ``dtype``: both tensors' dtype, or a (param, grad)
    pair."""
    pd, gd = dtypes_of(dtype)
    if recipe == "n":
        return rand(shape, pd, seed=1), rand(shape, gd, scale=3.0, seed=2)
    return rand(shape, pd, seed=0), rand(shape, gd, scale=max(h["ls"], 1.0), seed=1)


def _call(fn, p, g, h, device, rounding="nearest", seed=0, step=1, found=None):
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    fn(p, g, coef, found, h["lr"], h["wd"], h["ls"], h["cgv"], rounding, seed, step)


def _run(backend: Backend, p0, g, h, rounding="nearest", seed=0, step=1):
    """(the backend's result, the reference's on CPU, the backend's found_inf), both from p0."""
    dev = backend.device
    out, found = p0.to(dev, copy=True), torch.zeros(1, device=dev)
    _call(backend.op("lomo_update_"), out, g.to(dev), h, dev, rounding, seed, step, found)
    ref = p0.clone()
    _call(reference.lomo_update_, ref, g, h, "cpu", rounding, seed, step)
    return out.cpu(), ref, found.cpu()


def _check_against_reference(backend, out, ref, p0, size=None):
    """Nearest rounding: the reference's bits (C++ CPU kernels), else within the backend's
    tolerance: fp32 1e-6 of the size of the terms (native; ``size`` from oracle.f64_lomo) or 2 ulp
    of the larger of |p0|, |ref| (Triton: the reference's torch.add(alpha) is one fma, the
    interpreter's is not fused); fp16/bf16 1 ulp."""
    if backend.bitwise:
        assert torch.equal(bits(out), bits(ref))
    if out.dtype != torch.float32:
        assert ulp_distance(out, ref).max().item() <= 1
    elif backend.family == "triton":
        assert ((out - ref).abs() <= 2.4e-7 * torch.maximum(p0.abs(), ref.abs())).all()
    else:
        assert ((out.double() - ref.double()).abs() <= 1e-6 * size + 1e-30).all()


def _check_against_float64(backend, out, want, size):
    if out.dtype != torch.float32:  # rounded once from fp32 math
        assert ulp_distance(out, want.to(out.dtype)).max().item() <= 1
    elif backend.family == "triton":
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-7)
    else:  # relative 1e-5 of the terms (cancellation makes a pointwise relative error meaningless)
        assert ((out.double() - want).abs() <= 1e-5 * size + 1e-30).all()


# ---------------------------------------------------------------- nearest rounding

_SHAPES_N = [(n,) for n in ODD_SIZES] + [(1, 4097), (4097, 1), (37, 129), (3, 17, 33), ()] + \
    LLM_SHAPES
_NEAREST = (
    [(d, s, h, "n") for d in DTYPES for s in _SHAPES_N for h in ("plain", "all", "pow2_scale")]
    + [(d, (n,), h, "t") for d in DTYPES for n in ODD_SIZES[:3]
       for h in ("plain", "wd", "clip", "all", "pow2_scale_small_lr")]
    + [(d, s, "all", "t") for d in DTYPES for s in [(1, 300), (300, 1), (37, 129), (3, 17, 33), ()]]
    + [(torch.float32, (ODD_SIZES[3],), "all", "t"), (torch.bfloat16, (ODD_SIZES[3],), "all", "t"),
       (torch.float16, (ODD_SIZES[3],), "pow2_scale_small_lr", "t")]
    # a float32 gradient (an accumulation buffer) of a 16-bit parameter
    + [(d, s, h, "n") for d in F32_GRADS
       for s in [(n,) for n in ODD_SIZES] + [(37, 129), (3, 17, 33), (), (130, 4096)]
       for h in ("plain", "all", "pow2_scale")]
    + [(d, (n,), h, "t") for d in F32_GRADS for n in ODD_SIZES[:3] for h in ("wd", "clip")]
)


def _slow(backend, dtype, shape, *_):
    return large_on_emulation(backend, shape)


@pytest.mark.parametrize("backend,dtype,shape,hname,recipe", cases(KERNELS, _NEAREST, _slow))
def test_matches_reference_and_float64(backend, dtype, shape, hname, recipe):
    h = HYPER[hname]
    p0, g = _data(shape, dtype, h, recipe)
    out, ref, found = _run(backend, p0, g, h)
    want, size = f64_lomo(p0, g, h)
    assert out.shape == p0.shape
    assert p0.numel() < 100 or not torch.equal(out, p0)  # it did update
    assert found.item() == 0.0
    _check_against_reference(backend, out, ref, p0, size)
    _check_against_float64(backend, out, want, size)


# ---------------------------------------------------------------- stochastic rounding

_STOCHASTIC = (
    [(d, s, "all", "n", 11, 3) for d in (torch.float16, torch.bfloat16)
     for s in [(ODD_SIZES[3],), (37, 129), (1,), (130, 4096)]]
    + [(d, (n,), h, "t", 12345, 7) for d in (torch.bfloat16, torch.float16)
       for n, h in [(1, "all"), (7, "plain"), (4097, "all"), (4097, "wd")]]
    + [(torch.bfloat16, (ODD_SIZES[3],), "clip", "t", 2**32 + 99, 2**33 + 3)]
    + [(d, s, "all", "n", 11, 3) for d in F32_GRADS for s in [(ODD_SIZES[3],), (37, 129), (1,)]]
    + [(d, (4097,), "wd", "t", 12345, 7) for d in F32_GRADS]
)


@pytest.mark.parametrize("backend,dtype,shape,hname,recipe,seed,step",
                         cases(KERNELS, _STOCHASTIC, _slow))
def test_stochastic_rounding_is_bitwise_the_reference(backend, dtype, shape, hname, recipe, seed,
                                                      step):
    # every backend hashes (seed, step, element index) the same way (docs/spec.md)
    h = HYPER[hname]
    p0, g = _data(shape, dtype, h, recipe)
    out, ref, _ = _run(backend, p0, g, h, "stochastic", seed, step)
    near, _, _ = _run(backend, p0, g, h, "nearest", seed, step)
    assert torch.equal(bits(out), bits(ref))
    assert ulp_distance(out, near).max().item() <= 1
    if p0.numel() > 1000:
        assert not torch.equal(out, near)  # some elements rounded the other way


@pytest.mark.parametrize("backend,dtype", cases(  # 5 x 65536 elements: 10 s on the reference
    ALL, [torch.float16, torch.bfloat16], slow_if=lambda b, d: b.slow or b.family == "reference"))
def test_stochastic_rounding_keeps_a_tiny_decay_unbiased(backend, dtype):
    # p = 1 and decay 1 - 1e-4: p * decay is not representable, the nearest value is 1 again
    # (the update is lost), stochastic rounding lands on the two neighbours with the right odds.
    n, wd, lr = 1 << 16, 1e-3, 0.1
    op, device = backend.op("lomo_update_"), backend.device
    p = torch.ones(n, dtype=dtype, device=device)
    g = torch.zeros(n, dtype=dtype, device=device)
    near = p.clone()
    op(near, g, None, None, lr, wd, 1.0, 0.0, "nearest", 0, 1)
    # (the Triton interpreter stores 16-bit values by truncation: its "nearest" lands below 1)
    assert (near == 1).all() or backend.id == "triton-interpreter"
    x = float(torch.tensor(1 - lr * wd, dtype=torch.float32))
    means = []
    for step in range(1, 5):
        out = p.clone()
        op(out, g, None, None, lr, wd, 1.0, 0.0, "stochastic", 7, step)
        lo = float(out.min())
        assert set(out.unique().tolist()) <= {lo, 1.0} and lo < x < 1.0
        means.append(out.double().mean().item())
    mean, prob = sum(means) / len(means), (1.0 - x) / (1.0 - lo)  # P(round down)
    sigma = (1.0 - lo) * (prob * (1 - prob) / (n * len(means))) ** 0.5
    assert abs(mean - x) < 5 * sigma


@pytest.mark.parametrize("backend,dtype", cases(ALL, [torch.bfloat16, torch.float16], None))
def test_stochastic_rounding_keeps_tiny_gradient_steps_unbiased(backend, dtype):
    # Every element starts at 1.0 and moves by lr*g = 1e-4: far below half an ulp of bf16/fp16 at 1
    # (2**-8 / 2**-11), so nearest rounding loses the update; the stochastic mean keeps it.
    n, seeds, device = 4097, 8, backend.device
    op = backend.op("lomo_update_")
    g = torch.full((n,), 1.0, dtype=dtype, device=device)
    h = dict(lr=1e-4, wd=0.0, ls=1.0, cgv=0.0, coef=None)
    want = float(torch.tensor(1.0) - torch.tensor(1e-4))  # the fp32 result
    spacing = torch.finfo(dtype).eps / 2  # of the grid just below 1.0
    total = 0.0
    for s in range(seeds):
        p = torch.ones(n, dtype=dtype, device=device)
        _call(op, p, g, h, device, "stochastic", s, 1)
        assert ((p == 1.0) | (p == 1.0 - spacing)).all()  # one of the two neighbours
        assert (p == 1.0 - spacing).any() and (p == 1.0).any()
        total += p.double().sum().item()
    mean = total / (n * seeds)
    # within 5 standard errors (<= 0.5 spacing / sqrt(samples)) of the fp32 value
    assert abs(mean - want) <= 5 * 0.5 * spacing / (n * seeds) ** 0.5
    # the bias that stochastic rounding removes (nearest keeps 1.0; the interpreter's truncating
    # bf16 store gives 1 - spacing: biased either way)
    p = torch.ones(n, dtype=dtype, device=device)
    _call(op, p, g, h, device, "nearest", 0, 1)
    assert abs(p.double().mean().item() - want) > 0.5e-4


# ---------------------------------------------------------------- non-finite gradients

# "n": four bad values in one block, nearest rounding; "t": five, in a full block and the tail
# block, stochastic rounding
_LAYOUTS = {"n": (4097, [0, 9, 4000, 4096], [float("nan"), float("inf"), -float("inf"),
                                                  float("nan")], (5, 6), "nearest"),
            "t": (4096 + 100, [0, 17, 4095, 4096, 4195], [float("nan"), float("inf"),
                                                          -float("inf"), float("nan"),
                                                          float("inf")], (3, 4), "stochastic")}
_NON_FINITE = [(d, "n", "all") for d in DTYPES + F32_GRADS] + [
    (d, "t", h) for d in DTYPES + F32_GRADS for h in ("plain", "all")]


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter, Inf/NaN
@pytest.mark.parametrize("backend,dtype,layout,hname", cases(KERNELS, _NON_FINITE, None))
def test_non_finite_gradients_keep_those_elements(backend, dtype, layout, hname):
    n, bad_at, bad_values, (pseed, gseed), rounding = _LAYOUTS[layout]
    h, device = HYPER[hname], backend.device
    (pd, gd) = dtypes_of(dtype)
    p0, g = rand((n,), pd, seed=pseed), rand((n,), gd, seed=gseed)
    bad = torch.tensor(bad_at)
    g[bad] = torch.tensor(bad_values, dtype=gd)
    found = torch.zeros(1, device=device)
    out = p0.to(device, copy=True)
    _call(backend.op("lomo_update_"), out, g.to(device), h, device, rounding, 1, 1, found)
    ref, ref_found = p0.clone(), torch.zeros(1)
    _call(reference.lomo_update_, ref, g, h, "cpu", rounding, 1, 1, ref_found)
    out = out.cpu()
    assert found.item() == 1.0 and ref_found.item() == 1.0
    assert torch.equal(bits(out[bad]), bits(p0[bad]))
    good = torch.ones(n, dtype=torch.bool)
    good[bad] = False
    assert not torch.equal(out[good], p0[good])  # the rest was updated
    if backend.family == "triton":
        _check_against_reference(backend, out, ref, p0)
    elif dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    else:
        assert ulp_distance(out, ref).max().item() <= (0 if backend.bitwise else 1)
    # a flag already raised by another parameter stays raised by a clean one
    clean = p0.to(device, copy=True)
    _call(backend.op("lomo_update_"), clean, rand((n,), gd).to(device), h, device,
          found=found)
    assert found.item() == 1.0


@pytest.mark.parametrize("backend", cases(ALL, [()], None))
def test_found_inf_is_only_ever_set(backend):
    op, device = backend.op("lomo_update_"), backend.device
    p, g = rand((100,), torch.float32).to(device), rand((100,), torch.float32).to(device)
    found = torch.zeros(1, device=device)
    op(p, g, None, found, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
    assert found.item() == 0.0  # finite gradients: untouched
    found.fill_(1.0)
    op(p, g, None, found, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
    assert found.item() == 1.0  # never cleared by the kernel


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("backend,dtype", cases(ALL, DTYPES, None))
def test_empty_is_a_no_op(backend, dtype):
    op, device = backend.op("lomo_update_"), backend.device
    for shape in [(0,), (3, 0), (0, 5)]:
        p = torch.empty(shape, dtype=dtype, device=device)
        found = torch.zeros(1, device=device)
        op(p, torch.empty_like(p), None, found, 1e-2, 0.0, 1.0, 0.0, "stochastic", 0, 1)
        assert found.item() == 0.0 and p.shape == shape


@pytest.mark.parametrize("backend", cases(KERNELS, [()], None))
def test_unaligned_views_are_bitwise_the_reference(backend):
    # storage offsets of 1..7 elements defeat the 16-byte vector loads; the results must not care
    device = backend.device
    base_p, base_g = rand((4200,), torch.bfloat16, seed=8), rand((4200,), torch.bfloat16, seed=9)
    h = HYPER["all"]
    for off in range(1, 8):
        p0, g = base_p[off: off + 4097], base_g[off: off + 4097]
        out = base_p.to(device, copy=True)[off: off + 4097]
        _call(backend.op("lomo_update_"), out, g.to(device), h, device, "stochastic", 11, 3)
        ref = p0.clone()
        _call(reference.lomo_update_, ref, g, h, "cpu", "stochastic", 11, 3)
        assert torch.equal(bits(out.cpu()), bits(ref))


def _update_with_grad_sq(backend, p, g, n):
    device = p.device
    found, acc = torch.zeros(1, device=device), torch.zeros(1, device=device)
    ws = torch.zeros(ops.workspace_numel("lomo_update_", [(n,)], backend=backend.name,
                                         device=device), device=device)
    backend.op("lomo_update_")(p, g, torch.tensor(0.9, device=device), found, 3e-2, 0.1, 4.0, 0.5,
                               "stochastic", 7, 9, acc, ws)
    return found.cpu(), acc.cpu()


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter, Inf/NaN
@pytest.mark.parametrize("backend,dtype,p_off,g_off", cases(
    KERNELS, [(d, po, go) for d in (torch.bfloat16, torch.float32, F32_GRADS[0])
              for po, go in [(3, 3), (1, 1), (3, 5), (0, 2)]], None))
def test_unaligned_views_update_like_aligned_tensors(backend, dtype, p_off, g_off):
    # (3, 3), (1, 1): equally misaligned, a kernel may peel the head and vectorise the body
    # (a float32 gradient of a bf16 parameter too: its k-th element meets a 16-byte boundary
    # where the parameter's does); (3, 5), (0, 2): not peelable. Either way: bitwise the update of
    # aligned copies, nothing outside the view touched, a non-finite gradient in the head and in
    # the body skipped.
    n, device = 2 * 4096 + 37, backend.device
    pd, gd = dtypes_of(dtype)
    base_p = rand((n + 16,), pd, seed=21).to(device)
    base_g = rand((n + 16,), gd, seed=22).to(device)
    base_g[g_off + 1] = float("nan")
    base_g[g_off + 5000] = float("inf")
    p, g = base_p[p_off: p_off + n], base_g[g_off: g_off + n]
    if backend.family == "triton" and p_off == g_off and p_off:
        assert lomo_kernels.triton_kernels.launch.peel(p, g)[0] > 0
    p_copy, g_copy = p.clone(), g.clone()
    before = base_p.clone()
    f1, a1 = _update_with_grad_sq(backend, p, g, n)
    f2, a2 = _update_with_grad_sq(backend, p_copy, g_copy, n)
    assert torch.equal(p.cpu().view(torch.uint8), p_copy.cpu().view(torch.uint8))
    assert f1.item() == f2.item() == 1.0
    assert torch.isnan(a1).all() and torch.isnan(a2).all()  # the true norm of a NaN gradient
    outside = torch.ones(n + 16, dtype=torch.bool)
    outside[p_off: p_off + n] = False
    assert torch.equal(base_p.cpu()[outside], before.cpu()[outside])
    for i in (1, 5000):
        assert torch.equal(p.cpu()[i: i + 1].view(torch.uint8),
                           before.cpu()[p_off + i: p_off + i + 1].view(torch.uint8))
    # and the squared norm of a finite gradient does not depend on the alignment
    g_fin = torch.nan_to_num(g, nan=0.5, posinf=0.5)
    f1, a1 = _update_with_grad_sq(backend, p, g_fin, n)
    f2, a2 = _update_with_grad_sq(backend, p_copy, g_fin.clone(), n)
    torch.testing.assert_close(a1, a2, rtol=1e-6, atol=0)
    want = ((g_fin.cpu().double() / 4.0) ** 2).sum()
    torch.testing.assert_close(a1.double(), want.view(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,dtype,rounding", cases(
    ALL, [(torch.float32, "nearest"), (torch.bfloat16, "stochastic")], None))
def test_is_deterministic(backend, dtype, rounding):
    h, shape = HYPER["all"], (3 * 4096 + 5,)
    p0, g = _data(shape, dtype, h, "t")
    a, _, _ = _run(backend, p0, g, h, rounding, 5, 6)
    b, _, _ = _run(backend, p0, g, h, rounding, 5, 6)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---------------------------------------------------------------- through the optimizer


def _train(backend_name, device, scenario, dtype, rounding):
    """(losses, final parameters) of Lomo on a small MLP: "value_clip" (6 fused backwards with
    clip_grad_value; fp16 runs the loss scaler's grad_norm pass) or "norm_clip" (4 steps of
    grad_norm + fused_backward: global-norm clipping with clip_coef on the device)."""
    torch.manual_seed(0)
    sizes = (33, 65, 7) if scenario == "value_clip" else (6, 16, 3)
    act = torch.nn.GELU() if scenario == "value_clip" else torch.nn.Tanh()
    model = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), act,
                                torch.nn.LayerNorm(sizes[1]), torch.nn.Linear(sizes[1], sizes[2]))
    model = model.to(dtype).to(device)
    if scenario == "value_clip":
        opt = lomo_kernels.Lomo(model, lr=1e-2, weight_decay=0.01, clip_grad_value=0.5,
                                backend=backend_name, rounding=rounding, seed=3)
    else:
        opt = lomo_kernels.Lomo(model, lr=0.05, weight_decay=0.01, clip_grad_norm=1.0,
                                backend=backend_name, rounding=rounding, seed=3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    if scenario == "norm_clip":
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
    for _ in range(6 if scenario == "value_clip" else 4):
        if scenario == "value_clip":
            x = torch.randn(16, 33, generator=gen).to(dtype)
            y = torch.randn(16, 7, generator=gen).to(dtype)

        def loss_fn():
            return torch.nn.functional.mse_loss(model(x.to(device, dtype)).float(),
                                                y.to(device).float())

        loss = loss_fn()
        if opt.clip_grad_norm is not None:  # the exact clipping pass (fp16: the overflow pass)
            opt.grad_norm(loss)
            if scenario == "norm_clip":
                loss = loss_fn()
        opt.fused_backward(loss, lr=opt.param_groups[0]["lr"])
        losses.append(loss.item())
    return losses, [p.detach().cpu().clone() for p in model.parameters()]


_TRAINING = [("value_clip", d, r) for d in DTYPES for r in ("nearest", "stochastic")
             if d != torch.float32 or r == "nearest"]  # float32 parameters refuse stochastic
_TRAINING += [("norm_clip", torch.float32, "nearest"), ("norm_clip", torch.bfloat16, "stochastic")]


@pytest.mark.parametrize("backend,scenario,dtype,rounding", cases(
    KERNELS, _TRAINING, None, keep=lambda b, s, d, r: runs_compare(b, d, r)))
def test_optimizer_matches_the_torch_backend(backend, scenario, dtype, rounding):
    losses, params = _train(backend.name, backend.device, scenario, dtype, rounding)
    ref_losses, ref_params = _train("torch", backend.device, scenario, dtype, rounding)
    assert losses[-1] < losses[0]
    if backend.family == "native" and backend.device == "cpu":
        assert losses == ref_losses  # bitwise equal updates on CPU give the same run
        for a, b in zip(params, ref_params):
            assert torch.equal(bits(a), bits(b))
        return
    assert_runs_close(losses, ref_losses, params, ref_params, dtype == torch.float32)


# ---------------------------------------------------------------- the gradient dtype rule

@pytest.mark.parametrize("backend", cases(ALL, [()], None))
def test_the_gradient_dtype_rule(backend):
    # Every (param, grad) dtype pair through the checked entry point of every backend and, for the
    # dispatched ones, through the op itself (the C++ checks) and its fake (meta tensors): the
    # accepted pairs update (single and multi-tensor op), the others are refused with both dtypes
    # named and nothing changed.
    device = backend.device
    for pd in DTYPES:
        for gd in DTYPES:
            p, g = rand((5, 7), pd, seed=3).to(device), rand((5, 7), gd, seed=4).to(device)
            calls = [lambda: ops.lomo_update_(p, g, lr=0.1, backend=backend.name),
                     lambda: ops.lomo_update_multi_([p], [g], lr=0.1, backend=backend.name)]
            if backend in DISPATCHED:
                calls += [lambda: backend.op("lomo_update_")(p, g, None, None, 0.1, 0.0, 1.0, 0.0,
                                                             "nearest", 0, 1),
                          lambda: backend.op("lomo_update_multi_")(
                              [p], [g], None, None, [0.1], [0.0], 1.0, [0.0], "nearest", [0],
                              [1])]
            check_grad_dtype_rule(calls, pd, gd, [p])
    # the fakes (torch.compile, opcheck): meta tensors, once
    if backend.family == "reference":
        for pd in DTYPES:
            for gd in DTYPES:
                p, g = torch.zeros(4, 6, dtype=pd, device="meta"), torch.zeros(
                    4, 6, dtype=gd, device="meta")
                call = lambda: torch.ops.lomo_kernels.lomo_update_(  # noqa: E731
                    p, g, None, None, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
                if grad_dtype_accepted(pd, gd):
                    call()
                else:
                    with pytest.raises(RuntimeError, match=grad_dtype_error(pd, gd)):
                        call()
