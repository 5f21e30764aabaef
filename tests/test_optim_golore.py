"""GoLore / GaLore, the optimizer: the back-projection against float64, projector refreshes and
the moment transfer, reproducible random projections, the SVD refresh (accuracy and its bounded
float32 working set), a whole low-rank run against a float64 GaLore, full-rank parameters
against torch.optim, resume across a refresh, bad input and non-finite gradients."""

import io
import warnings

import pytest
import torch
from conftest import ulp_distance

from lomo_kernels import GaLore, GoLore, NonFiniteGradientWarning
from lomo_kernels.memory import AllocationTracker
from lomo_kernels.optim import projector as proj
from lomo_kernels.reference import f32


pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


class Linear(torch.nn.Module):
    """W (m x n) with the loss <C, W>: its gradient is exactly C (chosen per step)."""

    def __init__(self, m, n, dtype=torch.float32, seed=0, bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(_rand((m, n), seed, dtype=dtype))
        self.bias = torch.nn.Parameter(_rand((m,), seed + 1, dtype=dtype)) if bias else None

    def loss(self, c, cb=None):
        out = (self.weight * c.to(self.weight.dtype)).sum()
        if self.bias is not None:
            out = out + (self.bias * cb.to(self.bias.dtype)).sum()
        return out


def _grads(m, n, steps, seed=100, scale=1e-2):
    return [_rand((m, n), seed + i, scale) for i in range(steps)]


# ---------------------------------------------------------------- back-projection vs float64


def _f64_step(w0, g, p, side, h, st=None):
    """One inner step and back-projection in float64 from the projector ``p`` that was used."""
    g, p = g.double(), p.double()
    r = p.T @ g if side == "left" else g @ p
    b1, b2 = h["betas"]
    t = h["step"]
    if h["inner"] == "adamw":
        m = (1 - b1) * r if st is None else b1 * st["exp_avg"].double() + (1 - b1) * r
        v = (1 - b2) * r * r if st is None else b2 * st["exp_avg_sq"].double() + (1 - b2) * r * r
        n = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + h["eps"])
    else:
        n = r
    back = p @ n if side == "left" else n @ p.T
    back_size = p.abs() @ n.abs() if side == "left" else n.abs() @ p.abs().T
    decay = f32(1 - h["lr"] * h["wd"])
    upd, upd_size = h["lr"] * h["scale"] * back, h["lr"] * h["scale"] * back_size
    return w0.double() * decay - upd, (w0.double() * decay).abs() + upd_size, upd_size


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 129), (129, 37), (256, 1024)], ids=str)
def test_back_projection_matches_float64(shape, dtype, wd, rounding):
    # Both application paths: addmm_ into W (wd = 0, nearest) and the gradient buffer + fused
    # LOMO kernel (wd > 0 or stochastic rounding).
    if rounding == "stochastic" and dtype == torch.float32:
        with pytest.raises(ValueError, match="rounding='stochastic' applies to float16/bfloat16"):
            GoLore(Linear(*shape, dtype), rounding=rounding)
        return
    m, n = shape
    h = dict(lr=0.05, wd=wd, scale=0.5, inner="adamw", betas=(0.9, 0.999), eps=1e-8, step=1)
    model = Linear(m, n, dtype)
    w0 = model.weight.detach().clone()
    opt = GoLore(model, lr=h["lr"], rank=8, scale=h["scale"], weight_decay=wd, rounding=rounding)
    c = _grads(m, n, 1)[0]
    model.loss(c).backward()
    opt.step()
    st = opt.state[model.weight]
    side = proj.side_of(m, n)
    # the gradient the optimizer saw was C rounded to the weight's dtype
    want, size, upd = _f64_step(w0, c.to(dtype), st["projector"], side, h)
    got = model.weight.detach()
    if dtype == torch.float32:
        assert ((got.double() - want).abs() <= 1e-5 * size).all()
    elif rounding == "nearest":
        # one rounding to the weight's dtype; the GEMM reads P and N rounded to it (2**-8 of
        # the size of the update's terms, not of W)
        near = (got.double() - want).abs() <= 2.0**-7 * upd
        assert ((ulp_distance(got, want.to(dtype)) <= 1) | near).all()
    else:  # stochastic: within one ulp either way, and unbiased on average
        assert ((ulp_distance(got, want.to(dtype)) <= 1) | ((got.double() - want).abs() <=
                                                            2.0**-7 * upd)).all()
        err = (got.double() - want).mean() / upd.mean()
        assert abs(err) < 0.05


def test_update_allocates_no_weight_sized_temporary(monkeypatch):
    """Every tensor created during a low-rank update (SVD refresh included) is far below the
    weight's size except the gradient itself, for both application paths and a bf16 weight
    (whose float32 copy would be twice the gradient). On the CPU the GEMMs upcast the gradient
    in panels of BLOCK_BYTES (set small here); on CUDA they read it as it is."""
    monkeypatch.setattr(proj, "BLOCK_BYTES", 64 << 10)
    m, n, r = 512, 1536, 16
    for wd, rounding in ((0.0, "nearest"), (0.1, "stochastic")):
        model = Linear(m, n, torch.bfloat16)
        opt = GoLore(model, rank=r, weight_decay=wd, rounding=rounding, update_proj_gap=2,
                     projection="svd")
        for i, c in enumerate(_grads(m, n, 3)):
            loss = model.loss(c)
            with AllocationTracker() as tr:
                loss.backward()
                opt.step()
            sizes = sorted(tr.sizes)
            assert sizes[-1] == m * n * 2, (i, sizes[-3:])  # the gradient
            assert sizes[-2] <= 2 * n * r * 4, (i, sizes[-3:])  # panels, R-sized tensors


# ---------------------------------------------------------------- the SVD refresh


def _spectrum_matrix(m, n, seed, decay=0.85, dtype=torch.float32):
    """A matrix with singular values decay**i (a gradient-like, fast-decaying spectrum)."""
    u = proj._orth(_rand((m, min(m, n)), seed))
    v = proj._orth(_rand((n, min(m, n)), seed + 1))
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return ((u * s) @ v.T).to(dtype)


def _sin_angle(p, u):
    """Sine of the largest principal angle between the column spaces of p and the orthonormal u:
    the spectral norm of (I - u u^T) p, in float64 (1 - cos^2 would lose half the digits)."""
    p, u = p.double(), u.double()
    p = torch.linalg.qr(p)[0]
    return torch.linalg.matrix_norm(p - u @ (u.T @ p), ord=2).item()


@pytest.mark.parametrize("decay,tol", [(0.85, 2e-3), (0.5, 2e-5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_projector_finds_the_top_singular_subspace(side, dtype, decay, tol):
    # Subspace iteration converges like (s_{k+1} / s_r) ** (2 * power_iters + 1): with
    # s_i = decay**i, r = 8, k = 16 that is 0.23**5 = 6e-4 for decay 0.85 and 1e-14 for 0.5
    # (then float32 rounding, and bf16 for a bf16 gradient read by the GEMMs, dominate).
    (m, n), r = ((96, 300) if side == "left" else (300, 96)), 8
    g = _spectrum_matrix(m, n, 3, decay=decay, dtype=dtype)
    p = proj.svd_projector(g, r, side, key=7)
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    exact = u[:, :r] if side == "left" else vh[:r].T
    assert p.shape == exact.shape and p.dtype == torch.float32
    torch.testing.assert_close(p.T @ p, torch.eye(r), atol=1e-5, rtol=0)
    assert _sin_angle(p, exact) < (tol if dtype == torch.float32 else max(tol, 2e-3))


def test_svd_projector_is_exact_when_the_sketch_covers_the_projected_side():
    g = _rand((10, 10), 5)
    p = proj.svd_projector(g, 4, "right", key=1)  # k = 2r = 8 < 10: iterated
    u, s, vh = torch.linalg.svd(g.double())
    assert _sin_angle(p, vh[:4].T) < 1e-3
    p = proj.svd_projector(g, 6, "right", key=1)  # k = min(10, 12) = 10: exact
    assert _sin_angle(p, vh[:6].T) < 1e-5


class _OneRank:
    """``svd_projector_sharded``'s layout and collectives for a single rank holding every row."""

    def __init__(self, m):
        self.total, self.start = m, 0

    def sum_(self, t):
        return t

    def gather_rows(self, t):
        return t

    def stack(self, t):
        return t


@pytest.mark.parametrize("shape,r", [((40, 96), 8), ((96, 40), 8), ((12, 40), 6), ((40, 12), 6)])
def test_sharded_svd_on_one_rank_is_the_single_process_method(shape, r):
    """The sharded refresh is the same algorithm: on one rank it gives the single-process
    projector to float32 rounding, signs included (k = 2r iterates; k >= d is exact)."""
    g = _spectrum_matrix(*shape, 4, decay=0.7)
    for side in ("left", "right"):
        want = proj.svd_projector(g, r, side, key=5)
        got = proj.svd_projector_sharded(g, r, side, 5, _OneRank(shape[0]))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_svd_vector_signs_do_not_depend_on_the_r_factor_signs():
    """The R factor of a QR is unique up to the signs of its rows, which differ between the
    single-process and the sharded TSQR: the projector's columns do not."""
    q = proj._orth(_rand((30, 8), 1))
    rr = torch.linalg.qr(_rand((50, 8), 2), mode="r")[1]
    flip = torch.tensor([1.0, -1, -1, 1, -1, 1, 1, -1])[:, None]
    torch.testing.assert_close(proj._top_vectors(q, flip * rr, 4), proj._top_vectors(q, rr, 4),
                               atol=1e-6, rtol=0)


def test_svd_refresh_working_set_is_bounded():
    """No float32 copy of the gradient: the refresh's tensors stay below the bound the README
    states, (3 d k + 2 k^2) * 4 bytes + BLOCK_BYTES * (1 + 2 k / d) (a panel of the gradient
    upcast on the CPU, two panels of M^T Q), d the projected side, k = 2r."""
    m, n, r = 256, 4096, 8
    g = _spectrum_matrix(m, n, 1, dtype=torch.bfloat16)
    old = proj.BLOCK_BYTES
    proj.BLOCK_BYTES = 1 << 18  # small panels, so the bound is far below m*n*4
    try:
        with AllocationTracker() as tr:
            proj.svd_projector(g, r, "left", key=3)
    finally:
        proj.BLOCK_BYTES = old
    d, k, block = m, 2 * r, 1 << 18
    bound = (3 * d * k + 2 * k * k) * 4 + block * (1 + 2 * k / d) + 4 * k * k * 8 + (16 << 10)
    assert tr.peak <= bound < m * n * 4 // 8, (tr.peak, bound)


def test_projection_reads_the_gradient_in_blocks():
    g = _rand((300, 2000), 9, dtype=torch.bfloat16)
    p = proj._orth(_rand((300, 8), 1))
    old = proj.BLOCK_BYTES
    proj.BLOCK_BYTES = 1 << 16
    try:
        with AllocationTracker() as tr:
            r = proj.project(g, p, "left")
        r2 = proj.project(g.T.contiguous(), p, "right")
    finally:
        proj.BLOCK_BYTES = old
    want = p.double().T @ g.double()
    torch.testing.assert_close(r.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r2.double(), want.T, rtol=1e-5, atol=1e-5)
    assert tr.largest <= max((1 << 16) + 300 * 4, r.numel() * 4)


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_back_projection_product_in_row_blocks(monkeypatch, beta, dtype):
    """``back_into_``: out = beta out + alpha A B with float32 accumulation and one rounding to
    out's dtype, made by row blocks on the CPU (several here, a short last one); beta = 0 does
    not read out (a NaN there stays out of the result), as ``addmm_``."""
    monkeypatch.setattr(proj, "BLOCK_BYTES", 7 * 301 * 4)
    m, n, r, alpha = 45, 301, 8, -0.37
    a, b = _rand((m, r), 3, dtype=dtype), _rand((r, n), 4, dtype=dtype)
    out = _rand((m, n), 5, dtype=dtype)
    if beta == 0.0:
        out[3, 7] = float("nan")
    want = alpha * (a.double() @ b.double()) + (beta * out.double() if beta else 0.0)
    got = proj.back_into_(out, a, b, alpha=alpha, beta=beta)
    assert got is out and got.dtype == dtype
    # one rounding of a float32 result: within one ulp of the float64 value's rounding
    assert (ulp_distance(got, want.to(dtype)) <= 1).all()


# ---------------------------------------------------------------- random projections


def test_random_projection_is_uniform_stiefel_and_keyed():
    d, r = 12, 3
    key = proj.projection_key(5, 2, proj.STREAM_STIEFEL)
    p = proj.random_projector(d, r, key, "cpu")
    assert torch.equal(p, proj.random_projector(d, r, key, "cpu"))  # reproducible
    torch.testing.assert_close(p.T @ p, torch.eye(r), atol=1e-6, rtol=0)
    # the sign convention: P = Q sign(diag(R)) makes P^T Z upper triangular with a positive diagonal
    z = torch.randn(d, r, generator=torch.Generator().manual_seed(key))
    assert (torch.diagonal(p.T @ z) > 0).all()
    torch.testing.assert_close(torch.triu(p.T @ z), p.T @ z, atol=1e-5, rtol=0)
    # Haar: E[P] = 0 and E[P P^T] = (r/d) I over many keys (standard errors ~ 1/sqrt(2000))
    ps = torch.stack([proj.random_projector(d, r, proj.projection_key(1, i, 1), "cpu")
                      for i in range(2000)])
    assert ps.mean(0).abs().max() < 0.03
    torch.testing.assert_close((ps @ ps.transpose(1, 2)).mean(0), torch.eye(d) * r / d,
                               atol=0.03, rtol=0)
    keys = {proj.projection_key(s, i, st) for s in range(3) for i in range(50) for st in (1, 2)}
    assert len(keys) == 300


def test_optimizer_projections_are_keyed_by_seed_parameter_and_refresh():
    def run(seed):
        model = torch.nn.ModuleList([Linear(6, 20, seed=0), Linear(6, 20, seed=1)])
        opt = GoLore(model, rank=2, update_proj_gap=2, seed=seed)
        ps = []
        for c in _grads(6, 20, 4):
            (model[0].loss(c) + model[1].loss(c)).backward()
            opt.step()
            ps.append([opt.state[lin.weight]["projector"].clone() for lin in model])
        return opt, ps

    opt, a = run(3)
    _, b = run(3)
    _, c = run(4)
    assert all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[0][1])  # parameters draw different frames
    assert torch.equal(a[0][0], a[1][0]) and not torch.equal(a[1][0], a[2][0])  # gap 2
    # the documented key: (the optimizer's per-parameter seed, refresh index)
    w = opt.param_groups[0]["params"][1]
    key = proj.projection_key(opt._param_seed(w), 1, proj.STREAM_STIEFEL)
    assert torch.equal(a[2][1], proj.random_projector(6, 2, key, "cpu"))
    assert opt.state[w]["refreshes"] == 2 and opt.state[w]["next_refresh"] == 4


# ---------------------------------------------------------------- refresh and moment transfer


@pytest.mark.parametrize("inner,momentum", [("adamw", 0.0), ("sgd", 0.9)])
@pytest.mark.parametrize("shape", [(8, 30), (30, 8)], ids=str)
def test_refresh_transfers_the_first_moment_and_keeps_the_second(shape, inner, momentum):
    m, n = shape
    side = proj.side_of(m, n)
    model = Linear(m, n)
    opt = GoLore(model, rank=3, update_proj_gap=3, inner=inner, momentum=momentum, lr=0.01)
    cs = _grads(m, n, 4)
    for c in cs[:3]:
        model.loss(c).backward()
        opt.step()
    st = opt.state[model.weight]
    before = {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
    model.loss(cs[3]).backward()  # 0-based update 3: a refresh
    opt.step()
    p_old, p_new = before["projector"], st["projector"]
    assert not torch.equal(p_old, p_new) and st["refreshes"] == 2
    tr = p_new.T @ p_old
    r = (p_new.T @ cs[3]) if side == "left" else cs[3] @ p_new
    if inner == "adamw":
        m_old = tr @ before["exp_avg"] if side == "left" else before["exp_avg"] @ tr.T
        torch.testing.assert_close(st["exp_avg"], 0.9 * m_old + 0.1 * r, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(st["exp_avg_sq"], 0.999 * before["exp_avg_sq"] + 0.001 * r * r,
                                   rtol=1e-5, atol=1e-12)
    else:
        b0 = before["momentum_buffer"]
        b_old = tr @ b0 if side == "left" else b0 @ tr.T
        torch.testing.assert_close(st["momentum_buffer"], 0.9 * b_old + r, rtol=1e-5, atol=1e-8)


def test_svd_steps_then_random():
    model = Linear(6, 24)
    opt = GoLore(model, rank=2, update_proj_gap=2, svd_steps=3, projection="random")
    cs = _grads(6, 24, 6)
    seed = opt._param_seed(model.weight)
    for i, c in enumerate(cs):
        model.loss(c).backward()
        opt.step()
        p = opt.state[model.weight]["projector"]
        if i == 2:  # refresh 1 at update 2 < svd_steps: SVD of that gradient
            key = proj.projection_key(seed, 1, proj.STREAM_SKETCH)
            want = proj.svd_projector(c, 2, "left", key)
            assert torch.equal(p, want)
        if i == 4:  # refresh 2 at update 4 >= svd_steps: random
            want = proj.random_projector(6, 2, proj.projection_key(seed, 2, proj.STREAM_STIEFEL),
                                         "cpu")
            assert torch.equal(p, want)


# ---------------------------------------------------------------- a whole run vs float64 GaLore


def _galore64(w, grads, r, gap, h):
    """GaLore in float64 with exact SVD projectors: the algorithm of docs/spec.md."""
    w = w.double().clone()
    m, n = w.shape
    side = proj.side_of(m, n)
    p = mom = v = None
    b1, b2 = h["betas"]
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new = u[:, :r] if side == "left" else vh[:r].T
            if p is not None:
                mom = new.T @ p @ mom if side == "left" else mom @ (p.T @ new)
            p = new
        rr = p.T @ g if side == "left" else g @ p
        mom = (1 - b1) * rr if mom is None else b1 * mom + (1 - b1) * rr
        v = (1 - b2) * rr * rr if v is None else b2 * v + (1 - b2) * rr * rr
        nn = (mom / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + h["eps"])
        back = p @ nn if side == "left" else nn @ p.T
        w = w * (1 - h["lr"] * h["wd"]) - h["lr"] * h["scale"] * back
    return w


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=str)
def test_galore_run_matches_float64(shape, wd):
    m, n = shape
    h = dict(lr=0.02, wd=wd, scale=0.5, betas=(0.9, 0.99), eps=1e-8)
    model = Linear(m, n)
    w0 = model.weight.detach().clone()
    # rank 6, k = 12 = the projected side: the SVD refresh is exact
    opt = GaLore(model, lr=h["lr"], rank=6, update_proj_gap=3, scale=h["scale"], weight_decay=wd,
                 betas=h["betas"], eps=h["eps"])
    grads = [_spectrum_matrix(m, n, 50 + i, decay=0.6) for i in range(8)]
    for c in grads:
        model.loss(c).backward()
        opt.step()
    want = _galore64(w0, grads, 6, 3, h)
    torch.testing.assert_close(model.weight.detach().double(), want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------- full-rank parameters


def _against_torch(make_model, ours, theirs, steps, tol):
    """Train two copies of a model, one with GoLore, one with a torch.optim optimizer."""
    torch.manual_seed(0)
    a, b = make_model(), make_model()
    b.load_state_dict(a.state_dict())
    opt, ref = ours(a), theirs(b)
    for i in range(steps):
        x = _rand((6, a[0].in_features), i)
        a(x).square().mean().backward()
        opt.step()
        b(x).square().mean().backward()
        ref.step()
        ref.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **tol)
    return opt, a


def test_full_rank_parameters_match_torch_adamw():
    # rank >= min(m, n) for every weight: the inner optimizer at full rank, scale 1
    opt, model = _against_torch(
        lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7),
                                    torch.nn.Linear(7, 3)),
        lambda m: GoLore(m, lr=1e-2, rank=8, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95),
                                    eps=1e-6),
        5, dict(rtol=1e-5, atol=1e-6))
    assert all("projector" not in opt.state[p] for p in model.parameters())


def test_full_rank_sgd_momentum_matches_torch_sgd():
    _against_torch(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)),
                   lambda m: GoLore(m, lr=0.1, rank=3, inner="sgd", momentum=0.9),
                   lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                   4, dict(rtol=1e-6, atol=1e-7))


def test_exclude_by_name_pattern_and_parameter():
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 40),
                                torch.nn.Linear(40, 16))
    opt = GoLore(model, rank=4, exclude=["0.*", model[2].weight])
    assert [g["low_rank"] for g in opt.param_groups] == [True, False]
    assert set(opt.param_groups[1]["params"]) == {model[0].weight, model[2].weight}
    model[2](model[1](model[0](torch.tensor([1, 2, 3])))).sum().backward()
    opt.step()
    assert "projector" in opt.state[model[1].weight]
    assert opt.state[model[0].weight]["exp_avg"].shape == (50, 16)
    assert "projector" not in opt.state[model[2].weight]
    with pytest.warns(UserWarning, match="match no parameter"):
        GoLore(torch.nn.Linear(3, 3), exclude=["nope*"])
    with pytest.raises(ValueError, match="exclude by name needs an nn.Module"):
        GoLore(list(model.parameters()), exclude=["0.weight"])


# ---------------------------------------------------------------- paths and schedules


@pytest.mark.parametrize("projection", ["random", "svd"])
def test_plain_backward_equals_fused_backward(projection):
    a, b = Linear(9, 33, seed=1, bias=True), Linear(9, 33, seed=1, bias=True)
    oa = GoLore(a, lr=0.01, rank=3, update_proj_gap=2, projection=projection)
    ob = GoLore(b, lr=0.01, rank=3, update_proj_gap=2, projection=projection)
    for i, c in enumerate(_grads(9, 33, 5)):
        cb = _rand((9,), 200 + i)
        oa.fused_backward(a.loss(c, cb), 0.01)
        b.loss(c, cb).backward()
        ob.step()
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def _backends():
    import os

    from lomo_kernels import ops

    out = ["torch"]
    if ops.available_backends()["native"].startswith("loaded"):
        out.append("native")
    if os.environ.get("TRITON_INTERPRET") == "1" and ops.available_backends()["triton"] == "loaded":
        out.append("triton")
    if ops.available_backends()["cuda_emulated"].startswith("loaded"):
        out.append("cuda_emulated")  # the CUDA kernels in the SIMT emulation
    return out


@pytest.mark.parametrize("rounding,wd", [("nearest", 0.0), ("stochastic", 0.1)])
def test_every_backend_trains_the_same(rounding, wd):
    """The optimizer on every backend (inner update and, for the second path, the LOMO kernel)
    against the reference backend after three steps of bf16 weights: native (CPU, and CUDA in the
    emulation) bitwise, Triton within an ulp per step (the interpreter rounds some bf16 stores
    differently)."""
    results = {}
    for backend in _backends():
        model = torch.nn.ModuleList([Linear(9, 33, torch.bfloat16, seed=1, bias=True),
                                     Linear(40, 12, torch.bfloat16, seed=2)])
        opt = GoLore(model, lr=0.05, rank=3, update_proj_gap=2, weight_decay=wd,
                     rounding=rounding, backend=backend)
        for i in range(3):
            loss = model[0].loss(_rand((9, 33), 60 + i), _rand((9,), 70 + i))
            (loss + model[1].loss(_rand((40, 12), 80 + i))).backward()
            opt.step()
        results[backend] = [p.detach().clone() for p in model.parameters()]
    for backend, params in results.items():
        for a, b in zip(params, results["torch"]):
            assert (ulp_distance(a, b) <= (3 if backend == "triton" else 0)).all(), backend


def test_lr_scheduler_drives_the_learning_rate():
    a, b = Linear(9, 33, seed=1), Linear(9, 33, seed=1)
    oa = GoLore(a, lr=0.1, rank=3)
    ob = GoLore(b, lr=0.1, rank=3)
    sched = torch.optim.lr_scheduler.StepLR(oa, step_size=1, gamma=0.5)
    for i, c in enumerate(_grads(9, 33, 4)):
        a.loss(c).backward()
        oa.step()
        sched.step()
        ob.fused_backward(b.loss(c), 0.1 * 0.5**i)
        assert torch.equal(a.weight, b.weight)


def test_clip_grad_norm_scales_the_update():
    a, b = Linear(9, 33, seed=1), Linear(9, 33, seed=1)
    oa = GoLore(a, lr=0.1, rank=3, inner="sgd", clip_grad_norm=0.01)
    ob = GoLore(b, lr=0.1, rank=3, inner="sgd")
    c = _grads(9, 33, 1, scale=1.0)[0]
    norm = oa.grad_norm(a.loss(c))
    torch.testing.assert_close(norm, c.norm())
    oa.fused_backward(a.loss(c), 0.1)
    ob.fused_backward(b.loss(c * (0.01 / (c.norm() + 1e-6))), 0.1)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    # exact clipping without grad_norm(loss) is refused (tests/test_optim_clipping.py)
    oc = GoLore(Linear(3, 7), rank=2, clip_grad_norm=1.0)
    with pytest.raises(ValueError, match="plain loss.backward\\(\\) cannot do global-norm"):
        oc.param_groups[0]["params"][0].sum().backward()


@pytest.mark.parametrize("dtype,wd,rounding", [
    (torch.float32, 0.0, "nearest"), (torch.float32, 0.1, "nearest"),
    (torch.bfloat16, 0.0, "stochastic")])
def test_last_grad_norm_is_the_gradients_whatever_the_application_path(dtype, wd, rounding):
    """The norm is of the gradient, also where the back-projected update is written into the
    gradient's buffer (weight decay, stochastic rounding) before the fused LOMO apply."""
    model = torch.nn.ModuleList([Linear(9, 33, dtype, seed=1, bias=True), Linear(40, 6, dtype)])
    opt = GoLore(model, lr=0.1, rank=3, weight_decay=wd, rounding=rounding)
    for i in range(2):
        c1, cb, c2 = _rand((9, 33), 10 + i), _rand((9,), 20 + i), _rand((40, 6), 30 + i)
        opt.fused_backward(model[0].loss(c1, cb) + model[1].loss(c2))
        want = torch.cat([c.to(dtype).float().flatten() for c in (c1, cb, c2)]).norm()
        torch.testing.assert_close(opt.last_grad_norm, want, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("projection,inner,momentum,dtype,rounding", [
    ("random", "adamw", 0.0, torch.float32, "nearest"),
    ("svd", "sgd", 0.9, torch.float32, "nearest"),
    ("random", "adamw", 0.0, torch.bfloat16, "stochastic"),
])
def test_state_dict_resume_is_bitwise_identical_across_a_refresh(projection, inner, momentum,
                                                                 dtype, rounding):
    kw = dict(rank=3, update_proj_gap=3, projection=projection, inner=inner, momentum=momentum,
              weight_decay=0.01, rounding=rounding)

    def make(seed):
        model = torch.nn.ModuleList([Linear(8, 30, dtype, seed=1, bias=True), Linear(30, 8, dtype)])
        return model, GoLore(model, lr=0.02, seed=seed, **kw)

    def train(model, opt, sched, steps):
        for i in steps:
            c1, c2 = _rand((8, 30), 300 + i), _rand((30, 8), 400 + i)
            loss = model[0].loss(c1, _rand((8,), 500 + i)) + model[1].loss(c2)
            loss.backward()
            opt.step()
            sched.step()

    model, opt = make(7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    train(model, opt, sched, range(2))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               buf)
    train(model, opt, sched, range(2, 7))  # refreshes at updates 3 and 6

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2 = make(99)  # the seed comes from the checkpoint
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for p in model2.parameters():
        for k, v in opt2.state[p].items():
            if torch.is_tensor(v):
                assert v.dtype == torch.float32, k
    train(model2, opt2, sched2, range(2, 7))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    w = model[0].weight
    assert opt.state[w]["refreshes"] == opt2.state[model2[0].weight]["refreshes"] == 3


def test_loading_restores_the_saved_options_and_refuses_a_mismatched_state():
    model = Linear(8, 30)
    opt = GoLore(model, rank=3)
    model.loss(_rand((8, 30), 1)).backward()
    opt.step()
    sd = opt.state_dict()
    other = GoLore(Linear(8, 30), rank=3, inner="sgd", momentum=0.9)
    other.load_state_dict(sd)  # torch semantics: the groups' options come from the checkpoint
    assert other.param_groups[0]["inner"] == "adamw"
    del sd["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match="does not match this optimizer's options"):
        GoLore(Linear(8, 30), rank=3).load_state_dict(sd)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=-3), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(projection="qr"), "projection must be one of"),
    (dict(inner="adam"), "inner must be one of"),
    (dict(update_proj_gap=0), "update_proj_gap must be an integer >= 1"),
    (dict(svd_steps=-1), "svd_steps must be an integer >= 0"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be a number in \[0, 1\)"),
    (dict(betas=0.9), r"betas must be a pair"),
    (dict(momentum=1.0), r"momentum must be a finite number in \[0, 1\)"),
    (dict(lr=-1.0), "lr must be a finite number >= 0"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    (dict(eps=-1e-8), "eps must be a finite number >= 0"),
    (dict(scale=float("inf")), "scale must be a finite number"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(rounding="up"), "rounding must be one of"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        GoLore(Linear(4, 9), **kwargs)


def test_bad_param_group_registers_nothing():
    model = Linear(4, 9)
    opt = GoLore([model.weight], rank=2)
    extra = torch.nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"inner'\] must be one of"):
        opt.add_param_group({"params": [extra], "inner": "lion"})
    assert len(opt.param_groups) == 1 and extra not in opt._where
    extra.sum().backward()
    assert extra.grad is not None  # no hook took it


# ---------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("wd,rounding,dtype", [
    (0.0, "nearest", torch.float32), (0.1, "nearest", torch.bfloat16),
    (0.0, "stochastic", torch.bfloat16),
])
@pytest.mark.parametrize("projection", ["random", "svd"])
def test_non_finite_gradient_leaves_weight_and_state_untouched(projection, wd, rounding, dtype):
    model = Linear(8, 30, dtype, bias=True)
    # svd: a refresh is due at every update, so the bad one postpones it; random: none is due
    gap = 1 if projection == "svd" else 2
    opt = GoLore(model, rank=3, update_proj_gap=gap, projection=projection, weight_decay=wd,
                 rounding=rounding, lr=0.05)
    cs = _grads(8, 30, 3)
    model.loss(cs[0], _rand((8,), 1)).backward()
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in model.parameters()}
    bad = cs[1].clone()
    bad[3, 4] = float("inf")
    with pytest.warns(NonFiniteGradientWarning):
        model.loss(bad, torch.full((8,), float("nan"))).backward()
    opt.step()
    for p, p0 in zip(model.parameters(), params):
        assert torch.equal(p, p0)
        st, st0 = opt.state[p], state[id(p)]
        for k in ("exp_avg", "exp_avg_sq", "projector"):
            if k in st:
                assert torch.equal(st[k], st0[k]), k
        assert st["step"] == st0["step"] + 1  # the update is counted, as AdaLomo does
    w = model.weight
    assert opt.state[w]["refreshes"] == 1 and opt.state[w]["next_refresh"] == gap
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.loss(cs[2], _rand((8,), 2)).backward()  # training goes on
    opt.step()
    assert not torch.equal(model.weight, params[0])
    assert opt.state[w]["refreshes"] == 2


def test_non_finite_first_gradient_before_any_svd_projector():
    model = Linear(8, 30)
    opt = GaLore(model, rank=3)
    w0 = model.weight.detach().clone()
    c = _grads(8, 30, 1)[0]
    c[0, 0] = float("nan")
    with pytest.warns(NonFiniteGradientWarning):
        model.loss(c).backward()
    opt.step()
    assert torch.equal(model.weight, w0)
    assert opt.state[model.weight]["projector"] is None
    model.loss(_grads(8, 30, 1, seed=5)[0]).backward()
    opt.step()
    assert opt.state[model.weight]["refreshes"] == 1


def test_galore_is_golore_with_svd():
    opt = GaLore(Linear(4, 9), rank=2, lr=0.1)
    assert isinstance(opt, GoLore) and opt.param_groups[0]["projection"] == "svd"
    assert opt.param_groups[0]["lr"] == 0.1
