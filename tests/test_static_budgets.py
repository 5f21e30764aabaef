"""The CUDA kernels of the native extension meet the static budgets of lomo_kernels/budgets.py,
read from their sm_90 SASS with cuobjdump (no GPU needed): no spills, registers within each
kernel's budget, 128-bit global loads/stores in the hot loops of the bf16 LOMO and AdaLomo kernels.
The end of the test run prints the table."""

import re

import pytest
from conftest import BUDGET_TABLES

from lomo_kernels import budgets, ops

pytestmark = [
    pytest.mark.skipif(ops._native is None or not ops._native.has_cuda(),
                       reason="the native extension has no CUDA kernels"),
    pytest.mark.skipif(budgets.find_tool("cuobjdump") is None,
                       reason="cuobjdump not found (CUDA toolkit or Triton's NVIDIA backend)"),
]


def test_every_cuda_kernel_meets_its_static_budget():
    usages = budgets.native_usages()
    BUDGET_TABLES.append(budgets.format_table(usages, "native CUDA kernels"))
    names = {u.name for u in usages}
    # every variant the entry points can launch is there (no budget passes on an empty read),
    # those that read a float32 gradient (an accumulation buffer) of a 16-bit parameter included
    assert {"lomo_update_kernel<BF16, BF16, true, false, true>", "stats_kernel<BF16, BF16, false>",
            "unorm_kernel<F16, F16, true>", "apply_kernel<BF16, BF16, true, false>",
            "adalomo_flat_kernel<BF16, BF16, true, false>", "empty_shard_kernel",
            "golore_update_kernel<BF16, BF16, true, AdamW, true>"} <= names
    assert {"lomo_update_kernel<BF16, F32, true, false, true>", "stats_kernel<F16, F32, true>",
            "unorm_kernel<BF16, F32, false>", "apply_kernel<BF16, F32, true, true>",
            "adalomo_flat_kernel<F16, F32, false, false>",
            "golore_update_kernel<BF16, F32, false, Sgd, true>"} <= names
    failed = [u for u in usages if u.violations]
    assert not failed, "\n".join(f"{u.name}: {'; '.join(u.violations)}" for u in failed)
    stale = budgets.unmatched_vector_rules(usages, triton=False)
    assert not stale, f"VECTOR_RULES patterns that match no kernel: {stale}"


def test_the_checks_catch_what_they_are_for():
    # a spill, a register regression, a bf16 hot loop without 128-bit accesses: each names the kernel
    bad = [budgets.Usage("apply_kernel<BF16, BF16, false, false>", registers=70, stack=16,
                         local_ops=2, has_loops=True, ld128=True, st128=True,
                         ld128_in_loop=False, st128_in_loop=True),
           budgets.Usage("mystery_kernel", registers=8)]
    failed = budgets.check(bad)
    assert [u.name for u in failed] == [b.name for b in bad]
    msg = "; ".join(failed[0].violations)
    assert "spills: 16 stack bytes" in msg and "70 registers > budget 64" in msg
    assert "no 128-bit global load (LDG.E.128) in its hot loop" in msg
    assert "no register budget" in failed[1].violations[0]
    assert re.search(r"apply_kernel<BF16, BF16, false, false>\s+70\s+64\s+16\s+2",
                     budgets.format_table(bad, "t"))
    # a rule whose kernel was renamed checks nothing: it is reported, per kind of kernel
    stale = budgets.unmatched_vector_rules(bad, triton=False)
    assert r"^apply_kernel<BF16, (BF16|F32), (false|true), (false|true)>" not in stale
    assert r"^stats_kernel<BF16, (BF16|F32), (false|true)>" in stale
    triton = [budgets.Usage("triton:lomo_bf16:_lomo_update_kernel"),
              budgets.Usage("triton:lomo_multi_bf16:_lomo_update_multi_kernel")]
    assert budgets.unmatched_vector_rules(triton, triton=True) == [
        r"^triton:adalomo_bf16:_adalomo_stats_kernel$",
        r"^triton:adalomo_bf16:_adalomo_apply_kernel$"]


def test_kernel_names_are_decoded():
    mangled = ("_ZN4lomo4cuda50_GLOBAL__N__588fcf1b_17_adalomo_update_cu_03c2000511tile_kernelI"
               "LNS_3FmtE2ELb0ELb1ELi2EEEvPNS_9StorageOfIXT_EE4typeEPKS6_PKfSB_NS_14AdaLomoScalars"
               "ESB_NS1_7ScratchENS1_4GeomEb")
    assert budgets.short_name(mangled) == "tile_kernel<BF16, false, true, kApply>"
    assert budgets.short_name("_ZN4lomo4cuda12state_kernelEPf") == "state_kernel"
