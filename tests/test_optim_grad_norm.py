"""The gradient norm every step reports (``last_grad_norm``, summed by the update kernels as they
read the gradients) and the one-backward clipping mode built on it (``clip_mode="previous"``)."""

import copy
import io
import math
import warnings

import pytest
import torch
from optim_helpers import (
    DTYPES, OPT_BACKENDS, batch, loss_of, model, plain_grad_norm, plain_grads, train_step,
)

import lomo_kernels
from lomo_kernels import (
    AdaLomo, GradNormSpikeWarning, InBackwardOptimizer, Lomo, NonFiniteGradientWarning,
)
from lomo_kernels.optim import _batch
from lomo_kernels.optim._norm import fp32_norm


# relative tolerance of last_grad_norm against the float64 norm of the same gradients: the
# kernels sum squares in float32 (fixed order); bf16/fp16 gradients of a scaled loss may differ
# from the unscaled ones by the rounding of the backward's intermediate values
NORM_RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_side_norm_is_accurate_for_a_large_gradient(dtype):
    # The norm the optimizers take with torch operations (grad_norm's pass, GoLore's and the
    # sharded updates' grad_sq): a 2**25-element gradient within 1e-5 of float64. One
    # vector_norm call on CPU sums in float32 and is off by about 2e-3 at this size (torch 2.14).
    g = torch.randn(2**25, generator=torch.Generator().manual_seed(5)).to(dtype)
    want = g.double().square().sum()
    assert abs(fp32_norm(g).double().item() ** 2 / want.item() - 1) < 1e-5
    acc = torch.zeros(1)
    _batch.add_grad_sq(acc, g, 4.0)
    assert abs(acc.double().item() * 16.0 / want.item() - 1) < 1e-5


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_last_grad_norm_is_the_norm_of_a_plain_backward(backend, cls, dtype, path):
    m = model(dtype)
    opt = cls(m, lr=1e-2, backend=backend)
    assert opt.last_grad_norm is None
    for step in range(2):  # the accumulators start from zero at every backward
        x = batch(step, dtype)
        want = plain_grad_norm(m, x)
        train_step(opt, m, x, path)
        got = opt.last_grad_norm
        assert got.shape == () and got.dtype == torch.float32 and got.device == x.device
        assert math.isclose(got.item(), want, rel_tol=NORM_RTOL[dtype]), (step, got, want)


def test_last_grad_norm_of_fp16_lomo_is_unscaled():
    """The fp16 dynamic loss scale (2**16 here) is divided out of the reported norm."""
    m = model(torch.float16)
    with pytest.warns(UserWarning, match="dynamic loss scaling is on"):
        opt = Lomo(m, lr=1e-2)
    x = batch(0, torch.float16)
    scale = opt.loss_scaler.loss_scale
    want = plain_grad_norm(m, x, scale)
    loss = loss_of(m, x)
    exact = opt.grad_norm(loss)
    opt.fused_backward(loss, 1e-2)
    assert math.isclose(exact.item(), want, rel_tol=NORM_RTOL[torch.float16])
    assert math.isclose(opt.last_grad_norm.item(), want, rel_tol=NORM_RTOL[torch.float16])


class _HostReads:
    """Counts what reads device values on the host during a backward."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.counts = dict.fromkeys(self.NAMES + ("host_look",), 0)
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(_batch, "host_look", self._counted("host_look", _batch.host_look))

    def _counted(self, name, fn):
        def wrapper(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("clip", ["off", "previous"])
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_one_host_read_per_step(monkeypatch, cls, clip, path):
    """The norm, the next coefficient and the safety net add no host synchronisation: the one
    transfer after the backward (flags, norm, coefficient together) is the step's only one."""
    m = model()
    kw = dict(clip_grad_norm=0.05, clip_mode="previous") if clip == "previous" else {}
    opt = cls(m, lr=1e-2, **kw)
    train_step(opt, m, batch(0), path)  # state and buffers exist
    losses = [loss_of(m, batch(s)) for s in (1, 2)]
    reads = _HostReads(monkeypatch)
    for loss in losses:
        if path == "fused":
            opt.fused_backward(loss, 1e-2)
        else:
            loss.backward()
            opt.step()
    monkeypatch.undo()
    assert reads.counts == {"item": 0, "tolist": 2, "__bool__": 0, "__float__": 0, "__int__": 0,
                            "host_look": 2}


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_previous_mode_clips_with_the_previous_steps_exact_coefficient(cls, path):
    """Step k is clipped with the coefficient the exact two-pass mode computes for step k-1's
    gradients (its grad_norm()); the first step is not clipped."""
    c, lr = 0.05, 1e-2
    m = model()
    opt = cls(m, lr=lr, clip_grad_norm=c, clip_mode="previous")
    previous_exact = None
    for step in range(4):
        x = batch(step)
        probe = copy.deepcopy(m)  # the exact mode on the same parameters and batch
        probe_opt = cls(probe, lr=lr, clip_grad_norm=c)
        probe_opt.grad_norm(loss_of(probe, x))
        exact = probe_opt.clip_coef.clone()
        assert exact < 1.0  # clipping is active
        if step == 0:
            assert opt.clip_coef is None
        else:
            torch.testing.assert_close(opt.clip_coef, previous_exact, rtol=1e-6, atol=0)
        used = 1.0 if opt.clip_coef is None else opt.clip_coef.item()
        before = [p.detach().clone() for p in m.parameters()]
        grads = plain_grads(m, x)
        train_step(opt, m, x, path, lr)
        if cls is Lomo:  # the update really used that coefficient: p - lr * coef * g
            for p, p0, g in zip(m.parameters(), before, grads):
                torch.testing.assert_close(p, (p0.double() - lr * used * g).float(),
                                           rtol=1e-5, atol=1e-7)
        previous_exact = exact


def test_previous_mode_first_step_after_grad_norm_is_exact():
    c, lr = 0.05, 1e-2
    m, ref = model(), model()
    opt = Lomo(m, lr=lr, clip_grad_norm=c, clip_mode="previous")
    ref_opt = Lomo(ref, lr=lr, clip_grad_norm=c)
    x = batch(0)
    for o, mm in ((opt, m), (ref_opt, ref)):
        loss = loss_of(mm, x)
        o.grad_norm(loss)
        o.fused_backward(loss, lr)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))


def test_previous_mode_works_with_a_plain_backward():
    """The Trainer's path: Lomo's exact mode refuses a plain backward; "previous" clips it."""
    m = model()
    opt = Lomo(m, lr=1e-2, clip_grad_norm=0.05, clip_mode="previous")
    for step in range(2):
        loss_of(m, batch(step)).backward()
        opt.step()
    assert opt.clip_coef is not None and opt.clip_coef < 1.0


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_previous_mode_keeps_the_coefficient_after_a_non_finite_step(cls):
    m = model()
    opt = cls(m, lr=1e-2, clip_grad_norm=0.05, clip_mode="previous")
    train_step(opt, m, batch(0), "fused")
    coef = opt.clip_coef.clone()
    h = m[3].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.warns(NonFiniteGradientWarning):
        train_step(opt, m, batch(1), "fused")
    h.remove()
    assert torch.isinf(opt.last_grad_norm)  # the true norm
    assert torch.equal(opt.clip_coef, coef)  # not 0 (nor NaN): the last finite one
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        train_step(opt, m, batch(2), "fused")
    assert torch.isfinite(opt.last_grad_norm) and opt.clip_coef != coef


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_previous_mode_flags_a_spike(path):
    """The safety net (docs/clipping.md): a step whose applied update norm exceeds
    clip_spike_factor (10) x clip_grad_norm is flagged; the unclipped first step (nothing to
    compare with), steady steps and a 5x jump are not; the step after a spike neither."""
    c = 0.05
    m = model()
    opt = AdaLomo(m, lr=1e-3, clip_grad_norm=c, clip_mode="previous")
    x = batch(0)

    def step(factor=1.0):  # the gradient norm scales with the loss
        loss = loss_of(m, x) * factor
        if path == "fused":
            opt.fused_backward(loss, 1e-3)
        else:
            loss.backward()
            opt.step()
        return opt.last_grad_norm.item()

    with warnings.catch_warnings():
        warnings.simplefilter("error", GradNormSpikeWarning)
        assert step() > 20 * c  # the first step: unclipped, far above c, not flagged
        for _ in range(2):
            step()  # about the same norm: clipped to about c
        step(5.0)  # applied 5x c
        step(0.2)  # back down
    assert opt.clip_spikes == 0
    with pytest.warns(GradNormSpikeWarning, match=r"previous step's coefficient") as w:
        step(30.0)  # applied about 30x c
    assert opt.clip_spikes == 1 and len(w) == 1
    msg = str(w[0].message)
    assert "clip_grad_norm=0.05" in msg and "clip_spike_factor=10" in msg
    for alt in ("grad_norm(loss)", "accumulation_steps=K > 1"):
        assert alt in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradNormSpikeWarning)
        step()  # after the spike: clipped with the spike's norm, far below c
    opt.clip_spike_factor = 1e9  # the threshold is the user's
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradNormSpikeWarning)
        step(900.0)
    assert opt.clip_spikes == 1


def test_clip_spike_factor_is_checked():
    opt = Lomo(model(), lr=1e-3, clip_grad_norm=0.05, clip_mode="previous")
    assert opt.clip_spike_factor == 10.0
    with pytest.raises(TypeError, match="clip_spike_factor must be a finite number >= 1"):
        opt.clip_spike_factor = "3"
    with pytest.raises(ValueError, match="clip_spike_factor must be a finite number >= 1"):
        opt.clip_spike_factor = 0.5
    assert opt.clip_spike_factor == 10.0
    opt.clip_spike_factor = 4
    assert opt.clip_spike_factor == 4.0


def test_exact_mode_never_flags():
    m = model()
    opt = Lomo(m, lr=1e-3, clip_grad_norm=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradNormSpikeWarning)
        for factor in (1.0, 30.0):
            loss = loss_of(m, batch(0)) * factor
            opt.grad_norm(loss)
            opt.fused_backward(loss, 1e-3)
    assert opt.clip_spikes == 0


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_clip_mode_and_batching_arguments_are_checked(cls):
    m = model()
    with pytest.raises(ValueError, match="clip_mode must be one of"):
        cls(m, clip_grad_norm=1.0, clip_mode="prev")
    with pytest.raises(ValueError, match="clip_mode='previous' clips with clip_grad_norm"):
        cls(m, clip_mode="previous")
    with pytest.raises(TypeError, match="batch_small_params must be True or False"):
        cls(m, batch_small_params="yes")
    assert all(p.grad is None for p in m.parameters())
    opt = cls(m, clip_grad_norm=1.0, clip_mode="previous")  # nothing was left behind before
    assert opt.clip_mode == "previous" and opt.batch_small_params
    assert "clip_mode='previous'" in repr(opt) and "batch_small_params" not in repr(opt)
    with pytest.warns(Warning, match="detached"):
        assert "batch_small_params=False" in repr(cls(m, batch_small_params=False))


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_previous_mode_resumes_bitwise_from_a_state_dict(cls):
    kw = dict(lr=1e-2, clip_grad_norm=0.05, clip_mode="previous")
    m = model()
    opt = cls(m, **kw)
    for step in range(2):
        train_step(opt, m, batch(step), "fused")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed = copy.deepcopy(m)
    opt2 = cls(resumed, **kw)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    for step in (2, 3):
        train_step(opt, m, batch(step), "fused")
        train_step(opt2, resumed, batch(step), "fused")
        assert torch.equal(opt.last_grad_norm, opt2.last_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), resumed.parameters()))


def test_grad_norm_sets_last_grad_norm_and_a_skipped_step_keeps_it():
    m = model()
    opt = AdaLomo(m, lr=1e-2, clip_grad_norm=1.0)
    h = m[3].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    loss = loss_of(m, batch(0))
    with pytest.warns(NonFiniteGradientWarning, match="will not change any parameter"):
        opt.grad_norm(loss)
    h.remove()
    opt.fused_backward(loss, 1e-2)  # skipped
    assert torch.isnan(opt.last_grad_norm)


def test_no_gradient_means_a_zero_norm():
    m = model()
    opt = Lomo(m, lr=1e-2)
    train_step(opt, m, batch(0), "fused")
    assert opt.last_grad_norm > 0
    opt.fused_backward(torch.zeros((), requires_grad=True) * 1.0, 1e-2)  # reaches no parameter
    assert opt.last_grad_norm.item() == 0.0


def test_public_names():
    assert lomo_kernels.GradNormSpikeWarning is GradNormSpikeWarning
    assert issubclass(GradNormSpikeWarning, RuntimeWarning)


class _PlainSGD(InBackwardOptimizer):
    """A subclass with its own update (as GoLore's projected one): its kernel adds no grad_sq,
    so the base adds each gradient's squared norm; it batches nothing and needs no workspace."""

    _name = "PlainSGD"
    _op = "plain_sgd"

    def __init__(self, model, lr):
        super().__init__(model, dict(lr=lr, weight_decay=0.0, clip_grad_value=None),
                         clip_grad_norm=None, backend="torch", rounding="nearest", seed=0)

    def _update(self, p, g, group, state, seed):
        assert self._grad_sq(p) is None and self._workspace(p.device) is None
        p.add_(g, alpha=-group["lr"])


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_a_subclass_without_grad_sq_in_its_kernel_reports_the_norm(path):
    m = model()
    opt = _PlainSGD(m, lr=1e-2)
    x = batch(0)
    want = plain_grad_norm(m, x)
    before = [p.detach().clone() for p in m.parameters()]
    grads = plain_grads(m, x)
    train_step(opt, m, x, path)
    assert math.isclose(opt.last_grad_norm.item(), want, rel_tol=1e-6)
    for p, p0, g in zip(m.parameters(), before, grads):
        torch.testing.assert_close(p, (p0.double() - 1e-2 * g).float())
    assert not opt._small
