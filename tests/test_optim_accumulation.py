"""Gradient accumulation (``accumulation_steps=K``): K micro-batches (loss / K) and one update
equal one K=1 step on the whole batch (fp32: relative 1e-5), on every backend and both backward
paths, with exact global-norm clipping from one backward per micro-batch; parameters never change
inside a window; the window's limits, failures and state_dict."""

import copy
import math
import warnings

import pytest
import torch
from optim_helpers import OPT_BACKENDS

from lomo_kernels import AdaLomo, GaLore, GoLore, Lomo, NonFiniteGradientWarning
from lomo_kernels.optim._window import WindowFullError

K = 4
STEPS = 3
CASES = {
    "lomo": (Lomo, dict(lr=0.05)),
    "adalomo": (AdaLomo, dict(lr=0.01)),
    "golore": (GoLore, dict(lr=0.01, rank=4, update_proj_gap=2)),
}


def model(dtype=torch.float32, seed=0):
    """Small (batched) and large parameters; 2-D weights of ranks above GoLore's rank 4."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 64), torch.nn.Tanh(), torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 5),
    ).to(dtype)


def data(step, n=4 * K):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 12, generator=gen), torch.randn(n, 5, generator=gen)


def loss_of(m, x, y):
    return (m(x.to(next(m.parameters()).dtype)).float() - y).pow(2).mean()


def flat(m):
    return torch.cat([p.detach().double().flatten() for p in m.parameters()])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def train(name, k, backend, path="fused", clip=None, steps=STEPS, micro=None, dtype=torch.float32,
          n=4 * K, **extra):
    """``steps`` updates on batches of ``n``; k > 1: ``micro`` (default k) micro-batches of
    loss / micro per update."""
    cls, kw = CASES[name]
    m = model(dtype)
    opt = cls(m, **kw, backend=backend, clip_grad_norm=clip, accumulation_steps=k, **extra)
    for step in range(steps):
        x, y = data(step, n)
        if k == 1:
            if clip is not None:
                opt.grad_norm(loss_of(m, x, y))
            if path == "fused":
                opt.fused_backward(loss_of(m, x, y), kw["lr"])
            else:
                loss_of(m, x, y).backward()
                opt.step()
            continue
        parts = micro or k
        for i in range(parts):
            part = loss_of(m, x[i::parts], y[i::parts]) / parts
            if path == "fused":
                opt.fused_backward(part, kw["lr"])
            else:
                part.backward()
        if path != "fused" or parts < k:
            opt.step()
    return m, opt


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_k_micro_batches_equal_one_step_on_the_whole_batch(backend, name, path):
    want, ref = train(name, 1, backend, path)
    got, opt = train(name, K, backend, path)
    assert rel(flat(got), flat(want)) <= 1e-5
    if name != "golore":  # (GoLore's low-rank weights report the norm of their projected sum)
        assert math.isclose(opt.last_grad_norm.item(), ref.last_grad_norm.item(), rel_tol=1e-5)


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_exact_clipping_without_grad_norm(backend, name, path):
    """K=1: grad_norm(loss) + fused_backward; K=4: one backward per micro-batch, no grad_norm."""
    want, _ = train(name, 1, backend, "fused", clip=0.05)
    got, opt = train(name, K, backend, path, clip=0.05)
    assert opt.clip_coef.item() < 0.9  # the clipping was active
    assert rel(flat(got), flat(want)) <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_step_after_fewer_backwards_applies_what_was_accumulated(name):
    """The Trainer's last window of an epoch: 3 of 4 micro-batches, each loss / 3."""
    want, _ = train(name, 1, "torch", n=12)
    got, _ = train(name, K, "torch", path="plain", micro=3, n=12)
    assert rel(flat(got), flat(want)) <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_do_not_change_inside_a_window(name):
    cls, kw = CASES[name]
    m = model()
    opt = cls(m, **kw, backend="torch", accumulation_steps=K)
    before = flat(m)
    x, y = data(0)
    for i in range(K - 1):
        opt.fused_backward(loss_of(m, x[i::K], y[i::K]) / K, kw["lr"])
        assert torch.equal(flat(m), before)
        assert all(p.grad is None for p in m.parameters())
    opt.fused_backward(loss_of(m, x[K - 1::K], y[K - 1::K]) / K, kw["lr"])
    assert not torch.equal(flat(m), before)


def test_accumulation_steps_one_is_the_default_bitwise():
    a, _ = train("adalomo", 1, "torch")
    m = model()
    opt = AdaLomo(m, lr=0.01, backend="torch")
    for step in range(STEPS):
        opt.fused_backward(loss_of(m, *data(step)), 0.01)
    assert torch.equal(flat(a), flat(m))


@pytest.mark.parametrize("name", list(CASES))
def test_a_backward_beyond_the_window_is_refused_and_changes_nothing(name):
    cls, kw = CASES[name]
    m = model()
    opt = cls(m, **kw, backend="torch", accumulation_steps=2)
    x, y = data(0)
    loss_of(m, x[0::2], y[0::2]).div(2).backward()
    loss_of(m, x[1::2], y[1::2]).div(2).backward()
    before = flat(m)
    with pytest.raises(WindowFullError, match="accumulation_steps=2 backwards have been"):
        loss_of(m, x, y).backward()
    assert torch.equal(flat(m), before)
    with pytest.raises(WindowFullError):
        opt.fused_backward(loss_of(m, x, y), 0.01)
    opt.step()  # the two kept micro-batches
    want, _ = train(name, 1, "torch", steps=1)
    assert rel(flat(m), flat(want)) <= 1e-5


def test_grad_norm_is_refused_with_accumulation():
    m = model()
    opt = Lomo(m, lr=0.01, clip_grad_norm=1.0, accumulation_steps=2, backend="torch")
    with pytest.raises(ValueError, match="grad_norm\\(\\) is not needed with accumulation_steps"):
        opt.grad_norm(loss_of(m, *data(0)))


def test_arguments_are_checked():
    m = model()
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1"):
        Lomo(m, accumulation_steps=0)
    with pytest.raises(TypeError, match="accumulation_steps must be an integer"):
        AdaLomo(m, accumulation_steps=2.0)
    with pytest.raises(ValueError, match="accumulation_dtype must be torch.float32, 'float32' or"):
        GoLore(m, accumulation_steps=2, accumulation_dtype=torch.bfloat16)
    opt = AdaLomo(m, accumulation_steps=3, accumulation_dtype=torch.float32)
    assert opt.accumulation_steps == 3 and "accumulation_steps=3" in repr(opt)


class Boom(RuntimeError):
    pass


def _explode_at(m, index):
    """A tensor hook that raises when the gradient of parameter ``index`` is computed (outside
    the optimizer's hooks, like an out-of-memory error inside autograd)."""
    p = list(m.parameters())[index]

    def hook(g):
        raise Boom("injected")

    return p.register_hook(hook)


def test_a_failed_fused_backward_drops_the_window_and_says_so():
    m = model()
    opt = Lomo(m, lr=0.05, accumulation_steps=K, backend="torch")
    x, y = data(0)
    opt.fused_backward(loss_of(m, x[0::K], y[0::K]) / K, 0.05)
    before = flat(m)
    handle = _explode_at(m, 0)  # the first layer: later layers accumulated already
    with pytest.raises(Boom) as info:
        opt.fused_backward(loss_of(m, x[1::K], y[1::K]) / K, 0.05)
    handle.remove()
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "accumulation window was dropped" in notes or not hasattr(info.value, "add_note")
    assert torch.equal(flat(m), before)
    # a new window: K micro-batches from here give exactly a K=1 step
    for i in range(K):
        opt.fused_backward(loss_of(m, x[i::K], y[i::K]) / K, 0.05)
    want, _ = train("lomo", 1, "torch", steps=1)
    assert rel(flat(m), flat(want)) <= 1e-5


def test_a_plain_backward_that_failed_outside_the_hooks_makes_step_raise():
    m = model()
    opt = AdaLomo(m, lr=0.01, accumulation_steps=K, backend="torch")
    x, y = data(0)
    loss_of(m, x[0::K], y[0::K]).backward()
    handle = _explode_at(m, 0)
    with pytest.raises(Boom):
        loss_of(m, x[1::K], y[1::K]).backward()
    handle.remove()
    before = flat(m)
    with pytest.raises(RuntimeError, match="the accumulation window was dropped"):
        opt.step()
    assert torch.equal(flat(m), before)
    for i in range(K):
        (loss_of(m, x[i::K], y[i::K]) / K).backward()
    opt.step()
    want, _ = train("adalomo", 1, "torch", steps=1)
    assert rel(flat(m), flat(want)) <= 1e-5


def test_an_error_in_a_hook_drops_the_window():
    m = model()
    opt = Lomo(m, lr=0.05, accumulation_steps=K, backend="torch")
    x, y = data(0)
    loss_of(m, x[0::K], y[0::K]).backward()
    opt.param_groups[0]["lr"] = float("nan")  # found at the first hook, before anything
    with pytest.raises(ValueError, match="earlier backward\\(s\\) of this accumulation window are"):
        loss_of(m, x[1::K], y[1::K]).backward()
    assert opt._window.count == 1  # kept
    opt.param_groups[0]["lr"] = 0.05
    real = opt._accumulate_into
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("kernel failure")
        return real(*args, **kwargs)

    opt._accumulate_into = failing
    with pytest.raises(RuntimeError, match="the accumulation window was dropped: the gradients of "
                                           "this backward and of the 1 earlier"):
        loss_of(m, x[1::K], y[1::K]).backward()
    assert opt._window.count == 0
    del opt._accumulate_into
    before = flat(m)
    opt.step()  # nothing to apply
    assert torch.equal(flat(m), before)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_mid_window_resumes_bitwise(name):
    cls, kw = CASES[name]
    x, y = data(0)

    def run(split):
        m = model()
        opt = cls(m, **kw, backend="torch", accumulation_steps=K)
        opt.fused_backward(loss_of(m, *data(5)), kw["lr"])  # (K backwards of a first window)
        for i in range(1, K):
            opt.fused_backward(loss_of(m, *data(5 + i)), kw["lr"])
        for i in range(K):
            if i == split:
                sd = copy.deepcopy(opt.state_dict())
                m2 = copy.deepcopy(m)
                opt = cls(m2, **kw, backend="torch", accumulation_steps=K)
                opt.load_state_dict(sd)
                m = m2
            opt.fused_backward(loss_of(m, x[i::K], y[i::K]) / K, kw["lr"])
        return flat(m)

    straight = run(split=-1)
    for split in (1, 3):
        assert torch.equal(run(split), straight)


def test_state_dict_of_another_window_size_is_refused():
    m = model()
    opt = Lomo(m, lr=0.05, accumulation_steps=K, backend="torch")
    loss_of(m, *data(0)).backward()
    sd = opt.state_dict()
    other = Lomo(copy.deepcopy(m), lr=0.05, accumulation_steps=2, backend="torch")
    with pytest.raises(ValueError, match="saved inside a window of accumulation_steps=4"):
        other.load_state_dict(sd)


def test_non_finite_micro_batch_leaves_those_elements_and_warns_at_step():
    m = model()
    opt = Lomo(m, lr=0.05, accumulation_steps=2, backend="torch")
    w = m[0].weight
    before = w.detach().clone()
    x, y = data(0)
    loss_of(m, x[0::2], y[0::2]).backward()
    handle = w.register_hook(lambda g: g.index_fill(0, torch.tensor([3]), float("nan")))
    loss_of(m, x[1::2], y[1::2]).backward()
    handle.remove()
    with pytest.warns(NonFiniteGradientWarning):
        opt.step()
    assert torch.equal(w[3], before[3])
    assert not torch.equal(w[4], before[4])


def test_exact_clipping_skips_a_window_with_a_non_finite_norm():
    m = model()
    opt = AdaLomo(m, lr=0.01, clip_grad_norm=1.0, accumulation_steps=2, backend="torch")
    before = flat(m)
    x, y = data(0)
    handle = m[0].weight.register_hook(lambda g: g * float("inf"))
    loss_of(m, x, y).backward()
    handle.remove()
    loss_of(m, x, y).backward()
    with pytest.warns(NonFiniteGradientWarning, match="update was skipped"):
        opt.step()
    assert torch.equal(flat(m), before)
    assert all(s.get("step", 0) == 0 for s in opt.state.values())


@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_bf16_parameters_with_float32_buffers_apply_the_exact_sum(backend):
    """16-bit parameters, float32 buffers: the update kernels of every backend read the exact
    float32 sum of the micro-batch gradients (what one update of the summed gradient gives,
    within 1 ulp), never the sum rounded to bfloat16."""
    m = model(torch.bfloat16)
    ref = copy.deepcopy(m)
    opt = Lomo(m, lr=0.05, accumulation_steps=K, backend=backend)
    x, y = data(0)
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in ref.parameters()]
    for i in range(K):
        (loss_of(m, x[i::K], y[i::K]) / K).backward()
        ref.zero_grad()
        (loss_of(ref, x[i::K], y[i::K]) / K).backward()
        for s, p in zip(grads, ref.parameters()):
            s += p.grad.double()
    opt.step()
    for p, p0, s in zip(m.parameters(), ref.parameters(), grads):
        want = (p0.detach().double() - 0.05 * s).to(torch.bfloat16)
        diff = (p.detach().view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert diff.max().item() <= 1


def test_param_dtype_buffers_are_close_to_float32_buffers():
    a, _ = train("adalomo", K, "torch", dtype=torch.bfloat16)
    b, opt = train("adalomo", K, "torch", dtype=torch.bfloat16, accumulation_dtype="param")
    assert all(buf.dtype == torch.bfloat16 for buf in opt._window.buffers.values())
    assert rel(flat(b), flat(a)) <= 2e-2


def test_golore_accumulates_rank_r_buffers_only():
    _, opt = train("golore", K, "torch")
    for p, buf in opt._window.buffers.items():
        if p.dim() == 2:
            assert buf.numel() == max(p.shape) * 4  # R: max(m, n) x rank, float32
    _, exact = train("golore", K, "torch", clip=1.0)
    assert any(buf.shape == p.shape and p.dim() == 2 for p, buf in exact._window.buffers.items())


def test_galore_draws_its_projector_from_the_first_micro_batch():
    m = model()
    opt = GaLore(m, lr=0.01, rank=4, accumulation_steps=2, backend="torch")
    ref = copy.deepcopy(m)
    x, y = data(0)
    loss_of(ref, x[0::2], y[0::2]).div(2).backward()
    g = ref[3].weight.grad
    for i in range(2):
        loss_of(m, x[i::2], y[i::2]).div(2).backward()
    proj = opt.state[m[3].weight]["projector"]  # (300 x 64: projected on the right, 64 x 4)
    _, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    top = vh[:4].T
    overlap = torch.linalg.svdvals(top.T @ proj.double())
    assert overlap.min().item() > 0.99  # the same subspace
    opt.step()
    assert opt.state[m[3].weight]["step"] == 1


def test_last_grad_norm_is_the_norm_of_the_summed_gradient():
    m = model()
    ref = copy.deepcopy(m)
    opt = AdaLomo(m, lr=0.01, accumulation_steps=K, backend="torch")
    x, y = data(0)
    loss_of(ref, x, y).backward()
    want = torch.cat([p.grad.double().flatten() for p in ref.parameters()]).norm().item()
    for i in range(K):
        (loss_of(m, x[i::K], y[i::K]) / K).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert math.isclose(opt.last_grad_norm.item(), want, rel_tol=1e-5)


def test_the_documented_example_runs():
    """docs/accumulation.md's example (it asserts its own result)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "accumulation.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "accumulation_steps=K" in code and "assert_close" in code
    exec(compile(code, "docs/accumulation.md", "exec"), {})
