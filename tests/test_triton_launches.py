"""Launch counts and compiled-variant counts of the Triton backend, observed without a GPU.

* The launches the interpreter actually makes equal ``triton_kernels.launches`` (the count that
  bench/ models), and stay within the pass structure of docs/spec.md: one launch per LOMO update,
  at most three per AdaLomo update, one per dtype for a list of small tensors.
* A whole Llama-3-8B (meta tensors, launches recorded and not run) needs at most 3 compiled
  variants per kernel and dtype under Triton's own specialisation rules (its binder: integer
  divisibility by 16, == 1, 16-byte pointer alignment), and a new lr, step or loss-scale value
  never adds one.
* With a workspace a call runs no tensor op at all (no allocation, no view, no memset), except
  the one host-to-device copy of a multi-tensor table.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import requires_triton
from triton_launches import cache_key, capture

import lomo_kernels.triton_kernels as tk
from lomo_kernels import ops

pytestmark = requires_triton

# Llama-3-8B: 32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256 untied
LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
         (4096, 14336), (4096,), (4096,)]
LLAMA3_8B = [(128256, 4096)] + LAYER * 32 + [(4096,), (128256, 4096)]
MATRICES = [s for s in LLAMA3_8B if len(s) == 2]
NORMS = [s for s in LLAMA3_8B if len(s) == 1]


def _f32(n, device="meta"):
    return torch.zeros(n, dtype=torch.float32, device=device)


def _prepare(op, shapes, dtype, device, *, ws=True, grad_sq=True, step=7, lr=1e-3,
             loss_scale=1024.0, rounding="stochastic", data=None):
    """A function that calls ``op`` on tensors of ``shapes`` (one shape for single-tensor ops),
    all made beforehand (the workspace too: every call reuses it)."""
    multi = op.endswith("multi_")
    shapes = list(shapes) if multi else [shapes]
    if data is None:
        data = [torch.randn(s).to(dtype) if device != "meta" else
                torch.empty(s, dtype=dtype, device=device) for s in shapes]
    grads = [p.clone() * 0.01 for p in data] if device != "meta" else data
    cc, fi = _f32(1, device), _f32(1, device)
    gsq = _f32(1, device) if grad_sq else None
    w = _f32(tk.workspace_numel(op, shapes), device) if ws else None
    k = len(shapes)
    if op == "lomo_update_":
        return lambda: tk.lomo_update_(data[0], grads[0], cc, fi, lr, 0.01, loss_scale, 1.0,
                                       rounding, 3, step, gsq, w)
    if op == "lomo_update_multi_":
        return lambda: tk.lomo_update_multi_(data, grads, cc, fi, [lr] * k, [0.01] * k,
                                             loss_scale, [1.0] * k, rounding, [3] * k, [step] * k,
                                             gsq, w)
    if op == "adalomo_update_":
        st = {n: _f32(math.prod(s), device) + 0.5
              for n, s in ops.adalomo_state_shapes(shapes[0]).items()}
        return lambda: tk.adalomo_update_(
            data[0], grads[0], st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
            st.get("exp_avg_sq"), cc, fi, lr, 0.01, loss_scale, 1.0, 1 - step ** -0.8, 1e-30,
            1e-3, 1.0, rounding, 3, step, gsq, w)
    vs = [_f32(math.prod(s), device) + 0.5 for s in shapes]
    return lambda: tk.adalomo_update_multi_(
        data, grads, vs, cc, fi, [lr] * k, [0.01] * k, loss_scale, [1.0] * k, [0.3] * k,
        [1e-30] * k, [1e-3] * k, [1.0] * k, rounding, [3] * k, [step] * k, gsq, w)


def _call(op, shapes, dtype, device, **kw):
    _prepare(op, shapes, dtype, device, **kw)()


CASES = [("lomo_update_", (7,)), ("lomo_update_", (3 * 4096 + 5,)), ("lomo_update_", (37, 129)),
         ("adalomo_update_", (37, 129)), ("adalomo_update_", (3, 17, 33)),
         ("adalomo_update_", (4096,)), ("adalomo_update_", (4097,)), ("adalomo_update_", ()),
         ("lomo_update_multi_", [(7,), (4096,), (9000,)]),
         ("adalomo_update_multi_", [(7,), (4096,), ()]),
         ("adalomo_update_multi_", [(7,), (4097,)])]


@pytest.mark.parametrize("op,shape", CASES, ids=str)
def test_observed_launches_match_the_plan(op, shape):
    with capture(run=True) as seen:
        _call(op, shape, torch.bfloat16, "cpu")
    assert len(seen) == tk.launches(op, shape)
    limit = {"lomo_update_": 1, "adalomo_update_": 3, "lomo_update_multi_": 1,
             "adalomo_update_multi_": 1}[op]
    assert 1 <= len(seen) <= limit


def test_staged_launches_match_the_plan():
    for shape in [(37, 129), (4097,), (7,)]:
        p = torch.randn(shape).to(torch.bfloat16)
        st = ops.adalomo_state_shapes(shape)
        st = {k: torch.rand(s) + 0.1 for k, s in st.items()}
        ws = torch.zeros(tk.workspace_numel("adalomo_update_", [shape]))
        for stage in (1, 2, 3):
            with capture(run=True) as seen:
                tk.adalomo_update_(p, p * 0.01, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
                                   st.get("exp_avg_sq"), None, None, 1e-3, 0.0, 1.0, 0.0, 0.5,
                                   1e-30, 1e-3, 1.0, "nearest", 0, 1, None, ws, stage)
            assert len(seen) == tk.launches("adalomo_update_", shape, stage) <= 1


def test_multi_tensor_launches_one_per_dtype():
    shapes = [(7,), (33,), (5,)]
    data = [torch.randn(s).to(d) for s, d in zip(shapes, (torch.bfloat16, torch.float32,
                                                          torch.bfloat16))]
    for op in ("lomo_update_multi_", "adalomo_update_multi_"):
        with capture(run=True) as seen:
            _call(op, shapes, None, "cpu", data=[d.clone() for d in data])
        assert len(seen) == 2 == tk.launches(op, shapes, dtypes=[d.dtype for d in data])


class _AtenLog(TorchDispatchMode):
    """Every aten op run while active (allocations, views, copies, fills)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op,shape", CASES, ids=str)
def test_with_a_workspace_a_call_creates_no_tensor(op, shape):
    # After a first call (which may set up the multi-tensor staging buffer), a call with a
    # workspace runs no aten op but the one host-to-device copy of a multi-tensor table: no
    # allocation, no view, no memset.
    call = _prepare(op, shape, torch.bfloat16, "cpu")
    with capture():
        call()
        log = _AtenLog()
        with log:
            call()
    assert log.ops == (["copy_"] if op.endswith("multi_") else []), log.ops


def _llama_step_launches(op_matrix, multi_norms):
    count = sum(tk.launches(op_matrix, s) for s in MATRICES)
    if multi_norms:
        return count + tk.launches(op_matrix.replace("update_", "update_multi_"), NORMS)
    return count + sum(tk.launches(op_matrix, s) for s in NORMS)


def test_llama3_8b_step_launch_counts():
    assert len(MATRICES) == 226 and len(NORMS) == 65
    assert _llama_step_launches("lomo_update_", False) == 291
    assert _llama_step_launches("lomo_update_", True) == 227
    assert _llama_step_launches("adalomo_update_", False) == 226 * 3 + 65
    assert _llama_step_launches("adalomo_update_", True) == 226 * 3 + 1


def _variants(ops_and_shapes, **kw):
    """{(kernel name, dtype): set of Triton cache keys} over the recorded launches."""
    keys: dict = {}
    with capture() as seen:
        for op, shape in ops_and_shapes:
            _call(op, shape, torch.bfloat16, "meta", **kw)
    for kernel, grid, args, kwargs in seen:
        name = (kernel.fn.__name__, str(args[0].dtype))
        keys.setdefault(name, set()).add(cache_key(kernel, args, kwargs))
    return keys


@pytest.mark.parametrize("config", [dict(), dict(grad_sq=False, loss_scale=1.0),
                                    dict(rounding="nearest", loss_scale=3000.0)], ids=str)
def test_llama3_8b_needs_at_most_three_variants_per_kernel(config):
    calls = [(op, s) for s in LLAMA3_8B for op in ("lomo_update_", "adalomo_update_")]
    calls += [("lomo_update_multi_", NORMS), ("adalomo_update_multi_", NORMS)]
    keys = _variants(calls, **config)
    assert {name for name, _ in keys} >= {"_lomo_update_kernel", "_adalomo_stats_kernel",
                                          "_adalomo_unorm_kernel", "_adalomo_apply_kernel",
                                          "_vector_kernel", "_lomo_update_multi_kernel",
                                          "_vector_multi_kernel"}
    assert all(len(v) <= 3 for v in keys.values()), {k: len(v) for k, v in keys.items()}
    # per-step values are runtime arguments: other lr, step and loss-scale values add nothing
    again = _variants(calls, step=123457, lr=0.37, **dict(config, loss_scale=config.get(
        "loss_scale", 1024.0) * (4 if config.get("loss_scale", 1024.0) != 1.0 else 1)))
    assert again == keys
