"""bench/norm_accuracy.py's pieces on a small matrix (the script itself runs on SmolLM2-135M's
embedding): its float64 step is the oracle's, and each library's step it runs moves the parameter
by that step (where float32 sums are still accurate)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_native
from oracle import EPS1, EPS2, adalomo_state, f64_adalomo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import norm_accuracy as na  # noqa: E402

SHAPE = (67, 45)


def _data(clipped: bool):
    """A gradient whose update RMS is above clip_threshold (scales varying over rows), or below
    it (large rows and large columns, small where they cross), as the embedding's is."""
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(SHAPE, generator=gen) * 0.02
    g = torch.randn(SHAPE, generator=gen) * 1e-3
    if clipped:
        g *= torch.rand(SHAPE[0], 1, generator=gen) + 0.1
    else:
        g[:10] *= 30
        g[:, :10] *= 30
        g[:10, :10] /= 900
    return p, g


BOTH = pytest.mark.parametrize("clipped", [True, False], ids=["clipped", "not-clipped"])


@BOTH
def test_float64_step_is_the_oracles_first_step(clipped):
    assert (na.EPS, na.THRESHOLD) == ((EPS1, EPS2), 1.0)
    p, g = _data(clipped)
    want = f64_adalomo(p, g, adalomo_state(SHAPE, zeros=True),
                       dict(lr=na.LR, wd=0.0, ls=1.0, cgv=0.0, coef=None, beta=0.0, thr=1.0))
    got = na.float64_step(p, g)
    # the oracle's update is p + d - p: float64 rounding of p, about 1e-13 of d
    torch.testing.assert_close(got["d"], want.p - p.double(), rtol=1e-9, atol=0)
    assert got["rms_u"] == pytest.approx(want.rms_u, rel=1e-12)
    assert (got["rms_u"] > na.THRESHOLD) == clipped


@pytest.mark.parametrize("backend", ["lomo_optim", "torch",
                                     pytest.param("native", marks=requires_native)])
@BOTH
def test_each_step_is_the_float64_step_at_a_small_size(backend, clipped):
    p, g = _data(clipped)
    d64 = na.float64_step(p, g)["d"]
    if backend == "lomo_optim":
        new = na.lomo_optim_step(p, g)
    else:
        new = na.lomo_kernels_step(backend, p, g)
    assert na.step_scale(p, new, d64) == pytest.approx(1.0, abs=1e-6)


def test_relative_error_sign_and_size():
    x = torch.full((1000,), 0.5)
    assert abs(na.relative_error(x)) < 1e-7
