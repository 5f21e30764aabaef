"""What only the Triton AdaLomo kernels have: their reduction loops with tiny tiles (every loop runs
several times), one compiled variant per dtype (no recompilation, no host sync, on a GPU), and the
launcher's own argument checks. The properties every backend shares (against the reference and
float64 on every kind of parameter, stochastic rounding, non-finite gradients, determinism, the
optimizer) are in test_adalomo_update.py.

Runs in the Triton interpreter on CPU tensors when there is no GPU (conftest sets
TRITON_INTERPRET=1), and on CUDA tensors when there is one. The oracle always runs on CPU copies.
"""

import os

import pytest
import torch
import triton
from conftest import requires_cuda, requires_triton, ulp_distance
from kernel_backends import KERNELS
from oracle import EPS1, EPS2, f64_adalomo
from oracle import rand as _rand
from test_adalomo_update import HYPER, _check_nearest, _data, _run

import lomo_kernels
from lomo_kernels import ops, reference

pytestmark = [requires_triton, pytest.mark.adalomo, pytest.mark.backend_triton]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
TRITON = [pytest.param(b, id=b.id) for b in KERNELS if b.family == "triton"]
THR = 1.0


def _call(impl, p, g, st, h, device, rounding="nearest", seed=0, step=1, found=None):
    """One update with the state ``st`` updated in place (no copy, no host transfer)."""
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=device)
    impl(p, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"), coef,
         found, h["lr"], h["wd"], h["ls"], h["cgv"], h["beta"], EPS1, EPS2, h["thr"], rounding,
         seed, step)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("shape", [(4097,), (1, 300), (300, 1), (37, 129), (3, 17, 33),
                                   (3, 2, 40, 3)])
def test_adalomo_many_partials(backend, shape, monkeypatch):
    # Tiny tiles and blocks: tiles of several sub-blocks, many tiles per row and column, and every
    # reduction loop (tile partials, row and column finishers, slices, sum_parts) runs several
    # times, as on a large matrix.
    from lomo_kernels.triton_kernels import adalomo_factored, adalomo_vector
    from lomo_kernels.triton_kernels import adalomo_update as mod

    small = dict(TILE=256, BUCKETS=((128, 2, 32), (17, 4, 16), (0, 8, 4)), P_MIN=1, COL_FIN=2,
                 ROW_FIN=(2, 8), HDR_FIN=(2, 2))
    for name, value in small.items():
        monkeypatch.setattr(mod, name, value)
    for kernels in (adalomo_factored, adalomo_vector):  # sum_parts' step, read by the kernels
        monkeypatch.setattr(kernels, "PARTS", triton.language.constexpr(4))
    mod.geometry.cache_clear()
    try:
        if len(shape) >= 2:
            S, m, n, SB, BN, nsub, P, _ = mod.geometry(shape)
            assert P > S  # several tiles per slice
        h = HYPER["all_normalised"]
        p0, g, st0 = _data(shape, torch.float32, h, ("t", 11))
        out, ref = _run(backend, p0, g, st0, h, seed=0, step=1)
        want = f64_adalomo(p0, g, st0, h)
        assert want.rms_u / h["thr"] > 1.05  # the normalisation is tested
        _check_nearest(backend, out, ref, p0, want)
    finally:
        mod.geometry.cache_clear()


@requires_cuda
def test_adalomo_no_host_sync_and_no_recompile_on_cuda():
    # Scalars between passes stay on the device; lr, beta, seed and step never recompile.
    from lomo_kernels.triton_kernels import adalomo_update as mod

    kernels = [mod._stats_factored_kernel, mod._factors_kernel, mod._unorm_factored_kernel,
               mod._scalars_kernel, mod._apply_factored_kernel]

    def variants():
        return sum(len(c[0]) for k in kernels for c in k.device_caches.values())

    p = torch.randn(96, 320, device="cuda").to(torch.bfloat16)
    g = torch.randn(96, 320, device="cuda").to(torch.bfloat16)
    st = {"exp_avg_sq_row": torch.zeros(96, device="cuda"),
          "exp_avg_sq_col": torch.zeros(320, device="cuda")}
    found = torch.zeros(1, device="cuda")
    h = dict(HYPER["all_normalised"], coef=None)  # (_call would copy a clip_coef to the GPU: a sync)
    _call(mod.adalomo_update_, p, g, st, h, "cuda", "stochastic", 1, 1, found)
    n0 = variants()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, lr in [(2, 0.05), (3, 1e-3), (2**31 + 7, 0.2)]:
            h.update(lr=lr, beta=1.0 - step ** -0.8)
            _call(mod.adalomo_update_, p, g, st, h, "cuda", "stochastic", 9, step, found)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert variants() == n0
    assert found.item() == 0.0


# ---------------------------------------------------------------- the launchers


@pytest.mark.parametrize("device", DEVICES)
def test_ops_dispatches_to_triton_and_checks_arguments(device):
    impl = lomo_kernels.triton_kernels.adalomo_update_
    assert ops.get_impl("adalomo_update_", "triton", device) is impl
    p = _rand((8, 6), torch.bfloat16).to(device)
    g = _rand((8, 6), torch.bfloat16, seed=1).to(device)
    row, col = torch.ones(8, device=device), torch.ones(6, device=device)
    ref, rrow, rcol = p.cpu().clone(), row.cpu().clone(), col.cpu().clone()
    ops.adalomo_update_(p, g, exp_avg_sq_row=row, exp_avg_sq_col=col, lr=0.1, beta=0.5,
                        backend="triton")
    reference.adalomo_update_(ref, g.cpu(), rrow, rcol, None, None, None, 0.1, 0.0, 1.0, 0.0, 0.5,
                              EPS1, EPS2, THR, "nearest", 0, 0)
    assert ulp_distance(p.cpu(), ref).max().item() <= 1
    torch.testing.assert_close(row.cpu(), rrow, rtol=1e-6, atol=0)
    kw = dict(lr=0.1, beta=0.5, backend="triton")
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        ops.adalomo_update_(p, g, exp_avg_sq_row=torch.ones(7, device=device), exp_avg_sq_col=col,
                            **kw)
    with pytest.raises(ValueError, match="contiguous"):
        ops.adalomo_update_(p, g, exp_avg_sq_row=row,
                            exp_avg_sq_col=torch.ones(12, device=device)[::2], **kw)
    with pytest.raises(ValueError, match="contiguous"):
        ops.adalomo_update_(p.t(), g.t(), exp_avg_sq_row=col, exp_avg_sq_col=row, **kw)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        ops.adalomo_update_(p, g, exp_avg_sq=torch.ones(8, 6, device=device), **kw)
    with pytest.raises(TypeError, match="dtype"):
        ops.adalomo_update_(p, g.half(), exp_avg_sq_row=row, exp_avg_sq_col=col, **kw)
    # the launcher itself refuses what would read or write out of bounds
    args = (None, None, 0.1, 0.0, 1.0, 0.0, 0.5, EPS1, EPS2, THR, "nearest", 0, 1)
    with pytest.raises(ValueError, match="exp_avg_sq_row must be a float32 tensor of 8"):
        impl(p, g, torch.ones(5, device=device), col, None, *args)
    with pytest.raises(ValueError, match="exp_avg_sq_col must be a float32 tensor of 6"):
        impl(p, g, row, col.double(), None, *args)
    with pytest.raises(ValueError, match="exp_avg_sq must be a float32 tensor of 48"):
        impl(p, g, None, None, torch.ones(8, device=device), *args)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        impl(p, g.t().contiguous().t(), row, col, None, *args)
    with pytest.raises(ValueError, match="does not match"):
        impl(p, g.reshape(-1)[:40], row, col, None, *args)
