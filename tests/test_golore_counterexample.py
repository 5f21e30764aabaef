"""The counterexample of He et al. 2024 (arXiv 2410.11289, Sec. 3): GaLore does not converge with
small-batch stochastic gradients, GoLore does.

n = 10, r = 4, X a 10 x 10 parameter, f(X) = 0.5 ||A X||_F^2 + <B, X> with A = [I_6, 0] (6 x 10)
and B zero except its top-left 6 x 6 block (Gaussian); the stochastic gradient adds
xi = +-sigma E (E: identity on the bottom-right 4 x 4 block, zero elsewhere; a fair sign, fresh
every step; sigma = 1) through the loss term <xi, X>. X0 = [[sigma/2 [I_6, 0]], [Gaussian 4 x 10]],
f* = -0.5 ||B_6x6||^2. Plain SGD inside (inner="sgd"), lr 3e-3, T = 100, 20,000 steps, driven
through the public API (plain backward + step()).

Once the top-left block's gradient is smaller than sigma, the SVD of the stochastic gradient
picks the noise directions (the bottom-right block, where f does not depend on X), so GaLore's
updates leave the top-left block alone and the gap stalls at order 1; random projections keep
moving it, and GoLore converges like full-parameter SGD.

Several seeds run at once: every problem is its own 10 x 10 parameter (its own projector,
keyed by its ordinal), the three methods are three param groups of one optimizer, and one
backward of the summed loss updates them all (~5 s on one core).
"""

import pytest
import torch

from lomo_kernels import GaLore

N, R, SIGMA, LR, T, STEPS = 10, 4, 1.0, 3e-3, 100, 20_000
K = N - R  # A = [I_6, 0]
SEEDS = (0, 1, 2)


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(N, N)
    b[:K, :K] = torch.randn(K, K, generator=g) * SIGMA
    x0 = torch.zeros(N, N)
    x0[:K, :K] = SIGMA / 2 * torch.eye(K)
    x0[K:] = torch.randn(R, N, generator=g) * SIGMA
    return b, x0


def _f(x, b):
    """f(X) = 0.5 ||A X||^2 + <B, X> (A X is the top six rows of X), batched over problems."""
    return 0.5 * x[..., :K, :].square().sum((-2, -1)) + (b * x).sum((-2, -1))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_galore_stalls_while_golore_and_sgd_converge():
    n = len(SEEDS)
    problems = [_problem(s) for s in SEEDS]
    b = torch.stack([p[0] for p in problems])
    x0 = torch.stack([p[1] for p in problems])
    f_star = -0.5 * b[:, :K, :K].square().sum((-2, -1))
    xs_galore = [torch.nn.Parameter(x.clone()) for x in x0]
    xs_golore = [torch.nn.Parameter(x.clone()) for x in x0]
    x_sgd = torch.nn.Parameter(x0.clone())  # every seed's X in one (n, 10, 10) parameter
    # One optimizer, three param groups (one backward callback per step instead of three):
    # GaLore (projection="svd", the GaLore class's default), GoLore (projection="random") and
    # full-parameter SGD: a parameter whose rank >= min(m, n) is trained at full rank by the
    # inner optimizer (plain SGD: equal to torch.optim.SGD, tests/test_optim_golore.py); the
    # (n, 10, 10) stack is a 3 x 100 matrix to it, so one hook updates every seed.
    opt = GaLore([{"params": xs_galore},
                  {"params": xs_golore, "projection": "random"},
                  {"params": [x_sgd], "rank": N}],
                 lr=LR, rank=R, update_proj_gap=T, inner="sgd", scale=1.0)
    assert [g["projection"] for g in opt.param_groups] == ["svd", "random", "svd"]
    e = torch.zeros(N, N)
    e[K:, K:] = torch.eye(R)
    gen = torch.Generator().manual_seed(1234)
    signs = torch.randint(0, 2, (STEPS, 3 * n), generator=gen).float() * 2 - 1
    bb = torch.cat([b, b, b])
    c_plus, c_minus = bb + SIGMA * e, bb - SIGMA * e
    for step in range(STEPS):
        x = torch.cat([torch.stack(xs_galore), torch.stack(xs_golore), x_sgd])
        # f(X) + <xi, X> for every problem: the linear terms folded into one coefficient
        c = torch.where(signs[step, :, None, None] > 0, c_plus, c_minus)
        loss = 0.5 * x[:, :K, :].square().sum() + (c * x).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        galore_gap = _f(torch.stack(xs_galore), b) - f_star
        golore_gap = _f(torch.stack(xs_golore), b) - f_star
        sgd_gap = _f(x_sgd, b) - f_star
    assert (galore_gap > 0.1).all() and (galore_gap < 10).all(), galore_gap  # order 1: stalled
    assert (golore_gap < 0.01).all(), golore_gap
    assert (sgd_gap < 0.01).all(), sgd_gap
    assert all(opt.state[x]["refreshes"] == STEPS // T for x in xs_galore + xs_golore)
    assert "projector" not in opt.state[x_sgd]
