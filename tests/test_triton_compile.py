"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, with no GPU needed.

The interpreter runs the kernels' Python, not the compiler: this catches what only compilation
rejects (non-constexpr globals, type errors in untaken constexpr branches, ...) and checks in the
PTX what the design relies on: 16-byte vector loads/stores in the LOMO main path, IEEE division
and square root (no div.full / approx), and no fp contraction in the AdaLomo apply pass. The
cubins then meet the static budgets of lomo_kernels/budgets.py (no spills, registers, 128-bit
global loads/stores in the bf16 kernels' SASS), whose table the end of the test run prints.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import BUDGET_TABLES, requires_triton

from lomo_kernels import budgets

pytestmark = requires_triton

_SCRIPT = r"""
import json, os, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lomo_kernels.triton_kernels import adalomo_update as A, lomo_update as L

def compile_(name, fn, sig, consts, div=(), **opts):
    names = fn.arg_names
    signature = {a: "constexpr" if a in consts else sig[a] for a in names}
    attrs = {(names.index(d),): [["tt.divisibility", 16]] for d in div}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, **opts})
    ptx = c.asm["ptx"]
    assert c.asm["cubin"]
    with open(os.path.join(sys.argv[1], name + ".cubin"), "wb") as f:
        f.write(c.asm["cubin"])
    pattern = r"(?:ld|st)\.global[\.\w]*|(?:div|sqrt|rsqrt|fma)\.[\.\w]+"
    out[name] = sorted(set(re.findall(pattern, ptx)))

out = {}
f32p = "*fp32"
flags = dict(LOSS_SCALE=1, CLIP_VALUE=True, HAS_CLIP_COEF=True)
nofuse = dict(enable_fp_fusion=False)
for dt, ls in (("bf16", 1), ("fp16", 2), ("fp32", 0)):
    compile_(f"lomo_{dt}", L._lomo_update_kernel,
             dict(p_ptr="*" + dt, g_ptr="*" + dt, clip_coef_ptr=f32p, found_inf_ptr=f32p,
                  numel="i64", decay="fp32", neg_lr="fp32", scale="fp32", clip_value="fp32",
                  key="i32"),
             dict(BLOCK=L.BLOCK, LOSS_SCALE=ls, CLIP_VALUE=True, HAS_CLIP_COEF=True,
                  HAS_FOUND_INF=True, STOCHASTIC=dt != "fp32"),
             div=("p_ptr", "g_ptr"))
tile = dict(m="i32", n="i32", tm="i32", tn="i32", scale="fp32", clip_value="fp32")
for dt, bm, bn in (("bf16", 64, 64), ("fp16", 1, 4096), ("fp32", 4096, 1)):
    compile_(f"stats_{dt}", A._stats_factored_kernel,
             dict(g_ptr="*" + dt, p_ptr="*" + dt, clip_coef_ptr=f32p, row_part_ptr=f32p,
                  col_part_ptr=f32p, pp_part_ptr=f32p, bad_part_ptr=f32p, eps1="fp32", **tile),
             dict(BM=bm, BN=bn, **flags), div=("g_ptr", "p_ptr", "n"), **nofuse)
    compile_(f"unorm_{dt}", A._unorm_factored_kernel,
             dict(g_ptr="*" + dt, clip_coef_ptr=f32p, row_new_ptr=f32p, col_new_ptr=f32p,
                  uu_part_ptr=f32p, **tile),
             dict(BM=bm, BN=bn, **flags), div=("g_ptr", "n"), **nofuse)
    compile_(f"apply_{dt}", A._apply_factored_kernel,
             dict(p_ptr="*" + dt, g_ptr="*" + dt, clip_coef_ptr=f32p, row_new_ptr=f32p,
                  col_new_ptr=f32p, rmean_ptr=f32p, scal_ptr=f32p, row_state_ptr=f32p,
                  col_state_ptr=f32p, key="i32", **tile),
             dict(BM=bm, BN=bn, STOCHASTIC=dt != "fp32", **flags),
             div=("p_ptr", "g_ptr", "n"), **nofuse)
compile_("factors", A._factors_kernel,
         dict(row_part_ptr=f32p, col_part_ptr=f32p, row_state_ptr=f32p, col_state_ptr=f32p,
              row_new_ptr=f32p, col_new_ptr=f32p, rsum_part_ptr=f32p, m="i32", n="i32",
              tm="i32", tn="i32", rc="i32", cc="i32", n_row_programs="i32", m_f="fp32",
              n_f="fp32", beta="fp32", omb="fp32"),
         dict(TBR=64, RB=64, TBC=256, CB=16), num_warps=4, **nofuse)
for fac in (True, False):
    compile_(f"scalars_{fac}", A._scalars_kernel,
             dict(pp_part_ptr=f32p, uu_part_ptr=f32p, bad_part_ptr=f32p, rsum_part_ptr=f32p,
                  rmean_ptr=f32p, scal_ptr=f32p, found_inf_ptr=f32p, T="i32", B="i32", rc="i32",
                  tpb="i32", m_f="fp32", sqrt_numel="fp32", lr="fp32", eps2="fp32",
                  weight_decay="fp32", clip_threshold="fp32"),
             dict(SB=1024, FACTORED=fac, BB=8, RCB=256, TPB=256, HAS_FOUND_INF=True),
             num_warps=A.SCALAR_WARPS, **nofuse)
vec = dict(v_ptr=f32p, clip_coef_ptr=f32p, numel="i32", scale="fp32", clip_value="fp32",
           eps1="fp32", beta="fp32", omb="fp32")
compile_("stats_vector", A._stats_vector_kernel,
         dict(g_ptr="*bf16", p_ptr="*bf16", pp_part_ptr=f32p, uu_part_ptr=f32p,
              bad_part_ptr=f32p, **vec), dict(BLOCK=A.TILE, **flags), **nofuse)
compile_("apply_vector", A._apply_vector_kernel,
         dict(p_ptr="*fp16", g_ptr="*fp16", scal_ptr=f32p, key="i32", **vec),
         dict(BLOCK=A.TILE, STOCHASTIC=True, **flags), **nofuse)
print(json.dumps(out))
"""


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{kernel: PTX instructions}, and the folder of the cubins."""
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    out = tmp_path_factory.mktemp("cubins")
    env = dict(os.environ, TRITON_INTERPRET="0")  # compile, not interpret
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), out


def test_every_kernel_compiles_for_sm90_with_the_intended_instructions(compiled):
    ptx, _ = compiled
    assert len(ptx) == 17
    for name, ops_ in ptx.items():
        # IEEE division and square root everywhere (DESIGN.md: no fast-math)
        fast = ("div.full", "div.approx", "sqrt.approx", "rsqrt")
        assert not any(o.startswith(fast) for o in ops_), (name, ops_)
    for dt in ("bf16", "fp16", "fp32"):
        # the full-block path of LOMO moves 16 bytes per load/store instruction
        assert "ld.global.v4.b32" in ptx[f"lomo_{dt}"] and "st.global.v4.b32" in ptx[f"lomo_{dt}"]
        assert "fma.rn.f32" in ptx[f"lomo_{dt}"]  # the explicit fma of torch.add(alpha)
        assert not any(o.startswith("fma") for o in ptx[f"apply_{dt}"])  # no contraction
    assert "div.rn.f32" in ptx["lomo_fp16"]  # a non-power-of-two loss scale divides exactly
    assert "ld.global.v4.b32" in ptx["stats_bf16"] and "st.global.v4.b32" in ptx["apply_bf16"]


def test_every_kernel_meets_its_static_budget(compiled):
    ptx, folder = compiled
    if budgets.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's NVIDIA backend)")
    usages = []
    for name in sorted(ptx):
        usages += budgets.read(str(folder / f"{name}.cubin"), name_of=lambda _, n=name: f"triton:{n}")
    assert len(usages) == len(ptx)
    failed = budgets.check(usages)
    BUDGET_TABLES.append(budgets.format_table(usages, "Triton kernels"))
    assert not failed, "\n".join(f"{u.name}: {'; '.join(u.violations)}" for u in failed)
    stale = budgets.unmatched_vector_rules(usages, triton=True)
    assert not stale, f"VECTOR_RULES patterns that match no kernel: {stale}"
