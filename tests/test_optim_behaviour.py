"""Optimizer semantics beyond lomo-optim equivalence: the plain-backward (Trainer) path, LR
schedulers, state_dict resume, bad input, non-finite gradients, fp16 loss scaling, rounding."""

import copy
import io
import warnings

import pytest
import torch
from conftest import requires_cuda

import lomo_kernels
from lomo_kernels import Lomo, AdaLomo, NonFiniteGradientWarning, LossScaleOverflowWarning


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
    ).to(dtype)


def data(n=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_plain_backward_equals_fused_backward(cls):
    m1, m2 = mlp(), mlp()
    o1 = cls(m1, lr=0.01)
    o2 = cls(m2, lr=0.01)
    for seed in range(3):
        x, y = data(seed=seed)
        o1.fused_backward(loss_of(m1, x, y), 0.01)
        loss_of(m2, x, y).backward()  # unscaled: the hooks divide by nothing
        o2.step()
        for a, b in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(a, b)
        assert all(p.grad is None for p in m2.parameters())


def test_step_is_a_no_op_and_grads_are_freed():
    m = mlp()
    opt = Lomo(m, lr=0.1)
    before = params_of(m)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    x, y = data()
    loss_of(m, x, y).backward()
    assert all(p.grad is None for p in m.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_lr_scheduler_drives_the_learning_rate():
    m = mlp()
    ref = mlp()
    opt = Lomo(m, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(4):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(0.1 * 0.5**step)
        x, y = data(seed=step)
        loss_of(ref, x, y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(p.grad, alpha=-lr)
                p.grad = None
        loss_of(m, x, y).backward()
        opt.step()
        sched.step()
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_param_groups_have_their_own_lr_and_weight_decay():
    m = mlp()
    frozen_before = m[0].weight.detach().clone()
    groups = [
        {"params": [m[3].weight, m[3].bias], "lr": 0.1, "weight_decay": 0.5},
        {"params": [m[2].weight], "lr": 0.0},
    ]
    m[0].weight.requires_grad_(False)
    opt = Lomo(groups, lr=0.05)
    ln_before = m[2].weight.detach().clone()
    w_before = m[3].weight.detach().clone()
    x, y = data()
    loss = loss_of(m, x, y)
    m_copy = copy.deepcopy(m)
    loss_of(m_copy, x, y).backward()
    loss.backward()
    opt.step()
    assert torch.equal(m[2].weight, ln_before)  # lr 0
    torch.testing.assert_close(m[3].weight, w_before * (1 - 0.1 * 0.5) - 0.1 * m_copy[3].weight.grad)
    assert torch.equal(m[0].weight, frozen_before)


def test_frozen_parameters_are_ignored():
    m = mlp()
    m[0].weight.requires_grad_(False)
    before = m[0].weight.detach().clone()
    opt = AdaLomo(m, lr=0.01)
    x, y = data()
    opt.fused_backward(loss_of(m, x, y), 0.01)
    assert torch.equal(m[0].weight, before)
    assert m[0].weight not in opt.state
    assert all(p in opt.state for p in m.parameters() if p.requires_grad)


def test_gradient_accumulation_is_refused_before_anything_changes():
    m = mlp()
    opt = AdaLomo(m, lr=0.01)
    x, y = data()
    loss_of(m, x, y).backward()
    after_first = params_of(m)
    with pytest.raises(RuntimeError, match="received a second gradient before optimizer.step()"):
        loss_of(m, x, y).backward()
    assert all(torch.equal(a, b) for a, b in zip(after_first, m.parameters()))
    opt.step()
    loss_of(m, x, y).backward()  # fine after step()
    assert not all(torch.equal(a, b) for a, b in zip(after_first, m.parameters()))


def test_fused_backward_steps_need_no_step_call():
    m = mlp()
    opt = Lomo(m, lr=0.01)
    for seed in range(3):
        x, y = data(seed=seed)
        opt.fused_backward(loss_of(m, x, y), 0.01)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize(
    "dtype,rounding",
    [(torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic")],
)
def test_state_dict_resume_is_bitwise_identical(cls, dtype, rounding):
    kw = dict(lr=0.01, clip_grad_norm=1.0, weight_decay=0.01)
    m = mlp(dtype)
    opt = cls(m, rounding=rounding, seed=5, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def train(model, o, s, steps):
        for step in steps:
            x, y = data(seed=step, dtype=dtype)
            loss = loss_of(model, x, y)
            o.grad_norm(loss)
            o.fused_backward(loss, None)
            s.step()

    train(m, opt, sched, range(3))
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    train(m, opt, sched, range(3, 6))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    m2 = mlp(dtype, seed=123)
    m2.load_state_dict(ckpt["model"])
    opt2 = cls(m2, rounding=rounding, seed=0, **kw)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    if cls is AdaLomo:
        for p in m2.parameters():
            for k, v in opt2.state[p].items():
                if torch.is_tensor(v):
                    assert v.dtype == torch.float32, k  # not cast to the parameter dtype
    train(m2, opt2, sched2, range(3, 6))
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a.view(torch.int16) if dtype != torch.float32 else a,
                           b.view(torch.int16) if dtype != torch.float32 else b)


# ---------------------------------------------------------------- bad input


def test_bad_constructor_arguments():
    # (every argument in detail: test_optim_validation.py)
    m = mlp()
    with pytest.raises(ValueError, match="clip_grad_norm must be None \\(off\\) or a finite number > 0"):
        Lomo(m, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        AdaLomo(m, lr=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        Lomo(m, backend="cuda")
    with pytest.raises(ValueError, match="rounding must be one of"):
        Lomo(m, rounding="up")
    with pytest.raises(TypeError, match="only float32, float16 and bfloat16"):
        Lomo([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])


def test_unusable_backend_is_refused_by_the_constructor(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu"):
        Lomo(mlp(), backend="triton")


def test_integer_parameters_are_refused():
    p = torch.zeros(3, dtype=torch.int64)
    with pytest.raises((TypeError, RuntimeError)):
        Lomo([torch.nn.Parameter(p, requires_grad=True)])
    # frozen integer buffers passed as parameters are simply ignored
    Lomo([torch.nn.Parameter(p, requires_grad=False), torch.nn.Parameter(torch.zeros(2))])


def test_bad_losses_change_nothing():
    m = mlp()
    opt = AdaLomo(m, lr=0.1)
    before = params_of(m)
    x, y = data()
    with pytest.raises(ValueError, match="loss must be a scalar"):
        opt.fused_backward(m(x).sum(dim=1), 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        opt.fused_backward(torch.tensor(3), 0.1)
    with pytest.raises(TypeError, match="must be a tensor"):
        opt.fused_backward(1.0, 0.1)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        opt.fused_backward(loss_of(m, x, y), -0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_negative_lr_from_a_scheduler_is_refused_before_any_update():
    m = mlp()
    opt = Lomo(m, lr=0.1)
    opt.param_groups[0]["lr"] = -0.5
    before = params_of(m)
    x, y = data()
    with pytest.raises(ValueError, match="\\['lr'\\] must be a finite number >= 0"):
        loss_of(m, x, y).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_lomo_requires_grad_norm_when_clipping():
    m = mlp()
    opt = Lomo(m, lr=0.1, clip_grad_norm=1.0)
    x, y = data()
    with pytest.raises(ValueError, match="call optimizer.grad_norm"):
        opt.fused_backward(loss_of(m, x, y), 0.1)
    with pytest.raises(ValueError, match="grad_norm\\(\\) needs clip_grad_norm"):
        Lomo(m, lr=0.1).grad_norm(loss_of(m, x, y))


def test_clip_grad_norm_with_a_plain_backward_is_explained():
    m = mlp()
    x, y = data()
    opt = Lomo(m, lr=0.1, clip_grad_norm=1.0)
    with pytest.raises(ValueError, match="plain loss.backward\\(\\) cannot do global-norm"):
        loss_of(m, x, y).backward()
    assert opt.state == {} and all(p.grad is None for p in m.parameters())
    m = mlp()
    opt = AdaLomo(m, lr=0.1, clip_grad_norm=1.0)  # (as Lomo: tests/test_optim_clipping.py)
    with pytest.raises(ValueError, match="plain loss.backward\\(\\) cannot do global-norm"):
        loss_of(m, x, y).backward()
    assert opt.state == {} and all(p.grad is None for p in m.parameters())


def test_grad_norm_is_the_global_norm_and_clips():
    m, ref = mlp(), mlp()
    opt = Lomo(m, lr=0.1, clip_grad_norm=0.01)
    x, y = data()
    loss = loss_of(m, x, y)
    total = opt.grad_norm(loss)
    assert all(p.grad is None for p in m.parameters())
    loss_of(ref, x, y).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=0)
    opt.fused_backward(loss, 0.1)
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b.detach() - 0.1 * b.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- non-finite gradients


def _poison(model, value):
    # make the last layer's weight gradient non-finite in one element
    def hook(grad):
        grad = grad.clone()
        grad[0, 0] = value
        return grad

    return model[3].weight.register_hook(hook)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_nonfinite_gradients_are_reported_and_never_written(cls):
    m = mlp()
    opt = cls(m, lr=0.01)
    h = _poison(m, float("nan"))
    before = params_of(m)
    x, y = data()
    with pytest.warns(NonFiniteGradientWarning):
        opt.fused_backward(loss_of(m, x, y), 0.01)
    h.remove()
    for p in m.parameters():
        assert torch.isfinite(p).all()
    if cls is AdaLomo:  # the whole parameter is left as it was
        assert torch.equal(m[3].weight, before[4])
    else:  # only the poisoned element
        assert m[3].weight[0, 0] == before[4][0, 0]
        assert not torch.equal(m[3].weight, before[4])
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        opt.fused_backward(loss_of(m, x, y), 0.01)  # a clean step reports nothing


def test_nonfinite_grad_norm_skips_the_next_step():
    m = mlp()
    opt = AdaLomo(m, lr=0.01, clip_grad_norm=1.0)
    h = _poison(m, float("inf"))
    before = params_of(m)
    x, y = data()
    loss = loss_of(m, x, y)
    with pytest.warns(NonFiniteGradientWarning, match="will not change any parameter"):
        norm = opt.grad_norm(loss)
    assert not torch.isfinite(norm)
    h.remove()
    opt.fused_backward(loss, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    loss = loss_of(m, x, y)
    opt.grad_norm(loss)
    opt.fused_backward(loss, 0.01)
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_fp16_overflow_skips_the_step_and_reduces_the_scale():
    m = mlp(torch.float16)
    opt = Lomo(m, lr=0.01, loss_scale_args=dict(init_scale=2.0**40, scale_window=2))
    before = params_of(m)
    x, y = data(dtype=torch.float16)
    loss = loss_of(m, x, y).half()
    with pytest.warns(LossScaleOverflowWarning, match="step skipped"):
        opt.grad_norm(loss)  # 2**40 * grad overflows fp16
    assert opt.clip_grad_norm == 1.0  # fp16 turns norm clipping on, as lomo-optim does
    assert opt.loss_scaler.loss_scale == 2.0**39
    opt.fused_backward(loss, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    scale = opt.loss_scaler.loss_scale
    for _ in range(60):  # halves until the gradients fit, then trains
        loss = loss_of(m, x, y).half()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LossScaleOverflowWarning)
            opt.grad_norm(loss)
            opt.fused_backward(loss, 0.01)
    assert opt.loss_scaler.loss_scale < scale
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.isfinite(p).all() for p in m.parameters())


# ---------------------------------------------------------------- rounding and shapes


def test_stochastic_rounding_keeps_tiny_updates():
    torch.manual_seed(0)
    p0 = torch.ones(20000, dtype=torch.bfloat16)
    results = {}
    for rounding in ("nearest", "stochastic"):
        p = torch.nn.Parameter(p0.clone())
        opt = Lomo([p], lr=1e-4, rounding=rounding)
        for _ in range(20):
            (p.float().sum()).backward()  # gradient 1: each step moves p by -1e-4 (< 1/2 ulp)
            opt.step()
        results[rounding] = p.float().mean().item()
    assert results["nearest"] == 1.0  # every update lost
    assert abs(results["stochastic"] - (1.0 - 20 * 1e-4)) < 2e-4  # kept on average


@pytest.mark.parametrize("cls", [Lomo, AdaLomo, lomo_kernels.GoLore])
def test_default_rounding_is_stochastic_for_16_bit_and_exact_for_float32(cls):
    """The default (None) rounds bf16 parameters stochastically (bitwise rounding="stochastic"),
    and leaves float32 parameters on the nearest-rounding path (bitwise rounding="nearest");
    an explicit "stochastic" with only float32 parameters is refused."""
    x, y = data()
    for dtype, same_as in ((torch.bfloat16, "stochastic"), (torch.float32, "nearest")):
        m_default, m_explicit = mlp(dtype), mlp(dtype)
        o_default = cls(m_default, lr=0.01)
        o_explicit = cls(m_explicit, lr=0.01, rounding=same_as) if dtype != torch.float32 \
            else cls(m_explicit, lr=0.01, rounding="nearest")
        assert o_default.rounding == "stochastic"
        for m, o in ((m_default, o_default), (m_explicit, o_explicit)):
            for _ in range(3):
                loss_of(m, x.to(dtype), y.to(dtype)).backward()
                o.step()
        for a, b in zip(m_default.parameters(), m_explicit.parameters()):
            assert torch.equal(a, b), (dtype, same_as)
    with pytest.raises(ValueError, match="float32 .*leave rounding at its default"):
        cls(mlp(), lr=0.01, rounding="stochastic")


def test_default_rounding_keeps_tiny_updates_of_bf16_parameters():
    p = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt = Lomo([p], lr=1e-4)  # the default rounding
    for _ in range(20):
        (p.float().sum()).backward()  # each step moves p by -1e-4, below half a bf16 ulp
        opt.step()
    assert abs(p.float().mean().item() - (1.0 - 20 * 1e-4)) < 2e-4


def test_zero_dim_and_empty_parameters():
    w0 = torch.nn.Parameter(torch.tensor(2.0))
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    v = torch.nn.Parameter(torch.randn(5))
    opt = AdaLomo([w0, empty, v], lr=0.1)
    (w0 * v.sum() + empty.sum()).backward()
    opt.step()
    assert w0.item() != 2.0
    assert opt.state[w0]["exp_avg_sq"].shape == ()
    assert empty.grad is None


@requires_cuda
@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_no_host_sync_inside_the_hooks(cls):
    m = mlp().cuda()
    opt = cls(m, lr=0.01)
    x, y = (t.cuda() for t in data())
    opt.fused_backward(loss_of(m, x, y), 0.01)  # warm up: state, flags, kernels
    loss = loss_of(m, x, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        # the hooks run inside this backward; only the one check after it may sync
        opt._mode = "update"
        opt._in_fused = True
        opt._token += 1
        loss.backward()
    finally:
        opt._in_fused = False
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.grad is None for p in m.parameters())
