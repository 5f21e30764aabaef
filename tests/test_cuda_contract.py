"""The CUDA kernels' launch structure and determinism, run through the SIMT emulation
(``cuda_emulated``): how many kernels an update launches, that a workspace makes a call allocate
nothing and comes back reusable (integer tickets at zero), and that results are bitwise identical
run to run and whatever the number of OS threads running the blocks. The numerics of the op contract
(grad_sq, workspaces, stages, multi-tensor ops) are tested in test_op_contract.py."""

import pytest
import torch
from conftest import requires_cuda_emulation
from test_op_contract import _rand, _state

from lomo_kernels import ops

pytestmark = requires_cuda_emulation
B = "cuda_emulated"



def _ws(op, shapes):
    return torch.zeros(ops.workspace_numel(op, shapes, backend=B, device="cpu"))


def _launches(fn):
    ops.reset_emulated_launch_count()
    fn()
    return ops.emulated_launch_count()


def _adalomo(p, g, st, ws=None, acc=None, **kw):
    h = dict(lr=1e-2, beta=0.3, weight_decay=0.1, loss_scale=4.0, clip_grad_value=0.5,
             clip_coef=torch.tensor(0.8))
    h.update(kw)
    ops.adalomo_update_(p, g, **st, **h, grad_sq=acc, workspace=ws, backend=B)


# (shape, launches of the one-call update): 3 passes for factored parameters, one fused launch for
# a small unfactored one, stats + apply for a large one
ADALOMO_LAUNCHES = [((37, 129), 3), ((3, 17, 33), 3), ((300, 7, 9), 3), ((1, 4096), 3),
                    ((4096, 1), 3), ((4097,), 1), ((), 1), ((200_000,), 2)]


@pytest.mark.parametrize("shape,want", ADALOMO_LAUNCHES, ids=str)
def test_adalomo_launches_at_most_three_kernels(shape, want):
    p, g = _rand(shape, torch.bfloat16, seed=1), _rand(shape, torch.bfloat16, 0.1, seed=2)
    ws = _ws("adalomo_update_", [shape])
    assert _launches(lambda: _adalomo(p, g, _state(shape), ws, torch.zeros(1))) == want
    assert _launches(lambda: _adalomo(p, g, _state(shape))) == want  # scratch: no memset kernel


@pytest.mark.parametrize("shape", [(37, 129), (3, 17, 33), (4097,)], ids=str)
def test_adalomo_stages_launch_one_kernel_each(shape):
    p, g = _rand(shape, torch.float16, seed=1), _rand(shape, torch.float16, 0.1, seed=2)
    st, ws = _state(shape), _ws("adalomo_update_", [shape])
    counts = [_launches(lambda s=s: _adalomo(p, g, st, ws, stage=s)) for s in (1, 2, 3)]
    # an unfactored parameter has sum(u*u) already after stage 1
    assert counts == ([1, 0, 1] if len(shape) < 2 else [1, 1, 1])


def test_lomo_and_multi_tensor_ops_launch_once_per_dtype():
    p, g = _rand((999,), torch.bfloat16, seed=1), _rand((999,), torch.bfloat16, seed=2)
    assert _launches(lambda: ops.lomo_update_(p, g, lr=0.1, grad_sq=torch.zeros(1),
                                              backend=B)) == 1
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    shapes = [(7,), (4096,), (), (65536,), (33,)]
    ps = [_rand(s, d, seed=i) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    gs = [_rand(s, d, 0.1, seed=9 + i) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    vs = [torch.rand(s) + 0.1 for s in shapes]
    acc = torch.zeros(1)
    for op, call in (("lomo_update_multi_", lambda ws: ops.lomo_update_multi_(
            ps, gs, lr=0.1, grad_sq=acc, workspace=ws, backend=B)),
            ("adalomo_update_multi_", lambda ws: ops.adalomo_update_multi_(
                ps, gs, vs, lr=0.1, beta=0.5, grad_sq=acc, workspace=ws, backend=B))):
        assert _launches(lambda: call(_ws(op, shapes))) == 2, op  # bf16, fp32


def _aten_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


@pytest.mark.parametrize("shape", [(37, 129), (4097,)], ids=str)
def test_a_workspace_makes_a_call_allocate_nothing(shape):
    p, g = _rand(shape, torch.bfloat16, seed=1), _rand(shape, torch.bfloat16, 0.1, seed=2)
    st, acc = _state(shape), torch.zeros(1)
    ws = {op: _ws(op, [shape]) for op in ("adalomo_update_", "lomo_update_")}
    impl = ops.get_impl("adalomo_update_", B, "cpu")
    lomo = ops.get_impl("lomo_update_", B, "cpu")
    args = (st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"), st.get("exp_avg_sq"), None, None,
            1e-2, 0.1, 4.0, 0.5, 0.3, 1e-30, 1e-3, 1.0, "nearest", 0, 1, acc)
    assert _aten_ops(lambda: impl(p, g, *args, ws["adalomo_update_"])) == set()
    assert _aten_ops(lambda: lomo(p, g, None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 1, acc,
                                  ws["lomo_update_"])) == set()
    # without a workspace the op allocates (and zeroes) its scratch: the check above can fail
    assert "aten::zeros" in _aten_ops(lambda: impl(p, g, *args, None))


@pytest.mark.parametrize("shape", [(37, 129), (700, 96), (5, 33, 40), (4097,), (100_000,)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adalomo_is_bitwise_deterministic_and_leaves_the_workspace_reusable(shape, dtype):
    """The same call twice on one workspace, and with 1 and 2 OS threads, gives the same bits:
    the parameter, the state, grad_sq, and the whole workspace (whose tickets are back at zero, or
    the second call would leave other values in them)."""
    p0, g = _rand(shape, dtype, seed=1), _rand(shape, dtype, 0.1, seed=2)
    ws = _ws("adalomo_update_", [shape])
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            p, st, acc = p0.clone(), _state(shape), torch.full((1,), 0.25)
            rounding = "stochastic" if dtype != torch.float32 else "nearest"
            _adalomo(p, g, st, ws, acc, rounding=rounding, seed=7, step=3)
            outs.append([p, acc, ws.clone(), *st.values()])
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
    assert not torch.equal(outs[0][0], p0)  # the update did something


def test_lomo_peels_an_unaligned_view_and_matches_the_aligned_update():
    """A view 3 elements past a 16-byte boundary in both p and g (peeled: the body still moves in
    16-byte packs; the emulator rejects a misaligned one) gives bitwise the aligned update."""
    n = 5000
    base_p, base_g = _rand((n + 3,), torch.bfloat16, seed=1), _rand((n + 3,), torch.bfloat16, seed=2)
    p_view, g_view = base_p[3:], base_g[3:]
    p_al, g_al = p_view.clone(), g_view.clone()
    for p, g in ((p_view, g_view), (p_al, g_al)):
        acc = torch.zeros(1)
        ops.lomo_update_(p, g, lr=0.01, weight_decay=0.1, rounding="nearest", grad_sq=acc,
                         backend=B)
    assert torch.equal(p_view, p_al)
