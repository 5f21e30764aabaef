"""The properties of the AdaLomo update, each written once and run on every backend
(kernel_backends.py), on every kind of parameter: 0-d, 1-d (unfactored), 2-d incl. 1 x n and m x 1,
N-d (factored over the last two dims, batched over the rest). It matches the reference and a
float64 evaluation (parameter and state), stochastic rounding is the reference's and unbiased, a
non-finite gradient changes nothing, empty tensors are no-ops, results are deterministic, and an
optimizer on the backend trains as the pure-PyTorch one does. What only one backend has is in
test_native_adalomo_update.py and test_triton_adalomo_update.py.

The native kernels reduce in double over fixed partitions, the Triton kernels in float32 tiles, the
reference in float32 (its ``torch.linalg.vector_norm`` of a 0.5M-element tensor is off by ~2e-5
relative): they differ in the last bits of lr_t and rms(u). Where an update almost cancels the
parameter, that shows as more than one ulp of the tiny result; those elements are checked against
the size of the terms instead. Each backend keeps the tolerances its tests always had. A table's
dtype may be a pair (oracle.F32_GRADS): a 16-bit parameter with a float32 gradient, the
accumulation buffer the optimizers update from.
"""

import pytest
import torch
from conftest import ODD_SIZES, ulp_distance
from kernel_backends import (ALL, DISPATCHED, KERNELS, assert_runs_close, cases,
                             large_on_emulation, numel, runs_compare)
from oracle import (DTYPES, EPS1, EPS2, F32_GRADS, LLM_SHAPES, adalomo_state, check_param,
                    check_grad_dtype_rule, check_state, dtypes_of, f64_adalomo, rand)

import lomo_kernels
from lomo_kernels import ops, reference

pytestmark = pytest.mark.adalomo

HYPER = {
    "first_step": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.0, thr=1.0),
    "all": dict(lr=3e-2, wd=0.1, ls=3.0, cgv=0.02, coef=0.7, beta=0.3, thr=1.0),
    "clipped": dict(lr=1e-3, wd=0.01, ls=1024.0, cgv=0.0, coef=None, beta=0.9, thr=0.05),
    "plain": dict(lr=1e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.0, thr=1.0),
    # rms(u) is about 1, so a threshold of 0.25 makes the update normalisation bite
    "all_normalised": dict(lr=3e-3, wd=0.1, ls=1000.0, cgv=0.7, coef=0.37, beta=0.6, thr=0.25),
    "scaled": dict(lr=1e-3, wd=0.01, ls=1024.0, cgv=0.0, coef=None, beta=0.3, thr=0.5),
}


def _data(shape, dtype, h, recipe, zeros=False):
    """(p0, g, state0) of a recipe: ("n", s): small gradients (0.05) and a small state (1e-4,
    zeros for a first step); ("t", s): gradients at the loss scale and a state of size 1. The
    seeds are s, s + 1, s + 2. ``dtype``: both tensors' dtype, or a (param, grad) pair."""
    kind, s = recipe
    pd, gd = dtypes_of(dtype)
    p0 = rand(shape, pd, seed=s)
    if kind == "n":
        g = rand(shape, gd, scale=0.05, seed=s + 1)
        return p0, g, adalomo_state(shape, s + 2, scale=1e-4, offset=1e-6, zeros=zeros)
    return p0, rand(shape, gd, scale=h["ls"], seed=s + 1), adalomo_state(shape, s + 2)


def _call(fn, p, g, st, h, device, rounding="nearest", found=None, seed=5, step=2):
    """One update of ``p`` (on ``device``) with a copy of the state ``st``; returns the new state
    on CPU."""
    dev = {k: v.to(device, copy=True) for k, v in st.items()}
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    fn(p, g.to(device), dev.get("exp_avg_sq_row"), dev.get("exp_avg_sq_col"), dev.get("exp_avg_sq"),
       coef, found, h["lr"], h["wd"], h["ls"], h["cgv"], h["beta"], EPS1, EPS2, h["thr"],
       rounding, seed, step)
    return {k: v.cpu() for k, v in dev.items()}


def _run(backend, p0, g, st0, h, rounding="nearest", seed=5, step=2):
    """The backend's and the CPU reference's results of one update: dicts with p, state, found."""
    dev = backend.device
    out = {"p": p0.to(dev, copy=True), "found": torch.zeros(1, device=dev)}
    out["state"] = _call(backend.op("adalomo_update_"), out["p"], g, st0, h, dev, rounding,
                         out["found"], seed, step)
    ref = {"p": p0.clone(), "found": torch.zeros(1)}
    ref["state"] = _call(reference.adalomo_update_, ref["p"], g, st0, h, "cpu", rounding,
                         ref["found"], seed, step)
    out["p"], out["found"] = out["p"].cpu(), out["found"].cpu()
    return out, ref


def _within_one_ulp(out, want, p0):
    """1 ulp, except where p*decay - lr_t*u cancels to far below |p|: there the fp32 error of the
    terms (|p| * ~1e-6, e.g. the reference's fp32 vector_norm over 278k elements is 7e-6 off)
    exceeds an ulp of the tiny result, for the reference itself as much as for the kernel."""
    near = ulp_distance(out, want) <= 1
    cancelled = (out.double() - want.double()).abs() <= 2e-5 * p0.double().abs()
    assert (near | cancelled).all()
    assert near.float().mean().item() > 0.999


def _check_nearest(backend, out, ref, p0, want):
    """The backend's parameter and state against the reference's and float64, with its family's
    tolerances (native: oracle.check_param / check_state; Triton: 1e-5 of float64, a few fp32 ulps
    of the reference, 1 ulp in fp16/bf16 except where the result cancels)."""
    p, st = out["p"], out["state"]
    assert out["found"].item() == 0.0 and ref["found"].item() == 0.0
    if backend.family != "triton":
        check_param(p, ref["p"], want.p, want.size)
        check_state(st, ref["state"], want.state)
        return
    if p.dtype == torch.float32:
        torch.testing.assert_close(p.double(), want.p, rtol=1e-5, atol=1e-7)
        # the reference sums in another order: a few fp32 ulps
        torch.testing.assert_close(p, ref["p"], rtol=2e-6, atol=1e-7)
    else:  # within 1 ulp of the reference's stored result, and of the float64 value rounded once
        _within_one_ulp(p, ref["p"], p0)
        _within_one_ulp(p, want.p.to(p.dtype), p0)
    for k, v in want.state.items():
        torch.testing.assert_close(st[k].double(), v, rtol=1e-5, atol=0)
        torch.testing.assert_close(st[k], ref["state"][k], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- nearest rounding

_SHAPES_N = [(n,) for n in ODD_SIZES] + [(1, 4097), (4097, 1), (37, 129), (3, 17, 33), ()] + \
    LLM_SHAPES
_SHAPES_T = [(), (1,), (7,), (4097,), (1, 300), (300, 1), (37, 129), (3, 17, 33), (2, 3, 5, 7)]
_NEAREST = (
    [(d, s, h, ("n", 1)) for d in DTYPES for s in _SHAPES_N for h in ("first_step", "all",
                                                                      "clipped")]
    + [(d, s, h, ("t", 0)) for d in DTYPES for s in _SHAPES_T for h in ("plain", "all_normalised")]
    # ~278k elements: many tiles per batch, ragged tiles on both axes, several row/col chunks
    + [(torch.bfloat16, (ODD_SIZES[3],), "scaled", ("t", 5)),
       (torch.float32, (67, 4099), "scaled", ("t", 5)),
       (torch.float16, (5, 61, 911), "scaled", ("t", 5))]
    # a float32 gradient (an accumulation buffer) of a 16-bit parameter
    + [(d, s, h, ("n", 1)) for d in F32_GRADS
       for s in [(7,), (4097,), (ODD_SIZES[3],), (1, 4097), (4097, 1), (37, 129), (3, 17, 33),
                 (), (130, 4096), (40, 8, 64)]
       for h in ("first_step", "all", "clipped")]
    + [(d, s, h, ("t", 0)) for d in F32_GRADS for s in _SHAPES_T
       for h in ("plain", "all_normalised")]
)


def _slow(backend, dtype, shape, *rest):
    """Large tensors on an emulation or interpreter; on the Triton interpreter also the first
    recipe's cases of more than 1000 elements (5-15 s each there on a loaded 2-core machine);
    the second recipe's, which the Triton kernels have always been tested on by default, stay in
    the default run."""
    recipe = rest[-1] if rest else None
    return large_on_emulation(backend, shape) or (
        backend.slow and backend.family == "triton" and recipe is not None
        and recipe[0] == "n" and numel(shape) > 1000)


@pytest.mark.parametrize("backend,dtype,shape,hname,recipe", cases(KERNELS, _NEAREST, _slow))
def test_matches_reference_and_float64(backend, dtype, shape, hname, recipe):
    h = HYPER[hname]
    p0, g, st0 = _data(shape, dtype, h, recipe, zeros=hname == "first_step")
    seed, step = (5, 2) if recipe[0] == "n" else (0, 1)
    out, ref = _run(backend, p0, g, st0, h, seed=seed, step=step)
    want = f64_adalomo(p0, g, st0, h)
    if recipe[0] == "t":  # this recipe's data makes the update normalisation bite
        assert want.rms_u / h["thr"] > 1.05 or h["thr"] == 1.0
    assert out["p"].shape == p0.shape
    assert p0.numel() < 100 or not torch.equal(out["p"], p0)  # it did update
    _check_nearest(backend, out, ref, p0, want)


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("backend,dtype,shape", cases(
    KERNELS, [(d, s) for d in [torch.bfloat16, torch.float16] + F32_GRADS
              for s in [(7,), (4097,), (37, 129), (3, 17, 33)]], None))
def test_stochastic_rounding_matches_the_reference(backend, dtype, shape):
    # The rounding itself is bitwise the reference's (test_lomo_update.py); here the fp32 values
    # before it differ from the reference's by the order of the sums (a few fp32 ulps), which moves
    # a stochastic rounding by one ulp only when a random threshold falls in between.
    h = HYPER["all_normalised"]
    p0, g, st0 = _data(shape, dtype, h, ("t", 0))
    out, ref = _run(backend, p0, g, st0, h, "stochastic", seed=77, step=3)
    assert ulp_distance(out["p"], ref["p"]).max().item() <= 1
    assert (out["p"] == ref["p"]).float().mean().item() >= 0.999
    assert not torch.equal(out["p"], p0)


@pytest.mark.parametrize("backend,dtype,shape", cases(
    KERNELS, [(d, s) for d in [torch.float16, torch.bfloat16] + F32_GRADS
              for s in [(ODD_SIZES[3],), (37, 129), (3, 17, 33), (130, 4096), (40, 8, 64)]],
    _slow))
def test_stochastic_rounding_rounds_the_fp32_result(backend, dtype, shape):
    # The fp32 kernel on the upcast inputs yields the unrounded result (the partition and hence
    # every sum is the same for every dtype); stochastic rounding must be the reference's rounding
    # of it, with the same (seed, step, index) hash.
    h, device = HYPER["all"], backend.device
    op = backend.op("adalomo_update_")
    p0, g, st0 = _data(shape, dtype, h, ("n", 4))
    out = p0.to(device, copy=True)
    _call(op, out, g, st0, h, device, rounding="stochastic", seed=9, step=4)
    out32 = p0.float().to(device)
    _call(op, out32, g.float(), st0, h, device)
    want = reference.round_to_dtype(out32.cpu(), p0.dtype, "stochastic", 9, 4)
    if backend.bitwise:
        assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))
    else:
        assert ulp_distance(out.cpu(), want).max().item() <= 1
    near = p0.to(device, copy=True)
    _call(op, near, g, st0, h, device, seed=9, step=4)
    assert ulp_distance(out.cpu(), near.cpu()).max().item() <= 1
    assert not torch.equal(out.cpu(), near.cpu())


@pytest.mark.parametrize("backend", cases(ALL, [()], None))
def test_stochastic_rounding_is_unbiased(backend):
    # p = 1 everywhere, rms(p) = 1, lr_t = lr; u = +-1 at t = 1 (1-d: u = g / sqrt(g*g)), so each
    # element moves by 1e-4: below half an ulp of bf16 at 1.0. The mean over seeds keeps it.
    n, seeds, dtype, device = 4096, 8, torch.bfloat16, backend.device
    h = dict(lr=1e-4, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.0, thr=1.0)
    spacing = torch.finfo(dtype).eps / 2  # of the grid just below 1.0
    total = 0.0
    for s in range(seeds):
        p = torch.ones(n, dtype=dtype, device=device)
        _call(backend.op("adalomo_update_"), p, torch.ones(n, dtype=dtype), {
            "exp_avg_sq": torch.zeros(n)}, h, device, "stochastic", seed=s, step=1)
        assert ((p == 1.0) | (p == 1.0 - spacing)).all()
        total += p.double().sum().item()
    want = float(torch.tensor(1.0) - torch.tensor(1e-4))
    assert abs(total / (n * seeds) - want) <= 5 * 0.5 * spacing / (n * seeds) ** 0.5


_DETERMINISM = [(d, r, s, "all_normalised", ("t", 0), 5, 6)
                for d, r in [(torch.float32, "nearest"), (torch.bfloat16, "stochastic")]
                for s in [(4097 * 3,), (67, 129), (3, 40, 70)]]
_DETERMINISM += [(torch.bfloat16, "stochastic", (1031, 2053), "all", ("n", 13), 5, 2)]


@pytest.mark.parametrize("backend,dtype,rounding,shape,hname,recipe,seed,step", cases(
    ALL, _DETERMINISM, lambda b, d, r, s, *_: large_on_emulation(b, s),
    # the large case is about the kernels' threads and blocks: the reference has none (and takes
    # 15 s on it)
    keep=lambda b, d, r, s, *_: b.family != "reference" or numel(s) < 20000))
def test_is_deterministic(backend, dtype, rounding, shape, hname, recipe, seed, step):
    h = HYPER[hname]
    p0, g, st0 = _data(shape, dtype, h, recipe)
    a, _ = _run(backend, p0, g, st0, h, rounding, seed, step)
    b, _ = _run(backend, p0, g, st0, h, rounding, seed, step)
    assert torch.equal(a["p"].view(torch.uint8), b["p"].view(torch.uint8))
    for k in a["state"]:
        assert torch.equal(a["state"][k].view(torch.uint8), b["state"][k].view(torch.uint8))


# ---------------------------------------------------------------- non-finite gradients, empty

# "n": one NaN (fp16) or Inf in the middle of small gradients, nearest rounding; "t": each of NaN,
# Inf, -Inf in gradients of size 1 with value clipping (which would make an Inf finite: it must
# still count), stochastic rounding; "u": each of them with neither value clipping nor clip_coef
# (the native kernels then find a bad element through its row's sum), in rows of one column tile
# and of several (more than 4096 columns)
_BAD = (float("nan"), float("inf"), -float("inf"))
_NON_FINITE = (
    [(d, s, "n", None) for d in DTYPES + F32_GRADS
     for s in [(4097,), (37, 129), (3, 17, 33), (130, 4096)]]
    + [(d, s, "t", bad) for d in DTYPES + F32_GRADS for s in [(7,), (4097,), (37, 129), (3, 17, 33)]
       for bad in _BAD]
    + [(d, s, "u", bad) for d in DTYPES + F32_GRADS for s in [(37, 129), (3, 17, 33), (5, 4500)]
       for bad in _BAD]
)


@pytest.mark.parametrize("backend,dtype,shape,layout,bad", cases(
    ALL, _NON_FINITE, lambda b, d, s, *_: large_on_emulation(b, s)))
def test_non_finite_gradient_changes_nothing(backend, dtype, shape, layout, bad):
    if layout == "n":
        h, rounding = HYPER["all"], "nearest"
        p0, g, st0 = _data(shape, dtype, h, ("n", 7))
        bad = float("nan") if dtype == torch.float16 else float("inf")
    elif layout == "u":
        h, rounding = HYPER["scaled"], "nearest"
        p0, g, st0 = _data(shape, dtype, h, ("n", 7))
    else:
        h, rounding = HYPER["all_normalised"], "stochastic"
        p0, _, st0 = _data(shape, dtype, h, ("t", 0))
        g = rand(shape, dtypes_of(dtype)[1], seed=9)
    g.view(-1)[g.numel() // 2] = bad
    out, ref = _run(backend, p0, g, st0, h, rounding, seed=0, step=1)
    for r in (out, ref):
        assert r["found"].item() == 1.0
        assert torch.equal(r["p"].view(torch.uint8), p0.view(torch.uint8))
        for k, v in st0.items():
            assert torch.equal(r["state"][k], v)
    if layout != "n":
        return
    # and a clean gradient afterwards still updates (this data moves every element by many ulps)
    g.view(-1)[g.numel() // 2] = 0.01
    found = torch.zeros(1, device=backend.device)
    p = p0.to(backend.device, copy=True)
    _call(backend.op("adalomo_update_"), p, g, st0, h, backend.device, found=found)
    assert found.item() == 0.0 and not torch.equal(p.cpu(), p0)


@pytest.mark.parametrize("backend,dtype,shape", cases(
    ALL, [(d, s) for d in DTYPES + F32_GRADS if dtypes_of(d)[1] != torch.float16
          for s in [(37, 129), (5, 4500)]], None))
def test_a_finite_gradient_whose_square_overflows_is_not_non_finite(backend, dtype, shape):
    # 3e19 is finite in float32 and bfloat16; its square (and its row's sum) is not. Without
    # clipping the native kernels look at a row again when its sum is not finite: the gradient
    # itself is, so nothing is flagged, as in the reference.
    h = HYPER["plain"]
    p0, g, st0 = _data(shape, dtype, h, ("n", 7))
    g.view(-1)[g.numel() // 2] = 3e19
    out, ref = _run(backend, p0, g, st0, h, "nearest", seed=0, step=1)
    assert out["found"].item() == ref["found"].item() == 0.0


@pytest.mark.parametrize("backend,dtype", cases(ALL, DTYPES, None))
def test_empty_is_a_no_op(backend, dtype):
    op, device = backend.op("adalomo_update_"), backend.device
    for shape in [(0,), (3, 0), (0, 5), (2, 0, 4)]:
        p = torch.empty(shape, dtype=dtype, device=device)
        st = {k: v.to(device) for k, v in adalomo_state(shape, 0).items()}
        found = torch.zeros(1, device=device)
        op(p, torch.empty_like(p), st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
           st.get("exp_avg_sq"), None, found, 1e-2, 0.0, 1.0, 0.0, 0.5, EPS1, EPS2, 1.0,
           "nearest", 0, 1)
        assert found.item() == 0.0


@pytest.mark.parametrize("backend", cases(ALL, [()], None))
def test_the_gradient_dtype_rule(backend):
    # As test_lomo_update.py's: every (param, grad) dtype pair, factored (2-d) and unfactored
    # (1-d, also through the multi-tensor op), through the checked entry point and, dispatched,
    # the op itself; accepted pairs update, the others are refused naming both dtypes, nothing
    # changed (parameter and state).
    device = backend.device
    for shape in [(5, 7), (9,)]:
        for pd in DTYPES:
            for gd in DTYPES:
                p, g = rand(shape, pd, seed=3).to(device), rand(shape, gd, seed=4).to(device)
                st = {k: v.to(device) for k, v in adalomo_state(shape, 5).items()}
                args = (st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"))
                calls = [lambda: ops.adalomo_update_(
                    p, g, exp_avg_sq_row=args[0], exp_avg_sq_col=args[1], exp_avg_sq=args[2],
                    lr=0.1, beta=0.5, backend=backend.name)]
                if len(shape) == 1:
                    calls.append(lambda: ops.adalomo_update_multi_(
                        [p], [g], [args[2]], lr=0.1, beta=0.5, backend=backend.name))
                if backend in DISPATCHED:
                    calls.append(lambda: backend.op("adalomo_update_")(
                        p, g, *args, None, None, 0.1, 0.0, 1.0, 0.0, 0.5, EPS1, EPS2, 1.0,
                        "nearest", 0, 1))
                check_grad_dtype_rule(calls, pd, gd, [p, *st.values()])


# ---------------------------------------------------------------- through the optimizer


def _model(name, dtype):
    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=32, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).to(dtype)
    if name == "conv1d":  # a 3-d conv weight (factored over its last two dims), 2-d and 1-d
        return torch.nn.Sequential(torch.nn.Conv1d(3, 8, 5), torch.nn.GELU(), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 12, 7)).to(dtype)
    # a 4-D conv weight (8, 2, 3, 3): factored over (3, 3), batched over 16 (docs/spec.md)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 4 * 4, 3)).to(dtype)


def _train(backend_name, device, name, dtype, rounding):
    """(losses, parameters, tensor states) of AdaLomo on a small model: conv1d (6 steps,
    clip_grad_value 1, fresh batches), llama and conv2d (4 steps on one batch, clip_grad_value 5)."""
    model = _model(name, dtype).to(device)
    opt = lomo_kernels.AdaLomo(model, lr=1e-2, weight_decay=0.01,
                               clip_grad_value=1.0 if name == "conv1d" else 5.0,
                               backend=backend_name, rounding=rounding, seed=3)
    gen = torch.Generator().manual_seed(1)
    if name == "llama":
        ids = torch.randint(0, 64, (2, 12), generator=gen).to(device)
    elif name == "conv2d":
        x, y = torch.randn(4, 2, 6, 6, generator=gen), torch.randn(4, 3, generator=gen)
    losses = []
    for _ in range(6 if name == "conv1d" else 4):
        if name == "llama":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            if name == "conv1d":
                x = torch.randn(16, 3, 16, generator=gen).to(dtype)
                y = torch.randn(16, 7, generator=gen).to(dtype)
            loss = torch.nn.functional.mse_loss(model(x.to(device, dtype)).float(),
                                                y.to(device).float())
        opt.fused_backward(loss, lr=1e-2)
        losses.append(loss.item())
    states = [{k: v.cpu() for k, v in opt.state[p].items() if torch.is_tensor(v)}
              for p in model.parameters()]
    return losses, [p.detach().cpu() for p in model.parameters()], states


_TRAINING = [("conv1d", d, "nearest") for d in DTYPES] + [
    ("llama", torch.float32, "nearest"), ("llama", torch.bfloat16, "stochastic"),
    ("conv2d", torch.float32, "nearest")]


@pytest.mark.parametrize("backend,name,dtype,rounding", cases(
    KERNELS, _TRAINING, lambda b, *_: b.slow and b.family == "triton",  # 25-35 s each there
    keep=lambda b, n, d, r: runs_compare(b, d, r)))
def test_optimizer_matches_the_torch_backend(backend, name, dtype, rounding):
    losses, params, states = _train(backend.name, backend.device, name, dtype, rounding)
    ref_losses, ref_params, ref_states = _train("torch", backend.device, name, dtype, rounding)
    assert losses[-1] < losses[0]
    exact = dtype == torch.float32
    if backend.family == "native":
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-3 * abs(b)
        for a, b in zip(params, ref_params):
            if exact:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            else:
                assert ulp_distance(a, b).max().item() <= 2  # 6 steps of <= 1 ulp, rarely compounded
    else:
        assert_runs_close(losses, ref_losses, params, ref_params, exact)
    for sa, sb in zip(states, ref_states):
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4 if exact else 5e-2, atol=0)

