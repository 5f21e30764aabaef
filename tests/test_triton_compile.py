"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, with no GPU needed.

The interpreter runs the kernels' Python, not the compiler: this catches what only compilation
rejects (non-constexpr globals, type errors in untaken constexpr branches, ...) and checks in the
PTX and the cubin what the design relies on: 16-byte vector loads/stores in the hot loops, IEEE
division and square root (no div.full / approx), no fp contraction in AdaLomo, the register
budget of the stochastic-rounding apply kernels and no spills. The kernels are compiled exactly as
``JITFunction.run`` would compile the launches the real launchers make (recorded on meta tensors,
see triton_launches.py), so the specialisation (pointer alignment, integer divisibility) is the
one a training run gets.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import requires_triton

pytestmark = requires_triton

# Static budgets of the Triton kernels (sm_90, offline compile).
TRITON_SR_APPLY_MAX_REGISTERS = 96  # bf16 stochastic-rounding apply kernels, per thread
TRITON_MAX_SPILL_BYTES = 0  # every kernel: no stack frame, no local memory

_SCRIPT = r"""
import json, re, sys
import torch
sys.path.insert(0, sys.argv[1])
from triton_launches import capture, compile_sm90, resources
import lomo_kernels.triton_kernels as tk

def t(shape, dtype=torch.bfloat16, offset=0):
    n = 1
    for d in shape:
        n *= d
    return torch.empty(n + offset, dtype=dtype, device="meta")[offset:].view(shape)

def f(n=1):
    return torch.empty(n, dtype=torch.float32, device="meta")

def ws(op, shapes):
    return f(tk.workspace_numel(op, shapes))

def lomo(shape, dtype, loss_scale=1024.0, gsq=True, offset=0):
    p = t(shape, dtype, offset)
    tk.lomo_update_(p, t(shape, dtype, offset), f(), f(), 1e-3, 0.01, loss_scale, 1.0,
                    "stochastic", 1, 2, f() if gsq else None, ws("lomo_update_", [shape]))

def adalomo(shape, dtype):
    st = {k: f(max(1, torch.Size(s).numel())) for k, s in
          __import__("lomo_kernels").ops.adalomo_state_shapes(shape).items()}
    tk.adalomo_update_(t(shape, dtype), t(shape, dtype), st.get("exp_avg_sq_row"),
                       st.get("exp_avg_sq_col"), st.get("exp_avg_sq"), f(), f(), 1e-3, 0.01,
                       1024.0, 1.0, 0.5, 1e-30, 1e-3, 1.0, "stochastic", 1, 2, f(),
                       ws("adalomo_update_", [shape]))

def multi(op, shapes, dtype=torch.bfloat16):
    k = len(shapes)
    ps = [t(s, dtype) for s in shapes]
    if op == "lomo_update_multi_":
        tk.lomo_update_multi_(ps, ps, f(), f(), [1e-3] * k, [0.01] * k, 1024.0, [1.0] * k,
                              "stochastic", [1] * k, [2] * k, f(), ws(op, shapes))
    else:
        tk.adalomo_update_multi_(ps, ps, [f(p.numel()) for p in ps], f(), f(), [1e-3] * k,
                                 [0.01] * k, 1024.0, [1.0] * k, [0.5] * k, [1e-30] * k,
                                 [1e-3] * k, [1.0] * k, "stochastic", [1] * k, [2] * k, f(),
                                 ws(op, shapes))

calls = {
    "lomo_bf16": lambda: lomo((4096, 4096), torch.bfloat16, gsq=False),
    "lomo_bf16_grad_sq": lambda: lomo((4096, 4096), torch.bfloat16),
    "lomo_bf16_peeled": lambda: lomo((4096, 4095), torch.bfloat16, gsq=False, offset=3),
    "lomo_fp16": lambda: lomo((4096, 4096), torch.float16, loss_scale=1000.0),
    "lomo_fp32": lambda: lomo((4096, 4096), torch.float32),
    "lomo_multi_bf16": lambda: multi("lomo_update_multi_", [(4096,)] * 3),
    "adalomo_bf16": lambda: adalomo((4096, 4096), torch.bfloat16),
    "adalomo_fp32_narrow": lambda: adalomo((4096, 1), torch.float32),
    "adalomo_fp16_odd": lambda: adalomo((37, 129), torch.float16),
    "adalomo_fp16": lambda: adalomo((4096, 4096), torch.float16),
    "vector_bf16": lambda: adalomo((4096,), torch.bfloat16),
    "vector_bf16_tiles": lambda: adalomo((10000,), torch.bfloat16),
    "vector_multi_bf16": lambda: multi("adalomo_update_multi_", [(4096,)] * 3),
    "vector_multi_bf16_tiles": lambda: multi("adalomo_update_multi_", [(4096,), (10000,)]),
    # more than 2**31 elements: 64-bit offsets
    "lomo_bf16_index64": lambda: lomo((2**31 + 8,), torch.bfloat16),
    "adalomo_bf16_index64": lambda: adalomo((2**19 + 1, 4096), torch.bfloat16),
}
out = {}
for name, call in calls.items():
    with capture() as seen:
        call()
    for kernel, grid, args, kwargs in seen:
        c = compile_sm90(kernel, args, kwargs)
        ptx = c.asm["ptx"]
        pattern = (r"(?:ld|st)\.global[\.\w]*|(?:div|sqrt|rsqrt|fma)\.[\.\w]+|bar\.sync|"
                   r"shfl\.[\.\w]+|atom\.[\.\w]+")
        key = f"{name}:{kernel.fn.__name__}" + (f"{kwargs['MODE']}" if "MODE" in kwargs else "")
        out[key] = dict(ops=sorted(set(re.findall(pattern, ptx))), **resources(c),
                        stochastic=bool(kwargs.get("STOCHASTIC")),
                        dtype=str(args[0].dtype))
print(json.dumps(out))
"""


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


@pytest.fixture(scope="module")
def sm90():
    """{"<call>:<kernel>": {"ops", "registers", "stack", "local", "stochastic", "dtype"}}."""
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    env = dict(os.environ, TRITON_INTERPRET="0")  # compile, not interpret
    run = subprocess.run([sys.executable, "-c", _SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _of(sm90, call):
    return {k.split(":", 1)[1]: v for k, v in sm90.items() if k.split(":", 1)[0] == call}


def test_every_kernel_compiles_for_sm90_with_the_intended_instructions(sm90):
    names = {k.split(":", 1)[1].rstrip("012") for k in sm90}
    assert names == {"_lomo_update_kernel", "_lomo_update_multi_kernel", "_adalomo_stats_kernel",
                     "_adalomo_unorm_kernel", "_adalomo_apply_kernel", "_vector_kernel",
                     "_vector_multi_kernel"}
    for name, k in sm90.items():
        # IEEE division and square root everywhere (docs/design.md: no fast-math)
        fast = ("div.full", "div.approx", "sqrt.approx", "rsqrt")
        assert not any(o.startswith(fast) for o in k["ops"]), (name, k["ops"])
        if name.endswith("_adalomo_apply_kernel"):
            # no contraction: p*decay - lr_t*u rounds twice, as in the reference
            assert not any(o.startswith("fma") for o in k["ops"]), name
        elif "_lomo" in name:
            assert "fma.rn.f32" in k["ops"], name  # the explicit fma of torch.add(alpha)
    assert "div.rn.f32" in _of(sm90, "lomo_fp16")["_lomo_update_kernel"]["ops"]  # scale 1000


def test_sm90_register_budget_of_the_stochastic_rounding_apply_kernels(sm90):
    applied = {name: k["registers"] for name, k in sm90.items()
               if k["stochastic"] and k["dtype"] == "torch.bfloat16"}
    # LOMO (single, multi), AdaLomo pass 3, the unfactored update (fused, apply, multi)
    assert len(applied) >= 8, applied
    assert max(applied.values()) <= TRITON_SR_APPLY_MAX_REGISTERS, applied


def test_sm90_no_kernel_spills(sm90):
    for name, k in sm90.items():
        assert k["stack"] + k["local"] <= TRITON_MAX_SPILL_BYTES, (name, k)


def test_sm90_hot_loops_move_16_bytes_per_access(sm90):
    for call in ("lomo_bf16", "lomo_bf16_peeled", "lomo_fp32", "lomo_multi_bf16", "adalomo_bf16",
                 "vector_bf16", "vector_multi_bf16"):
        for kernel, k in _of(sm90, call).items():
            assert "ld.global.v4.b32" in k["ops"], (call, kernel, k["ops"])
            if "stats" not in kernel and "unorm" not in kernel and kernel[-1:] != "1":
                assert "st.global.v4.b32" in k["ops"], (call, kernel, k["ops"])


def test_sm90_lomo_sets_found_inf_without_a_block_reduction(sm90):
    # without grad_sq nothing in LOMO needs a reduction: no barrier, no warp shuffle
    for call in ("lomo_bf16", "lomo_bf16_peeled"):
        ops_ = _of(sm90, call)["_lomo_update_kernel"]["ops"]
        assert not any(o.startswith(("bar.sync", "shfl")) for o in ops_), (call, ops_)
