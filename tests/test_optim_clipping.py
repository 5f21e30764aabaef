"""Global-norm clipping is never skipped unnoticed: ``clip_grad_norm`` in the exact mode without
a ``grad_norm(loss)`` before the updating backward is refused by every optimizer (Lomo, AdaLomo,
GoLore, GaLore), on both backward paths, before any parameter changes; each ``grad_norm`` clips
the one backward that follows it; every message names the ways to clip (docs/clipping.md)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lomo_kernels import AdaLomo, GaLore, GoLore, Lomo

CLASSES = {"Lomo": Lomo, "AdaLomo": AdaLomo, "GoLore": GoLore, "GaLore": GaLore}
PATHS = ["fused", "plain"]
ALTERNATIVES = ["grad_norm(loss)", "fused_backward(loss, lr)", "clip_mode='previous'",
                "accumulation_steps=K > 1"]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))


def _opt(name, m, **kw):
    extra = dict(rank=2, update_proj_gap=10) if name in ("GoLore", "GaLore") else {}
    return CLASSES[name](m, lr=1e-2, **extra, **kw)


def _loss(m, step=0):
    g = torch.Generator().manual_seed(100 + step)
    return m(torch.randn(6, 12, generator=g)).pow(2).mean()


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _backward(opt, loss, path):
    if path == "fused":
        opt.fused_backward(loss, 1e-2)
    else:
        loss.backward()
        opt.step()


def _assert_refused_unchanged(m, opt, before, path, excinfo):
    msg = str(excinfo.value)
    for alt in ALTERNATIVES:
        assert alt in msg, (alt, msg)
    assert "refused before any parameter changed" in msg
    if path == "plain":
        assert "plain loss.backward() cannot do global-norm clipping" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p.grad is None for p in m.parameters())
    assert all("step" not in opt.state[p] or opt.state[p]["step"] == 0 for p in m.parameters()
               if p in opt.state)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", CLASSES)
def test_exact_clipping_without_grad_norm_is_refused_before_anything_changes(name, path):
    m = _model()
    opt = _opt(name, m, clip_grad_norm=0.1)
    before = _params(m)
    with pytest.raises(ValueError, match="clip_grad_norm=0.1 with clip_mode='exact'") as exc:
        _backward(opt, _loss(m), path)
    _assert_refused_unchanged(m, opt, before, path, exc)
    if path == "plain":
        opt.step()  # the step boundary after a failed plain backward
    # the two-pass loop then trains, clipped
    loss = _loss(m)
    norm = opt.grad_norm(loss)
    assert norm.item() > 0.2  # so the clipping bites
    _backward(opt, loss, path)
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", CLASSES)
def test_a_grad_norm_clips_only_the_backward_that_follows_it(name, path):
    m = _model()
    opt = _opt(name, m, clip_grad_norm=1.0)
    loss = _loss(m)
    opt.grad_norm(loss)
    _backward(opt, loss, path)
    before = _params(m)
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    with pytest.raises(ValueError, match="no optimizer.grad_norm|plain loss.backward") as exc:
        _backward(opt, _loss(m, 1), path)  # the coefficient of step 0 is not reused
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    for p, s in state.items():
        for k, v in s.items():
            assert (torch.equal(v, opt.state[p][k]) if torch.is_tensor(v)
                    else v == opt.state[p][k]), k
    assert "clip_mode='previous'" in str(exc.value)


@pytest.mark.parametrize("name", CLASSES)
def test_exact_clipping_applies_the_fresh_coefficient(name):
    """The two-pass step equals an unclipped step on the gradient scaled by the coefficient
    (its own norm's), on both paths."""
    for path in PATHS:
        a, b = _model(1), _model(1)
        oa = _opt(name, a, clip_grad_norm=0.05)
        ob = _opt(name, b)
        for step in range(3):
            loss = _loss(a, step)
            norm = oa.grad_norm(loss).item()
            coef = min(1.0, 0.05 / (norm + 1e-6))
            assert coef < 0.5
            _backward(oa, loss, path)
            _backward(ob, _loss(b, step) * coef, path)
            for x, y in zip(a.parameters(), b.parameters()):
                torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", CLASSES)
def test_previous_mode_needs_no_grad_norm(name):
    m = _model()
    opt = _opt(name, m, clip_grad_norm=1.0, clip_mode="previous")
    for step, path in enumerate(["fused", "plain", "fused"]):
        _backward(opt, _loss(m, step), path)
    assert opt.clip_coef is not None


def test_reentrant_checkpointing_with_exact_clipping():
    """A nested graph task (reentrant checkpointing) runs inside the checked backward: the fresh
    coefficient is used once for the whole backward, not refused in the nested task."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(12, 24), torch.nn.Linear(24, 5)

        def forward(self, x):
            h = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=True)
            return self.b(h)

    torch.manual_seed(0)
    m, ref = Net(), Net()
    ref.load_state_dict(m.state_dict())
    opt, oref = AdaLomo(m, lr=1e-2, clip_grad_norm=0.1), AdaLomo(ref, lr=1e-2, clip_grad_norm=0.1)
    x = torch.randn(6, 12, requires_grad=True)  # (reentrant checkpointing needs an input grad)
    for o, net in ((opt, m), (oref, ref)):
        for _ in range(2):
            loss = net(x).pow(2).mean()
            o.grad_norm(loss)
            o.fused_backward(loss, 1e-2)
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no optimizer.grad_norm"):
        opt.fused_backward(m(x).pow(2).mean(), 1e-2)


def test_the_coefficient_stays_readable_after_the_step():
    m = _model()
    opt = Lomo(m, lr=1e-2, clip_grad_norm=1.0)
    loss = _loss(m)
    opt.grad_norm(loss)
    coef = opt.clip_coef.clone()
    opt.fused_backward(loss, 1e-2)
    assert torch.equal(opt.clip_coef, coef)  # for logging; it clips no other backward


def test_a_resumed_optimizer_needs_a_fresh_grad_norm():
    m = _model()
    opt = AdaLomo(m, lr=1e-2, clip_grad_norm=1.0)
    loss = _loss(m)
    opt.grad_norm(loss)
    sd = opt.state_dict()
    opt.fused_backward(loss, 1e-2)
    m2 = _model()
    opt2 = AdaLomo(m2, lr=1e-2, clip_grad_norm=1.0)
    opt2.load_state_dict(sd)
    with pytest.raises(ValueError, match="no optimizer.grad_norm"):
        opt2.fused_backward(_loss(m2), 1e-2)
