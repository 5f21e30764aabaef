"""The newer parts of the op contract on every backend: the gradient-norm side output
(``grad_sq``), reusable workspaces, staged AdaLomo for sharded parameters, and the multi-tensor
ops. Each backend is compared with its own one-call / single-tensor path (bitwise where the
contract says so) and with float64.

A backend joins ``CONTRACT_BACKENDS`` once it implements these; the reference always does."""

import math

import pytest
import torch
from adalomo_shards import run_sharded
from conftest import ulp_distance

from lomo_kernels import ops, reference

# (backend, device) pairs under test
CONTRACT_BACKENDS = [("torch", "cpu"), ("native", "cpu"), ("triton", "cpu"),
                     ("cuda_emulated", "cpu")]

SHAPES = [(7,), (4097,), (37, 129), (130, 256), (3, 17, 33), (1, 4096), (4096, 1), ()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(shape, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _state(shape, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(s, generator=gen) * 1e-4 + 1e-6
            for k, s in ops.adalomo_state_shapes(shape).items()}


def _ws(op, shapes, backend, device):
    return torch.zeros(ops.workspace_numel(op, shapes, backend=backend, device=device),
                       device=device)


@pytest.mark.parametrize("backend,device", CONTRACT_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_sq_is_the_unscaled_squared_norm(backend, device, shape, dtype):
    ls = 1024.0 if dtype != torch.float16 else 8.0
    p, g = _rand(shape, dtype, seed=1), _rand(shape, dtype, scale=ls, seed=2)
    want = ((g.double() / ls) ** 2).sum().item()
    for op in ("lomo_update_", "adalomo_update_"):
        acc = torch.full((1,), 0.5, device=device)
        ws = _ws(op, [shape], backend, device)
        kw = dict(lr=1e-2, loss_scale=ls, clip_grad_value=1e-3, clip_coef=torch.tensor(
            0.5, device=device), grad_sq=acc, workspace=ws, backend=backend)
        pd, gd = p.to(device, copy=True), g.to(device)
        if op == "lomo_update_":
            ops.lomo_update_(pd, gd, **kw)
        else:
            st = {k: v.to(device) for k, v in _state(shape).items()}
            ops.adalomo_update_(pd, gd, beta=0.3, **st, **kw)
        got = acc.item() - 0.5
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-30), (op, got, want)


@pytest.mark.parametrize("backend,device", CONTRACT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_workspace_reuse_is_bitwise_stable(backend, device, dtype):
    """A reused workspace (already used by other shapes) gives bitwise the result of a fresh one,
    and a call without a workspace too."""
    shapes = [(37, 129), (4097,), (3, 17, 33)]
    ws = _ws("adalomo_update_", shapes, backend, device)
    for shape in shapes + shapes:
        p, g = _rand(shape, dtype, seed=1), _rand(shape, dtype, scale=0.05, seed=2)
        outs = []
        for w in (ws, _ws("adalomo_update_", [shape], backend, device), None):
            pd, st = p.to(device, copy=True), {k: v.to(device) for k, v in _state(shape).items()}
            acc = torch.zeros(1, device=device)
            ops.adalomo_update_(pd, g.to(device), beta=0.3, lr=1e-2, weight_decay=0.1,
                                rounding="stochastic" if dtype != torch.float32 else "nearest",
                                grad_sq=acc, workspace=w, backend=backend, **st)
            outs.append([pd.cpu(), acc.cpu()] + [v.cpu() for v in st.values()])
        for other in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(outs[0], other)), shape


STAGED = {(37,): [20, 17], (37, 129): [13, 0, 24], (4, 6, 9): [1, 3], (130, 256): [65, 65],
          (3, 4096): [1, 1, 1], (2, 3): [1, 1, 0, 0]}


@pytest.mark.parametrize("backend,device", CONTRACT_BACKENDS)
@pytest.mark.parametrize("shape", list(STAGED), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stages_on_shards_match_the_one_call_update(backend, device, shape, dtype):
    h = dict(lr=3e-2, wd=0.1, ls=3.0, cgv=0.02, coef=0.7, beta=0.3, ct=0.05)
    impl = ops.get_impl("adalomo_update_", backend, device)
    p, g = _rand(shape, dtype, seed=1), _rand(shape, dtype, scale=0.05, seed=2)
    st = _state(shape)
    want = p.to(device, copy=True)
    st_want = {k: v.to(device, copy=True) for k, v in st.items()}
    acc_want = torch.zeros(1, device=device)
    impl(want, g.to(device), st_want.get("exp_avg_sq_row"), st_want.get("exp_avg_sq_col"),
         st_want.get("exp_avg_sq"), torch.tensor(0.7, device=device), None, h["lr"], h["wd"],
         h["ls"], h["cgv"], h["beta"], 1e-30, 1e-3, h["ct"], "nearest", 5, 2, acc_want,
         _ws("adalomo_update_", [shape], backend, device))
    acc = torch.zeros(1, device=device)
    got, st_got, found = run_sharded(impl, p.to(device), g.to(device),
                                     {k: v.to(device) for k, v in st.items()}, h, STAGED[shape],
                                     backend, grad_sq=acc)
    assert not any(f.item() for f in found)
    got, want = got.cpu(), want.cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    else:
        assert (ulp_distance(got, want) <= 1).all()
    for k in st_want:
        torch.testing.assert_close(st_got[k].cpu(), st_want[k].cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(acc.cpu(), acc_want.cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", CONTRACT_BACKENDS)
def test_stages_skip_every_shard_on_a_non_finite_gradient(backend, device):
    h = dict(lr=3e-2, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.3, ct=1.0)
    impl = ops.get_impl("adalomo_update_", backend, device)
    for shape, sizes in (((10, 8), [5, 5]), ((9,), [4, 5]), ((4, 3, 5), [2, 2])):
        p, g = _rand(shape, torch.bfloat16, seed=1), _rand(shape, torch.bfloat16, seed=2)
        g.view(-1)[-2] = float("nan")
        st = {k: v.to(device) for k, v in _state(shape).items()}
        st0 = {k: v.clone() for k, v in st.items()}
        got, st_got, found = run_sharded(impl, p.to(device), g.to(device), st, h, sizes, backend)
        assert torch.equal(got.cpu(), p) and all(f.item() == 1.0 for f in found)
        assert all(torch.equal(st_got[k], st0[k]) for k in st0)


MULTI_SHAPES = [(7,), (4096,), (), (1,), (65536,), (33,)]


@pytest.mark.parametrize("backend,device", CONTRACT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_multi_tensor_ops_are_bitwise_the_single_tensor_ops(backend, device, dtype, rounding):
    k = len(MULTI_SHAPES)
    ps = [_rand(s, dtype, seed=i) for i, s in enumerate(MULTI_SHAPES)]
    gs = [_rand(s, dtype, scale=0.1, seed=50 + i).to(device) for i, s in enumerate(MULTI_SHAPES)]
    gs[2] = torch.full_like(gs[2], float("inf"))  # a non-finite tensor among finite ones
    hyper = dict(lr=[0.01 * (i + 1) for i in range(k)], weight_decay=[0.1 * (i % 2) for i in range(k)],
                 clip_grad_value=[0.0, 0.05] * (k // 2), seed=list(range(k)), step=[3] * k)
    common = dict(loss_scale=2.0, rounding=rounding, backend=backend,
                  clip_coef=torch.tensor(0.9, device=device))
    for op in ("lomo", "adalomo"):
        vs = [torch.rand(s, device=device) + 0.1 for s in MULTI_SHAPES]
        single = [p.to(device, copy=True) for p in ps]
        v1 = [v.clone() for v in vs]
        f1, a1 = torch.zeros(1, device=device), torch.zeros(1, device=device)
        ws = _ws(f"{op}_update_", MULTI_SHAPES, backend, device)
        for i in range(k):
            kw = {name: vals[i] for name, vals in hyper.items()}
            if op == "lomo":
                ops.lomo_update_(single[i], gs[i], found_inf=f1, grad_sq=a1, workspace=ws,
                                 **kw, **common)
            else:
                ops.adalomo_update_(single[i], gs[i], exp_avg_sq=v1[i], beta=0.4, found_inf=f1,
                                    grad_sq=a1, workspace=ws, **kw, **common)
        multi = [p.to(device, copy=True) for p in ps]
        v2 = [v.clone() for v in vs]
        f2, a2 = torch.zeros(1, device=device), torch.zeros(1, device=device)
        ws = _ws(f"{op}_update_multi_", MULTI_SHAPES, backend, device)
        if op == "lomo":
            ops.lomo_update_multi_(multi, gs, found_inf=f2, grad_sq=a2, workspace=ws, **hyper,
                                   **common)
        else:
            ops.adalomo_update_multi_(multi, gs, v2, beta=0.4, found_inf=f2, grad_sq=a2,
                                      workspace=ws, **hyper, **common)
        assert all(torch.equal(a, b) for a, b in zip(single + v1, multi + v2)), op
        assert f1.item() == f2.item() == 1.0
        assert torch.equal(a1, a2) or (a1.isinf().all() and a2.isinf().all())
