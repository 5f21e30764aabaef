"""One owner per parameter: re-created optimizers, failing constructors, garbage collection,
remove_hooks(), and backends that cannot run, all as a user meets them."""

import gc
import warnings
import weakref

import pytest
import torch

from lomo_kernels import AdaLomo, Lomo, OptimizerReplacedWarning


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(dtype)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, generator=g)


def loss_of(model, seed=1):
    return model(batch(seed)).pow(2).mean()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def hooks_on(p):
    return len(p._post_accumulate_grad_hooks or {})


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_recreated_optimizer_takes_over_and_the_old_one_is_detached(cls):
    """A notebook cell run twice: the second optimizer (lr 0) is the only one that updates."""
    m = mlp()
    opt = cls(m, lr=1e-2)
    old = opt
    with pytest.warns(OptimizerReplacedWarning, match=f"another {cls.__name__} optimizer"):
        opt = cls(m, lr=0.0)
    before = snapshot(m)
    loss_of(m).backward()
    opt.step()
    assert same(before, m.parameters())  # lr 0: the old optimizer (lr 1e-2) did not run
    loss_of(m, seed=2).backward()  # no "second gradient" error: one update per backward
    opt.step()
    assert all(p.grad is None for p in m.parameters())
    assert all(hooks_on(p) == 1 for p in m.parameters())
    for call in (lambda: old.fused_backward(loss_of(m), 0.1), lambda: old.grad_norm(loss_of(m)),
                 old.step):
        with pytest.raises(RuntimeError, match="no longer updates its parameters"):
            call()
    assert "detached=" in repr(old)


def test_recreating_in_a_loop_updates_once_per_step():
    """Creating a new Lomo every step (stateless update) equals one optimizer for all steps."""
    m, ref = mlp(), mlp()
    ref_opt = Lomo(ref, lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizerReplacedWarning)
        for step in range(4):
            opt = Lomo(m, lr=0.05)
            loss_of(m, seed=step).backward()
            opt.step()
            loss_of(ref, seed=step).backward()
            ref_opt.step()
    assert same(snapshot(m), ref.parameters())
    assert all(hooks_on(p) == 1 for p in m.parameters())


def test_partial_overlap_detaches_the_old_optimizer_entirely():
    m = mlp()
    first, second = list(m[0].parameters()), list(m[2].parameters())
    old = Lomo(first + second, lr=0.1)
    with pytest.warns(OptimizerReplacedWarning, match="2 of these parameters"):
        new = Lomo(second, lr=0.1)
    assert all(hooks_on(p) == 0 for p in first)
    assert all(hooks_on(p) == 1 for p in second) and new.param_groups[0]["params"] == second
    with pytest.raises(RuntimeError, match="a newer Lomo optimizer took over"):
        old.step()


def test_garbage_collected_optimizer_removes_its_hooks():
    m = mlp()
    opt = AdaLomo(m, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    ref = weakref.ref(opt)
    del opt, sched  # no gc.collect(): the hooks hold the optimizer weakly, no cycle keeps it
    assert ref() is None
    assert all(hooks_on(p) == 0 for p in m.parameters())
    before = snapshot(m)
    loss_of(m).backward()  # plain PyTorch again: gradients accumulate, nothing is updated
    assert same(before, m.parameters())
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerReplacedWarning)  # nothing alive to replace
        AdaLomo(m, lr=1e-2)


def test_remove_hooks_releases_ownership():
    m = mlp()
    opt = Lomo(m, lr=0.1)
    opt.remove_hooks()
    assert all(hooks_on(p) == 0 for p in m.parameters())
    with pytest.raises(RuntimeError, match="remove_hooks\\(\\) was called"):
        opt.fused_backward(loss_of(m), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerReplacedWarning)
        new = Lomo(m, lr=0.1)
    before = snapshot(m)
    loss_of(m).backward()
    new.step()
    assert not same(before, m.parameters())


@pytest.mark.parametrize("bad", ["non-contiguous", "float64", "duplicate"])
def test_failing_constructor_leaves_no_hook_and_keeps_the_old_owner(bad):
    m = mlp()
    owner = Lomo(m, lr=0.1)
    ok = list(m.parameters())
    if bad == "non-contiguous":
        extra = [torch.nn.Parameter(torch.randn(4, 3).t())]
    elif bad == "float64":
        extra = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    else:
        extra = [ok[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerReplacedWarning)  # the owner is never detached
        with pytest.raises((ValueError, TypeError), match="param_groups\\[1\\]|parameter"):
            AdaLomo([{"params": ok}, {"params": extra}], lr=1.0)
    assert all(hooks_on(p) == 1 for p in ok)
    for p in extra:
        assert hooks_on(p) == (1 if bad == "duplicate" else 0)
    before = snapshot(m)
    loss_of(m).backward()
    owner.step()  # the old owner still updates, once
    assert not same(before, m.parameters())
    assert all(p.grad is None for p in m.parameters())


def test_failing_add_param_group_adds_nothing():
    m = mlp()
    opt = Lomo(list(m[0].parameters()), lr=0.1)
    with pytest.raises(ValueError, match="param_groups\\[1\\]\\['lr'\\] must be a finite number"):
        opt.add_param_group({"params": list(m[2].parameters()), "lr": float("nan")})
    assert len(opt.param_groups) == 1
    assert all(hooks_on(p) == 0 for p in m[2].parameters())
    opt.add_param_group({"params": list(m[2].parameters()), "lr": 0.2})
    assert all(hooks_on(p) == 1 for p in m[2].parameters())
    before = snapshot(m)
    loss_of(m).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_duplicate_parameter_in_a_group_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own duplicate warning
        with pytest.raises(ValueError, match="appears twice"):
            Lomo([p, p])
    assert hooks_on(p) == 0


def test_unusable_backend_fails_in_the_constructor(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton then cannot run CPU tensors
    m = mlp()
    owner = AdaLomo(m, lr=1e-2)
    with pytest.raises(RuntimeError, match="parameter 0.weight: backend 'triton' cannot run on cpu"):
        AdaLomo(m, backend="triton")
    assert all(hooks_on(p) == 1 for p in m.parameters())
    before = snapshot(m)
    owner.fused_backward(loss_of(m), 1e-2)  # the owner is untouched and still works
    assert not same(before, m.parameters())


def test_gc_of_an_optimizer_in_a_reference_cycle_is_not_reported():
    m = mlp()
    opt = Lomo(m, lr=0.1)
    opt.cycle = opt  # only gc can free it
    del opt
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerReplacedWarning)
        new = Lomo(m, lr=0.1)  # the constructor collects garbage before deciding to warn
    gc.collect()
    assert all(hooks_on(p) == 1 for p in m.parameters()) and new.param_groups
