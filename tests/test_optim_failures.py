"""Failures inside an updating backward leave nothing behind: no .grad, no partial state, an error
that names the parameter, and a fixed step afterwards equals a clean run."""

import copy
import warnings

import pytest
import torch

from lomo_kernels import AdaLomo, Lomo, NonFiniteGradientWarning


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6),
                               torch.nn.Tanh(), torch.nn.Linear(6, 2))


def loss_of(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(4, 5, generator=g)).pow(2).mean()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_clean(model):
    assert all(p.grad is None for p in model.parameters()), "a gradient survived"


def state_snapshot(opt):
    return {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in opt.state.items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for pid in a:
        assert a[pid].keys() == b[pid].keys()
        for k in a[pid]:
            va, vb = a[pid][k], b[pid][k]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, k


BAD_GROUP_VALUES = [
    ("lr", -0.1, ValueError), ("lr", float("nan"), ValueError), ("lr", float("inf"), ValueError),
    ("lr", "1e-3", TypeError), ("weight_decay", -1.0, ValueError),
    ("clip_grad_value", float("nan"), ValueError),
]


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("path", ["plain", "fused"])
@pytest.mark.parametrize("key,value,exc", BAD_GROUP_VALUES, ids=lambda v: str(v))
def test_bad_group_value_changes_nothing_and_a_fixed_step_equals_a_clean_run(cls, path, key,
                                                                             value, exc):
    m, clean = mlp(), mlp()
    opt, clean_opt = cls(m, lr=0.05), cls(clean, lr=0.05)
    opt.fused_backward(loss_of(m, 0), 0.05)  # one good step first: there is state to protect
    clean_opt.fused_backward(loss_of(clean, 0), 0.05)
    before, state = snapshot(m), state_snapshot(opt)
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    with pytest.raises(exc, match=f"param_groups\\[0\\]\\['{key}'\\] must be"):
        if path == "plain":
            loss_of(m).backward()
        else:
            opt.fused_backward(loss_of(m), None)
    assert_clean(m)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert_same_state(state, state_snapshot(opt))
    opt.param_groups[0][key] = good
    for model, o in ((m, opt), (clean, clean_opt)):
        loss_of(model).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), clean.parameters()))
    assert_clean(m)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("lr", [float("nan"), float("-inf"), -1.0, "0.1", None])
def test_bad_fused_backward_lr_changes_nothing(cls, lr):
    m = mlp()
    opt = cls(m, lr=0.05)
    before = snapshot(m)
    loss = loss_of(m)
    if lr is None:  # None keeps the groups' lr: make that one bad instead
        opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises((ValueError, TypeError), match=r"lr'?\]? must be a finite number >= 0"):
        opt.fused_backward(loss, lr)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert_clean(m)
    assert not opt.state
    if lr is not None:
        assert opt.param_groups[0]["lr"] == 0.05  # not overwritten by the bad value
    opt.param_groups[0]["lr"] = 0.05
    opt.fused_backward(loss_of(m), 0.05)  # and training goes on
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


class _Boom(RuntimeError):
    pass


def _fail_at(opt, k, device="cpu"):
    """Make the kernel fail at the (k+1)-th parameter of each backward; record who was updated."""
    real = opt._impl(torch.device(device))
    seen = []

    def impl(p, *args):
        if len(seen) == k:
            seen.append(p)
            raise _Boom("kernel failed")
        seen.append(p)
        real(p, *args)

    opt._impls[torch.device(device)] = impl
    return seen, lambda: opt._impls.__setitem__(torch.device(device), real)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("path", ["plain", "fused"])
def test_kernel_error_mid_backward(cls, path):
    """The 4th of 6 parameters fails: the first 3 are updated (and said to be), the failing one
    and the rest are not, the failing one's state is as before, no gradient survives, and after
    step() training goes on."""
    m = mlp()
    opt = cls(m, lr=0.05)
    opt.fused_backward(loss_of(m, 0), 0.05)
    ref = copy.deepcopy(m)
    ref_opt = cls(ref, lr=0.05)
    ref_opt.load_state_dict(opt.state_dict())
    state = state_snapshot(opt)
    seen, restore = _fail_at(opt, 3)  # the kernels see p.data: match by storage
    names = {p.data_ptr(): n for n, p in m.named_parameters()}
    with pytest.raises(_Boom) as err:
        if path == "plain":
            loss_of(m).backward()
        else:
            opt.fused_backward(loss_of(m), 0.05)
    failed = next(p for p in m.parameters() if p.data_ptr() == seen[3].data_ptr())
    msg = str(err.value)
    assert f"at parameter {names[failed.data_ptr()]}" in msg
    assert "3 parameter(s) had already been updated in place by this backward" in msg
    assert_clean(m)
    loss_of(ref).backward()  # what a full step would have done
    ref_opt.step()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        if any(p.data_ptr() == s.data_ptr() for s in seen[:3]):
            assert torch.equal(p, q), n  # updated, exactly as in a full step
        else:
            assert not torch.equal(p, q), n  # not updated
    now = state_snapshot(opt)
    assert_same_state({id(failed): state[id(failed)]}, {id(failed): now[id(failed)]})
    restore()
    opt.step()
    loss_of(m, 2).backward()  # the next step runs (every parameter once)
    opt.step()
    assert_clean(m)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_kernel_error_on_the_first_step_leaves_no_state(cls):
    m = mlp()
    opt = cls(m, lr=0.05)
    seen, restore = _fail_at(opt, 0)
    with pytest.raises(_Boom, match="no parameter was changed by this backward"):
        loss_of(m).backward()
    assert len(seen) == 1 and not opt.state
    assert_clean(m)
    restore()
    loss_of(m).backward()
    opt.step()
    assert all(s["step"] == 1 for s in opt.state.values())


def test_stale_overflow_flag_is_dropped_with_the_failed_backward():
    """A NaN gradient before the failure must not be reported by the next, clean, backward."""
    m = mlp()
    opt = Lomo(m, lr=0.05)
    h = m[4].bias.register_hook(lambda g: torch.full_like(g, float("nan")))  # reached first
    seen, restore = _fail_at(opt, 3)
    with pytest.raises(_Boom):
        loss_of(m).backward()
    h.remove()
    restore()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        loss_of(m).backward()
    opt.step()


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_second_gradient_changes_nothing_and_names_the_parameter(cls):
    m = mlp()
    opt = cls(m, lr=0.05)
    loss_of(m).backward()
    before, state = snapshot(m), state_snapshot(opt)
    with pytest.raises(RuntimeError, match=r"parameter 4\.(weight|bias) received a second gradient") as e:
        loss_of(m).backward()
    assert "no parameter was changed by this backward" in str(e.value)
    assert_clean(m)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert_same_state(state, state_snapshot(opt))


def test_error_from_a_reentrant_checkpoint_segment_leaves_nothing():
    from torch.utils.checkpoint import checkpoint

    m = mlp()
    opt = AdaLomo(m, lr=0.05)
    x = torch.randn(4, 5, requires_grad=True)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="no parameter was changed"):
        checkpoint(m, x, use_reentrant=True).pow(2).mean().backward()
    assert_clean(m)
    opt.param_groups[0]["lr"] = 0.05
    before = snapshot(m)
    checkpoint(m, x, use_reentrant=True).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert_clean(m)
