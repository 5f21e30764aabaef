"""Op contracts: torch.library registration (opcheck), argument checks, backend resolution."""

import pytest
import torch

import lomo_kernels
from lomo_kernels import ops, reference


def _lomo_args(shape=(37, 129), dtype=torch.bfloat16, coef=True, found=True):
    p = torch.randn(shape).to(dtype)
    g = torch.randn(shape).to(dtype)
    return (p, g, torch.tensor(0.5) if coef else None, torch.zeros(1) if found else None,
            1e-2, 0.1, 4.0, 0.8, "nearest", 3, 5)


def _adalomo_args(shape=(37, 129), dtype=torch.bfloat16, rounding="nearest"):
    p = torch.randn(shape).to(dtype)
    g = torch.randn(shape).to(dtype)
    st = ops.adalomo_state_shapes(shape)
    row = torch.rand(st["exp_avg_sq_row"]) + 0.1 if "exp_avg_sq_row" in st else None
    col = torch.rand(st["exp_avg_sq_col"]) + 0.1 if "exp_avg_sq_col" in st else None
    v = torch.rand(st["exp_avg_sq"]) + 0.1 if "exp_avg_sq" in st else None
    return (p, g, row, col, v, torch.tensor(0.5), torch.zeros(1), 1e-2, 0.1, 4.0, 0.8, 0.4,
            1e-30, 1e-3, 1.0, rounding, 3, 5)


@pytest.mark.parametrize("shape", [(7,), (37, 129), (3, 5, 9)])
@pytest.mark.parametrize("coef", [True, False])
def test_opcheck_lomo_update(shape, coef):
    torch.library.opcheck(torch.ops.lomo_kernels.lomo_update_, _lomo_args(shape, coef=coef, found=coef))


@pytest.mark.parametrize("shape", [(7,), (37, 129), (3, 5, 9)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_opcheck_adalomo_update(shape, rounding):
    torch.library.opcheck(torch.ops.lomo_kernels.adalomo_update_, _adalomo_args(shape, rounding=rounding))


def test_dispatcher_op_matches_reference():
    a = _lomo_args(dtype=torch.float32)
    b = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a)
    torch.ops.lomo_kernels.lomo_update_(*a)
    reference.lomo_update_(*b)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)


def test_available_backends_reports_every_backend():
    info = lomo_kernels.available_backends()
    assert set(info) == {"native", "triton", "torch", "cuda_emulated"}
    assert info["torch"] == "loaded"
    for name, status in info.items():
        assert status == "loaded" or status.startswith(("loaded", "unavailable: "))


def test_resolve_backend():
    assert ops.resolve_backend("torch", "cpu") == "torch"
    assert ops.resolve_backend("auto", "cpu") in ("native", "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cuda", "cpu")
    if not ops.available_backends()["native"].startswith("loaded"):
        with pytest.raises(RuntimeError, match="backend 'native' cannot run on cpu"):
            ops.resolve_backend("native", "cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu"):
        ops.resolve_backend("triton", "cpu")


# ---------------------------------------------------------------- checked entry points


def _call_lomo(p, g, **kw):
    ops.lomo_update_(p, g, lr=0.1, backend="torch", **kw)


def test_bad_inputs_are_rejected_before_anything_changes():
    p = torch.randn(4, 6)
    before = p.clone()
    cases = [
        (dict(g=torch.randn(4, 6).double()), TypeError, "grad dtype"),
        (dict(g=torch.randn(6, 4)), ValueError, "grad shape"),
        (dict(g=torch.randn(6, 4).t()), ValueError, "contiguous"),
        (dict(g=torch.randn(4, 6), rounding="up"), ValueError, "rounding"),
        (dict(g=torch.randn(4, 6), clip_coef=torch.tensor(1.0).double()), ValueError, "clip_coef"),
        (dict(g=torch.randn(4, 6), found_inf=torch.zeros(2)), ValueError, "found_inf"),
    ]
    for kw, exc, msg in cases:
        g = kw.pop("g")
        with pytest.raises(exc, match=msg):
            _call_lomo(p, g, **kw)
        assert torch.equal(p, before)
    with pytest.raises(TypeError, match="param dtype"):
        _call_lomo(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="param dtype"):
        _call_lomo(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="param must be contiguous|param and grad must be contiguous"):
        q = torch.randn(6, 4).t()
        _call_lomo(q, torch.randn(6, 4).t())


def test_adalomo_state_is_checked():
    p, g = torch.randn(5, 7), torch.randn(5, 7)
    row, col = torch.zeros(5), torch.zeros(7)
    with pytest.raises(ValueError, match="exp_avg_sq_row is required"):
        ops.adalomo_update_(p, g, exp_avg_sq_col=col, lr=0.1, beta=0.0, backend="torch")
    with pytest.raises(ValueError, match="exp_avg_sq_col must be float32 of shape"):
        ops.adalomo_update_(p, g, exp_avg_sq_row=row, exp_avg_sq_col=torch.zeros(5), lr=0.1,
                            beta=0.0, backend="torch")
    with pytest.raises(ValueError, match="exp_avg_sq must be None"):
        ops.adalomo_update_(p, g, exp_avg_sq_row=row, exp_avg_sq_col=col,
                            exp_avg_sq=torch.zeros(5, 7), lr=0.1, beta=0.0, backend="torch")
    with pytest.raises(ValueError, match="exp_avg_sq_row must be float32"):
        ops.adalomo_update_(p, g, exp_avg_sq_row=row.half(), exp_avg_sq_col=col, lr=0.1, beta=0.0,
                            backend="torch")
    p0 = p.clone()
    ops.adalomo_update_(p, g, exp_avg_sq_row=row, exp_avg_sq_col=col, lr=0.1, beta=0.0,
                        backend="torch")
    assert not torch.equal(p, p0) and row.min() > 0 and col.min() > 0


def test_state_shapes():
    assert ops.adalomo_state_shapes((4, 5)) == {"exp_avg_sq_row": (4,), "exp_avg_sq_col": (5,)}
    assert ops.adalomo_state_shapes((2, 4, 5)) == {
        "exp_avg_sq_row": (2, 4), "exp_avg_sq_col": (2, 5)}
    assert ops.adalomo_state_shapes((9,)) == {"exp_avg_sq": (9,)}
    assert ops.adalomo_state_shapes(()) == {"exp_avg_sq": ()}


def test_empty_parameters_are_a_no_op():
    p, g = torch.zeros(0, 3), torch.zeros(0, 3)
    ops.lomo_update_(p, g, lr=0.1, backend="torch")
    ops.adalomo_update_(p, g, exp_avg_sq_row=torch.zeros(0), exp_avg_sq_col=torch.zeros(3),
                        lr=0.1, beta=0.0, backend="torch")


# ---------------------------------------------------------------- workspace, grad_sq, multi


def test_opcheck_multi_ops_and_new_arguments():
    ps = [torch.randn(7).bfloat16(), torch.randn(()).bfloat16()]
    gs = [torch.randn(7).bfloat16(), torch.randn(()).bfloat16()]
    torch.library.opcheck(torch.ops.lomo_kernels.lomo_update_multi_, (
        ps, gs, None, torch.zeros(1), [0.1, 0.2], [0.0, 0.1], 2.0, [0.0, 0.5], "nearest", [1, 2],
        [3, 3], torch.zeros(1), None))
    vs = [torch.rand(7) + 0.1, torch.rand(()) + 0.1]
    torch.library.opcheck(torch.ops.lomo_kernels.adalomo_update_multi_, (
        ps, gs, vs, None, None, [0.1, 0.2], [0.0, 0.1], 2.0, [0.0, 0.5], [0.3, 0.3],
        [1e-30] * 2, [1e-3] * 2, [1.0] * 2, "nearest", [1, 2], [3, 3], torch.zeros(1), None))
    a = _adalomo_args((5, 9))
    ws = torch.zeros(ops.workspace_numel("adalomo_update_", [(5, 9)], backend="torch"))
    torch.library.opcheck(torch.ops.lomo_kernels.adalomo_update_, a + (None, ws, 0, 0, 0))


def test_workspace_and_grad_sq_are_checked():
    p, g = torch.randn(5, 7), torch.randn(5, 7)
    row, col = torch.zeros(5), torch.zeros(7)
    kw = dict(exp_avg_sq_row=row, exp_avg_sq_col=col, lr=0.1, beta=0.0, backend="torch")
    with pytest.raises(ValueError, match="workspace has 3 elements, needs"):
        ops.adalomo_update_(p, g, workspace=torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="workspace must be a contiguous 1-d float32"):
        ops.adalomo_update_(p, g, workspace=torch.zeros(100, dtype=torch.float64), **kw)
    with pytest.raises(ValueError, match="stage 2 needs a workspace"):
        ops.adalomo_update_(p, g, stage=2, **kw)
    with pytest.raises(ValueError, match="stage must be"):
        ops.adalomo_update_(p, g, stage=4, workspace=torch.zeros(1000), **kw)
    with pytest.raises(ValueError, match="grad_sq must be a 1-element float32"):
        ops.lomo_update_(p, g, lr=0.1, grad_sq=torch.zeros(2), backend="torch")
    p0 = p.clone()
    acc = torch.zeros(1)
    ws = torch.zeros(ops.workspace_numel("adalomo_update_", [p.shape], backend="torch"))
    ops.adalomo_update_(p, g, workspace=ws, grad_sq=acc, **kw)
    assert not torch.equal(p, p0)
    torch.testing.assert_close(acc, (g.double() ** 2).sum().float().view(1))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_multi_entry_points_equal_single_calls(backend):
    if backend == "native" and not ops.available_backends()["native"].startswith("loaded"):
        pytest.skip("native backend not built")
    shapes = [(7,), (33,), ()]
    ps = [torch.randn(s).bfloat16() for s in shapes]
    gs = [torch.randn(s).bfloat16() for s in shapes]
    vs = [torch.rand(s) + 0.1 for s in shapes]
    one, v1 = [p.clone() for p in ps], [v.clone() for v in vs]
    for i, (p, g, v) in enumerate(zip(one, gs, v1)):
        ops.adalomo_update_(p, g, exp_avg_sq=v, lr=0.1 * (i + 1), beta=0.4, seed=i, step=3,
                            rounding="stochastic", backend=backend)
    many, v2 = [p.clone() for p in ps], [v.clone() for v in vs]
    ops.adalomo_update_multi_(many, gs, v2, lr=[0.1, 0.2, 0.3], beta=0.4, seed=[0, 1, 2], step=3,
                              rounding="stochastic", backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(one + v1, many + v2))
    with pytest.raises(ValueError, match="lr has 2 values for 3 tensors"):
        ops.lomo_update_multi_(many, gs, lr=[0.1, 0.2], backend=backend)
    with pytest.raises(ValueError, match="0-d and 1-d tensors only"):
        ops.adalomo_update_multi_([torch.zeros(2, 2)], [torch.zeros(2, 2)], [torch.zeros(2)],
                                  lr=0.1, beta=0.0, backend=backend)


def test_a_stale_native_build_is_refused_not_fatal():
    # ops.py compares the extension's contract version before registering any kernel
    assert ops.CONTRACT_VERSION >= 2
    if ops.available_backends()["native"].startswith("loaded"):
        assert ops._native.contract_version() == ops.CONTRACT_VERSION
