"""Per-device workspaces and small-parameter batching: the small parameters (1-d, and for Lomo any
of at most SMALL_NUMEL elements) are updated by one multi-tensor call per (device, dtype) at the
end of the backward, bitwise as their hooks would have; the workspace is allocated once."""

import copy
import math
import re
import warnings

import pytest
import torch
from optim_helpers import (
    DTYPES, OPT_BACKENDS, assert_bitwise, batch, loss_of, model, snapshot, train_step,
)
from test_op_contract import CONTRACT_BACKENDS

from lomo_kernels import AdaLomo, Lomo, NonFiniteGradientWarning, OptimizerReplacedWarning, ops
from lomo_kernels.optim._batch import SMALL_NUMEL

# name: (constructor keywords, how a step runs)
VARIANTS = {
    "plain": ({}, "plain"),
    "clip-exact": (dict(clip_grad_norm=0.05), "grad_norm"),
    "clip-previous": (dict(clip_grad_norm=0.05, clip_mode="previous"), "fused"),
    "clip-previous-plain": (dict(clip_grad_norm=0.05, clip_mode="previous"), "plain"),
    "value-clip-wd": (dict(clip_grad_value=1e-3, weight_decay=0.1), "fused"),
}


def _step(opt, m, x, how, lr=1e-2):
    if how == "alternate":  # fused_backward, then a plain backward, ...
        how = "plain" if opt._token % 4 else "fused"
    if how == "grad_norm":
        loss = loss_of(m, x)
        opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
    else:
        train_step(opt, m, x, how, lr)


def _run(cls, dtype, backend, batching, kw, how, steps=3, each_step=None, rounding="nearest"):
    m = model(dtype)
    opt = cls(m, lr=1e-2, backend=backend, batch_small_params=batching, rounding=rounding, **kw)
    for step in range(steps):
        if each_step is not None:
            each_step(step, m, opt)
        _step(opt, m, batch(step, dtype), how)
    return m, opt


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batching_is_bitwise_the_per_parameter_path(backend, cls, dtype):
    """Every backend: its multi-tensor op (or its loop of the single op) updates each small
    parameter bitwise as its hook would, and the step's norm is the same."""
    rounding = "stochastic" if dtype != torch.float32 else "nearest"
    runs = [snapshot(*_run(cls, dtype, backend, b, {}, "alternate", rounding=rounding))
            for b in (True, False)]
    assert_bitwise(*runs)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batching_is_bitwise_with_every_clipping(cls, dtype, variant):
    kw, how = VARIANTS[variant]
    runs = [snapshot(*_run(cls, dtype, "auto", b, kw, how)) for b in (True, False)]
    assert_bitwise(*runs)


def _poison_and_change_lr(step, m, opt):
    """Step 1: a NaN in a small parameter's gradient and an Inf in a large one's; step 2: a new
    lr for one param group, set by hand mid-run."""
    if step == 1:
        hooks = [m[2].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([3]), math.nan)),
                 m[3].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.inf))]
        opt._test_hooks = hooks
    if step == 2:
        for h in opt._test_hooks:
            h.remove()
        opt.param_groups[0]["lr"] = 3e-2


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("how", ["plain", "fused"])
def test_batching_is_bitwise_with_non_finite_gradients_and_a_changed_lr(cls, how):
    runs = []
    for batching in (True, False):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", NonFiniteGradientWarning)
            m, opt = _run(cls, torch.bfloat16, "auto", batching, {}, how,
                          each_step=_poison_and_change_lr)
        assert sum(issubclass(x.category, NonFiniteGradientWarning) for x in w) == 1
        runs.append(snapshot(m, opt))
    assert_bitwise(*runs)


def test_batching_is_bitwise_with_the_fp16_loss_scaler():
    runs = []
    for batching in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            m, opt = _run(Lomo, torch.float16, "auto", batching, {}, "grad_norm")
        assert opt.loss_scaler is not None
        runs.append(snapshot(m, opt))
    assert_bitwise(*runs)


def _count_calls(opt, device="cpu"):
    device = torch.device(device)
    calls = {"single": 0, "multi": []}
    single, multi = opt._impl(device), opt._multi_impl(device)

    def count_single(*args):
        calls["single"] += 1
        single(*args)

    def count_multi(params, *args):
        calls["multi"].append((len(params), params[0].dtype))
        multi(params, *args)

    opt._impls[device], opt._multi_impls[device] = count_single, count_multi
    return calls


class _Mixed(torch.nn.Module):
    """A bf16 LayerNorm between fp32 layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Linear(16, 300), torch.nn.Linear(300, 240),
                                  torch.nn.Linear(240, 4))
        self.norm = torch.nn.LayerNorm(300).to(torch.bfloat16)

    def forward(self, x):
        h = self.norm(torch.tanh(self.a(x)).bfloat16()).float()
        return self.c(torch.tanh(self.b(h)))


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_one_multi_tensor_call_per_device_and_dtype(cls):
    """Mixed dtypes: the small bf16 and fp32 parameters are two batches, one call each; the large
    ones are updated in their hooks. Off, every parameter is a single call."""
    m = _Mixed()
    params = list(m.parameters())
    small = [p for p in params if p.dim() <= 1 or (cls is Lomo and p.numel() <= SMALL_NUMEL)]
    for batching in (True, False):
        opt = cls(m, lr=1e-2, batch_small_params=batching)
        calls = _count_calls(opt)
        train_step(opt, m, batch(0), "fused")
        if batching:
            want = {(sum(p.dtype == d for p in small), d) for d in (torch.float32, torch.bfloat16)}
            assert set(calls["multi"]) == want and len(calls["multi"]) == 2
            assert calls["single"] == len(params) - len(small)
        else:
            assert calls == {"single": len(params), "multi": []}
        opt.remove_hooks()


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_the_workspace_is_allocated_once_and_passed_to_every_update(cls):
    m = model()
    opt = cls(m, lr=1e-2)
    ws = opt._workspace(torch.device("cpu"))
    shapes = [tuple(p.shape) for p in m.parameters()]
    small = [tuple(p.shape) for p in m.parameters() if p in opt._small]
    assert ws.dtype == torch.float32 and ws.dim() == 1 and not ws.any()
    assert ws.numel() >= ops.workspace_numel(opt._op, shapes)
    assert ws.numel() >= ops.workspace_numel(opt._multi_op, small)
    seen = set()
    single, multi = opt._impl(ws.device), opt._multi_impl(ws.device)

    def spy(real):
        def call(*args):
            seen.add(args[-1].data_ptr())  # the workspace, the ops' last argument
            real(*args)
        return call

    opt._impls[ws.device], opt._multi_impls[ws.device] = spy(single), spy(multi)
    for step in range(3):
        train_step(opt, m, batch(step), "fused" if step % 2 else "plain")
    assert seen == {ws.data_ptr()} and opt._workspace(ws.device) is ws


def test_adding_a_larger_parameter_grows_the_workspace_once():
    m = model()
    opt = AdaLomo(m, lr=1e-2)
    before = opt._workspace(torch.device("cpu")).numel()
    big = torch.nn.Parameter(torch.randn(5000, 9))
    opt.add_param_group({"params": [big]})
    ws = opt._workspace(torch.device("cpu"))
    assert ws.numel() >= ops.workspace_numel("adalomo_update_", [(5000, 9)]) > before
    (loss_of(m, batch(0)) + big.sum()).backward()
    opt.step()
    assert opt._workspace(torch.device("cpu")) is ws and "exp_avg_sq_row" in opt.state[big]


def _allocations(fn) -> int:
    """CPU allocations while ``fn`` runs: the profiler's raw allocator events of positive size
    (``prof.events()`` folds the ones inside an operator into that operator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.nbytes() > 0)


def _deep(width, layers):
    torch.manual_seed(0)
    mods = [torch.nn.Linear(16, width)]
    for _ in range(layers):
        mods += [torch.nn.Tanh(), torch.nn.LayerNorm(width), torch.nn.Linear(width, width)]
    return torch.nn.Sequential(*mods, torch.nn.Linear(width, 4))


def _stub_kernels(opt, device=torch.device("cpu")):
    """In-place updates that allocate nothing: what the optimizer itself allocates is left."""
    def single(p, g, *args):
        p.sub_(g)

    def multi(params, grads, *args):
        for p, g in zip(params, grads):
            p.sub_(g)

    opt._impls[device], opt._multi_impls[device] = single, multi
    opt._sq_in_kernel[device] = True


@pytest.mark.parametrize("kernels", ["stub"] + [b for b, d in CONTRACT_BACKENDS
                                                 if b != "torch" and d == "cpu"])
@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_no_allocation_per_update(cls, kernels):
    """An optimizer step allocates a fixed number of buffers, however many parameters it updates:
    the allocations of a step beyond a plain backward's are the same for a model with 3 and one
    with 6 layers (the workspace and the accumulators are reused; "stub": kernels that allocate
    nothing, so that the count is the optimizer's own)."""
    extra = []
    for layers in (3, 6):
        counts = []
        for with_opt in (True, False):
            m = _deep(64, layers)
            x = batch(0)
            if with_opt:
                opt = cls(m, lr=1e-3, backend="auto" if kernels == "stub" else kernels)
                if kernels == "stub":
                    _stub_kernels(opt)
                step = lambda: opt.fused_backward(loss_of(m, x), 1e-3)  # noqa: E731
            else:
                for p in m.parameters():
                    p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
                step = lambda: loss_of(m, x).backward()  # noqa: E731
            step()  # state, flags and coefficients exist
            counts.append(_allocations(step))
        extra.append(counts[0] - counts[1])
    assert extra[0] == extra[1], extra


# ---------------------------------------------------------------- failures


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("path", ["plain", "fused"])
def test_a_failing_backward_does_not_update_the_batched_parameters(cls, path):
    """The kernel fails at the 240x300 weight (AdaLomo has updated the last layer's weight
    before it; for Lomo that weight is small): the small parameters whose hooks had fired are not
    updated, no gradient survives, and after step() training goes on as a clean run from
    there."""
    m = model()
    opt = cls(m, lr=1e-2)
    train_step(opt, m, batch(0), "fused")
    clean = copy.deepcopy(m)
    clean_opt = cls(clean, lr=1e-2)
    clean_opt.load_state_dict(opt.state_dict())
    before = snapshot(m, opt)
    real = opt._impl(torch.device("cpu"))
    seen = []

    def failing(p, *args):
        seen.append(p)
        if p.shape == (240, 300):
            raise _Boom("kernel failed")
        real(p, *args)

    opt._impls[torch.device("cpu")] = failing
    with pytest.raises(_Boom) as err:
        train_step(opt, m, batch(1), path)
    msg = str(err.value)
    assert "at parameter 3.weight" in msg
    if cls is AdaLomo:
        assert "1 parameter(s) had already been updated" in msg
        assert re.search(r"nor were the [12] small parameter\(s\) batched for the end", msg)
    else:
        assert "no parameter was changed by this backward and no gradient was kept" in msg
    assert all(p.grad is None for p in m.parameters())
    assert not len(opt._pending)
    after = snapshot(m, opt)
    for p, a, b in zip(m.parameters(), before["params"], after["params"]):
        if p in opt._small:
            assert torch.equal(a, b)  # batched, never updated
    opt._impls[torch.device("cpu")] = real
    opt.step()
    for o, mm in ((opt, m), (clean_opt, clean)):
        train_step(o, mm, batch(2), "plain")
    steps = {n: opt.state[p]["step"] for n, p in m.named_parameters()}
    if cls is Lomo:  # the failed backward changed nothing: the clean run's result
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), clean.parameters()))
        assert set(steps.values()) == {2}
    else:  # only the last layer's weight was updated by the failed backward
        assert steps == {n: 3 if n == "5.weight" else 2 for n in steps}


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_a_failing_batched_update_restores_its_state(cls):
    m = model()
    opt = cls(m, lr=1e-2)
    train_step(opt, m, batch(0), "fused")
    small_state = {id(p): dict(opt.state[p]) for p in opt._small}
    real = opt._multi_impl(torch.device("cpu"))
    opt._multi_impls[torch.device("cpu")] = lambda *a: (_ for _ in ()).throw(_Boom("multi"))
    with pytest.raises(_Boom, match="in the batched update of .* small torch.float32 parameter"):
        loss_of(m, batch(1)).backward()
    assert all(p.grad is None for p in m.parameters())
    for p in opt._small:
        assert opt.state[p]["step"] == small_state[id(p)]["step"] == 1
    opt._multi_impls[torch.device("cpu")] = real
    opt.step()
    loss_of(m, batch(2)).backward()  # the batched parameters were not marked as updated
    opt.step()
    assert all(opt.state[p]["step"] == 2 for p in opt._small)


def test_an_error_outside_the_optimizer_drops_the_batch():
    """A user's gradient hook raises after some small parameters were batched: their gradients
    are dropped (nothing updated by them), and the next backward runs."""
    m = model()
    opt = Lomo(m, lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    h = m[0].weight.register_hook(lambda g: (_ for _ in ()).throw(ValueError("user hook")))
    with pytest.raises(ValueError, match="user hook"):
        opt.fused_backward(loss_of(m, batch(0)), 1e-2)
    h.remove()
    assert not len(opt._pending)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()) if a.dim() <= 1)
    opt.step()  # (3.weight was updated before the error: the step is over)
    h = m[0].weight.register_hook(lambda g: (_ for _ in ()).throw(ValueError("user hook")))
    with pytest.raises(ValueError, match="user hook"):
        loss_of(m, batch(0)).backward()  # plain: no cleanup runs until the next backward
    h.remove()
    assert len(opt._pending) > 0
    opt.step()
    assert not len(opt._pending)
    loss_of(m, batch(1)).backward()
    opt.step()
    assert all(opt.state[p]["step"] == (3 if p is m[3].weight else 1) for p in m.parameters())


def test_a_second_gradient_for_a_batched_parameter_is_refused():
    m = model()
    opt = AdaLomo(m, lr=1e-2)
    loss_of(m, batch(0)).backward()
    before = [p.detach().clone() for p in m.parameters()]
    assert m[5].bias in opt._small  # its hook fires first
    with pytest.raises(RuntimeError, match=r"parameter 5\.bias received a second gradient"):
        loss_of(m, batch(0)).backward()
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_a_recreated_optimizer_batches_its_own_parameters():
    """Re-running the notebook cell: the new optimizer takes over, its batches update each small
    parameter once per step, the old one updates nothing."""
    m, ref = model(), model()
    old = Lomo(m, lr=1e-2)
    ref_opt = Lomo(ref, lr=1e-2, batch_small_params=False)
    train_step(old, m, batch(0), "fused")
    train_step(ref_opt, ref, batch(0), "fused")
    old_norm = old.last_grad_norm.clone()
    with pytest.warns(OptimizerReplacedWarning):
        new = Lomo(m, lr=1e-2)
    for step in (1, 2):
        train_step(new, m, batch(step), "plain")
        train_step(ref_opt, ref, batch(step), "plain")
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))
    assert torch.equal(old.last_grad_norm, old_norm)
    assert torch.equal(new.last_grad_norm, ref_opt.last_grad_norm)


def test_parameters_on_several_devices_get_their_own_buffers():
    """Each device has its accumulator and a workspace sized for the parameters there (meta
    stands in for a second device: no GPU is needed to build the buffers)."""
    cpu = [torch.nn.Parameter(torch.randn(37, 129)), torch.nn.Parameter(torch.randn(37))]
    meta = [torch.nn.Parameter(torch.empty(300, 500, device="meta")),
            torch.nn.Parameter(torch.empty(500, device="meta", dtype=torch.bfloat16))]
    opt = AdaLomo(cpu + meta, lr=1e-2, backend="torch")
    for device, params in ((torch.device("cpu"), cpu), (torch.device("meta"), meta)):
        ws = opt._workspace(device)
        assert ws.device == device
        assert ws.numel() == ops.workspace_numel("adalomo_update_", [p.shape for p in params],
                                                 backend="torch", device=device)
        assert opt._buffers.grad_sq[device].device == device
    assert opt._accumulator(meta[1]) is not opt._accumulator(meta[0])
    assert {p for p in opt._small} == {cpu[1], meta[1]}
