"""Static GPU budgets, read from compiled sm_90 code without a GPU.

For every CUDA kernel of the native extension (and every Triton kernel, compiled offline by
tests/test_triton_compile.py) the SASS and resource usage from ``cuobjdump`` must show:

* no spills: a stack frame of 0 bytes, no local memory, no LDL/STL instruction;
* at most the registers per thread of its row in ``REGISTER_BUDGETS`` (the first pattern that
  matches the kernel's name). With 256-thread blocks (8 warps) and the 64K registers of an SM,
  <= 64 registers keep 4 blocks resident (2048 threads, full occupancy), <= 80 keep 3, <= 128
  keep 2, more keep 1; the one-block 1024-thread kernels need <= 64 to launch at all;
* for the kernels in ``VECTOR_RULES``, 128-bit global loads (LDG.E.128) and stores (STG.E.128) in
  the hot loop (see there).

A kernel over its budget fails CI with a message naming it; raise a budget only with a reason in
its row. ``python -m lomo_kernels.budgets`` prints the table of the installed extension.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

ARCH = "sm_90"

# (pattern on the kernel name, registers per thread, why). Names: native kernels as
# "<kernel><Fmt, ...template args>" (Fmt: F32, F16, BF16; the update kernels <parameter, gradient,
# ...>, the gradient F32 for a float32 accumulation buffer of a 16-bit parameter;
# grad_accumulate_kernel<buffer, gradient, ...>), Triton kernels as
# "triton:<call>:<kernel>" (tests/test_triton_compile.py). The AdaLomo passes are one kernel each since the ticketed
# finalisation (stats_kernel, unorm_kernel, apply_kernel; adalomo_flat_kernel for 0-d/1-d and
# multi-tensor updates), which replaced tile_kernel / flat_kernel / state_kernel / finalize_*.
REGISTER_BUDGETS = [
    (r"^lomo_update_kernel<", 64, "LOMO, 256 threads: full occupancy"),
    (r"^stats_kernel<", 80, "AdaLomo pass 1 (4 rows x 8 columns of g and p in flight, the "
                            "ticketed finishers): 3 blocks per SM"),
    (r"^unorm_kernel<", 80, "AdaLomo pass 2 (4 rows x 8 columns in flight): 3 blocks per SM"),
    (r"^apply_kernel<\w+, \w+, \w+, true>", 80, "AdaLomo pass 3 with a non-power-of-two loss scale "
                                           "(IEEE division per element): 3 blocks per SM"),
    (r"^apply_kernel<", 64, "AdaLomo pass 3 (stochastic rounding included): full occupancy"),
    (r"^adalomo_flat_kernel<", 80, "AdaLomo 0-d/1-d and multi-tensor (4 packs of g, p, v in "
                                   "flight): 3 blocks per SM"),
    (r"^empty_shard_kernel", 64, "AdaLomo stages of an empty local shard: one block"),
    (r"^golore_update_kernel", 64, "GoLore inner update: full occupancy"),
    (r"^grad_accumulate_kernel<", 64, "gradient accumulation (2 packs of g and of the buffer in "
                                      "flight): full occupancy"),
    (r"^triton:", 128, "Triton, 8 or 16 warps (tests/test_triton_compile.py: <= 96 for the bf16 "
                    "stochastic-rounding apply kernels): <= 128 keeps two 8-warp blocks per SM"),
]

# (pattern, needs 128-bit loads, needs 128-bit stores, where): the bf16 hot paths. "loop": inside
# a back-edge range of the SASS (the AdaLomo row loops); "body": anywhere (a LOMO block or a flat
# AdaLomo stats tile handles one tile, unrolled; back edges in its SASS are the record search).
VECTOR_RULES = [
    (r"^lomo_update_kernel<BF16,", True, True, "body"),
    (r"^stats_kernel<BF16, (BF16|F32), (false|true)>", True, False, "loop"),
    (r"^unorm_kernel<BF16, (BF16|F32), (false|true)>", True, False, "loop"),
    (r"^apply_kernel<BF16, (BF16|F32), (false|true), (false|true)>", True, True, "loop"),
    (r"^adalomo_flat_kernel<BF16, (BF16|F32), (false|true), (false|true)>", True, True, "body"),
    (r"^grad_accumulate_kernel<(F32|BF16), BF16,", True, True, "body"),
    (r"^triton:lomo_bf16:_lomo_update_kernel$", True, True, "body"),
    (r"^triton:lomo_multi_bf16:_lomo_update_multi_kernel$", True, True, "body"),
    (r"^triton:adalomo_bf16:_adalomo_stats_kernel$", True, False, "body"),
    (r"^triton:adalomo_bf16:_adalomo_apply_kernel$", True, True, "body"),
]


@dataclass
class Usage:
    name: str
    registers: int = 0
    stack: int = 0  # bytes of stack frame (spills and local arrays live there)
    local: int = 0
    local_ops: int = 0  # LDL / STL instructions
    has_loops: bool = False
    ld128_in_loop: bool = False
    st128_in_loop: bool = False
    ld128: bool = False
    st128: bool = False
    violations: list = field(default_factory=list)

    @property
    def spill_bytes(self) -> int:
        return self.stack + self.local


def find_tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: the CUDA toolkit's, else the copy Triton's NVIDIA backend ships."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.isfile(os.path.join(root, "bin", name)):
            return os.path.join(root, "bin", name)
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.isfile(path) else None
    except Exception:
        return None


_FMT = {"0": "F32", "1": "F16", "2": "BF16"}
_PASS = {"0": "kStats", "1": "kUnorm", "2": "kApply"}
_INNER = {"0": "AdamW", "1": "Sgd", "2": "SgdMomentum"}


def short_name(mangled: str) -> str:
    """'_ZN4lomo4cuda...11tile_kernelILNS_3FmtE2ELb0ELb1ELi2EEEv...' -> 'tile_kernel<BF16, false,
    true, kApply>': the length-prefixed identifier ending in _kernel and the template arguments
    this package uses (Fmt, bool, int), decoded by hand so that no demangler is needed."""
    i = 3 if mangled.startswith("_ZN") else len(mangled)  # <length><identifier>, nested names
    while i < len(mangled):
        m = re.match(r"\d+", mangled[i:])
        if not m:
            return mangled
        n, start = int(m.group(0)), i + len(m.group(0))
        ident, i = mangled[start:start + n], start + n
        if ident.endswith("_kernel"):
            break
    else:
        return mangled
    # a second Fmt argument is a substitution of the first's type (LS3_2E): the only enum type
    # that repeats in these kernels' arguments
    targs = re.match(r"I((?:LNS_3FmtE\dE|LS[0-9A-Z]*_\dE|LNS_5InnerE\dE|Lb[01]E|Li\d+E)+)E",
                     mangled[i:])
    if not targs:
        return ident
    args = []
    arg = r"LNS_3FmtE(\d)E|LS[0-9A-Z]*_(\d)E|LNS_5InnerE(\d)E|Lb([01])E|Li(\d+)E"
    for fmt, fmt2, inner, flag, num in re.findall(arg, targs.group(1)):
        if fmt or fmt2:
            args.append(_FMT[fmt or fmt2])
        elif inner:
            args.append(_INNER[inner])
        elif flag:
            args.append("true" if flag == "1" else "false")
        else:
            args.append(_PASS.get(num, num) if ident in ("tile_kernel", "flat_kernel") else num)
    return f"{ident}<{', '.join(args)}>"


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")
_FUNC = re.compile(r"Function : (\S+)")
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\()?0x([0-9a-f]+)")


def _run(tool: str, *args: str) -> str:
    exe = find_tool(tool)
    if exe is None:
        raise FileNotFoundError(f"{tool} not found (CUDA_HOME/bin, PATH, or Triton's NVIDIA backend)")
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout


def read(path: str, prefix: str = "", name_of=short_name) -> list[Usage]:
    """The sm_90 kernels of an ELF/cubin/extension: resource usage and SASS facts."""
    usages: dict[str, Usage] = {}
    for mangled, reg, stack, local in _RES.findall(_run("cuobjdump", "-res-usage", "-arch", ARCH,
                                                        path)):
        name = prefix + name_of(mangled)
        usages[mangled] = Usage(name, int(reg), int(stack), int(local))
    sass = _run("cuobjdump", "-sass", "-arch", ARCH, path)
    parts = _FUNC.split(sass)
    for mangled, body in zip(parts[1::2], parts[2::2]):
        u = usages.setdefault(mangled, Usage(prefix + name_of(mangled)))
        insns = [(int(a, 16), text) for a, text in _INSN.findall(body)]
        loops = [(int(t, 16), a) for a, text in insns for t in _BRA.findall(text) if int(t, 16) <= a]
        u.has_loops = bool(loops)

        def in_loop(addr):
            return any(lo <= addr <= hi for lo, hi in loops)

        for addr, text in insns:
            op = text.split()[0] if not text.startswith("@") else text.split()[1]
            if op.startswith(("LDL", "STL")):
                u.local_ops += 1
            if op.startswith("LDG.E.128"):
                u.ld128 = True
                u.ld128_in_loop |= in_loop(addr)
            if op.startswith("STG.E.128"):
                u.st128 = True
                u.st128_in_loop |= in_loop(addr)
    return sorted(usages.values(), key=lambda x: x.name)


def check(usages: list[Usage]) -> list[Usage]:
    """Fills each usage's violations; returns the ones with any."""
    for u in usages:
        u.violations = []
        if u.spill_bytes or u.local_ops:
            u.violations.append(f"spills: {u.stack} stack bytes, {u.local} local bytes, "
                                f"{u.local_ops} LDL/STL")
        budget = next((b for pat, b, _ in REGISTER_BUDGETS if re.search(pat, u.name)), None)
        if budget is None:
            u.violations.append("no register budget: add a row to REGISTER_BUDGETS")
        elif u.registers > budget:
            u.violations.append(f"{u.registers} registers > budget {budget}")
        for pat, need_ld, need_st, where in VECTOR_RULES:
            if re.search(pat, u.name):
                if where == "loop" and not u.has_loops:
                    u.violations.append("no loop in its SASS (a grid-stride loop was expected)")
                ld = u.ld128_in_loop if where == "loop" else u.ld128
                st = u.st128_in_loop if where == "loop" else u.st128
                where = "in its hot loop" if where == "loop" else "in its body"
                if need_ld and not ld:
                    u.violations.append(f"no 128-bit global load (LDG.E.128) {where}")
                if need_st and not st:
                    u.violations.append(f"no 128-bit global store (STG.E.128) {where}")
    return [u for u in usages if u.violations]


def unmatched_vector_rules(usages: list[Usage], triton: bool) -> list[str]:
    """The VECTOR_RULES patterns (of the native or the Triton kernels) that match no kernel: a
    renamed kernel must not leave its rule checking nothing."""
    names = [u.name for u in usages]
    return [pat for pat, *_ in VECTOR_RULES if pat.startswith("^triton:") == triton
            and not any(re.search(pat, n) for n in names)]


def budget_of(name: str) -> int | None:
    return next((b for pat, b, _ in REGISTER_BUDGETS if re.search(pat, name)), None)


def _vector_cell(u: Usage) -> str:
    ld = "ld" if u.ld128_in_loop else ("LD" if u.ld128 else "--")
    st = "st" if u.st128_in_loop else ("ST" if u.st128 else "--")
    return f"{ld}/{st}"


def format_table(usages: list[Usage], title: str) -> str:
    """One row per kernel; 128-bit: ld/st inside a loop, LD/ST elsewhere in the body, -- none."""
    rows = [(u.name, str(u.registers), str(budget_of(u.name)), str(u.spill_bytes),
             str(u.local_ops), _vector_cell(u),
             "ok" if not u.violations else "FAIL: " + "; ".join(u.violations)) for u in usages]
    header = ("kernel", "regs", "budget", "spill B", "LDL/STL", "128-bit", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([f"{title} ({ARCH}, {len(usages)} kernels)", fmt(header),
                      fmt(["-" * w for w in widths]), *map(fmt, rows)])


def extension_path() -> str:
    import lomo_kernels

    found = glob.glob(os.path.join(os.path.dirname(lomo_kernels.__file__), "_C*.so"))
    if not found:
        raise FileNotFoundError("lomo_kernels._C is not built")
    return found[0]


def native_usages() -> list[Usage]:
    usages = read(extension_path())
    check(usages)
    return usages


def main() -> int:
    try:
        usages = native_usages()
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        print(f"cannot read the CUDA kernels: {exc}")
        return 2
    print(format_table(usages, "native CUDA kernels"))
    stale = unmatched_vector_rules(usages, triton=False)
    for pat in stale:
        print(f"FAIL: VECTOR_RULES pattern {pat!r} matches no kernel")
    return 1 if stale or any(u.violations for u in usages) else 0


if __name__ == "__main__":
    sys.exit(main())
