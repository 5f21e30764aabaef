"""Static lint of the cross-block tickets of the deterministic reductions (docs/design.md,
"Conventions"; docs/gpu-verification.md, "The ticket lint").

    python bench/lint_tickets.py            # the CUDA source and the Triton PTX (no GPU needed)
    python bench/lint_tickets.py --native   # csrc/cuda only: a parse of the source
    python bench/lint_tickets.py --triton   # triton_kernels/, compiled for sm_90 (offline)

Native: bench/lint_tickets_cuda.py. Triton (here): every `tl.atomic_*` of a jit function names
`sem="acq_rel"` after a `tl.debug_barrier()`; every kernel that reaches one is compiled for sm_90
from the launches the launchers make (recorded on meta tensors) and each `atom` of its PTX is
`.acq_rel`.

Exit status 1 and one line per finding (file:line: kernel: what), 0 when clean.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lint_tickets_cuda import ROOT, Finding, lint_native  # noqa: E402


# ---------------------------------------------------------------- the Triton lint

def _jit_functions(path: Path):
    """{name: FunctionDef} of the @triton.jit functions of a module."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and any(
                "jit" in ast.unparse(d) for d in node.decorator_list):
            out[node.name] = node
    return out


def _calls(fn: ast.FunctionDef):
    return [n for n in ast.walk(fn) if isinstance(n, ast.Call)]


def _tl_name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "tl":
        return f.attr
    return ""


@dataclass
class TritonSource:
    ticket_kernels: dict  # kernel -> the helpers (with their atomics) it reaches
    atomics: int
    findings: list


def lint_triton_source(paths: list[Path], root: Path = ROOT) -> TritonSource:
    """The source rules: sem="acq_rel" after a tl.debug_barrier(), for every tl.atomic_* of a
    jit function; and the kernels (jit functions no other one calls) that reach one."""
    jit, where, findings, atomics = {}, {}, [], 0
    for path in paths:
        for name, node in _jit_functions(path).items():
            jit[name] = node
            where[name] = os.path.relpath(path, root) if path.is_absolute() else str(path)
    helpers = set()
    for name, node in jit.items():
        barriers = [c.lineno for c in _calls(node) if _tl_name(c) == "debug_barrier"]
        for c in _calls(node):
            if not _tl_name(c).startswith("atomic_"):
                continue
            atomics += 1
            helpers.add(name)
            sem = next((ast.unparse(k.value) for k in c.keywords if k.arg == "sem"), None)
            at = f"{where[name]}:{c.lineno}"
            if sem not in ("'acq_rel'", '"acq_rel"'):
                findings.append(Finding(at, name, f"tl.{_tl_name(c)} with sem={sem}: a ticket "
                                        "needs sem=\"acq_rel\""))
            if not any(b < c.lineno for b in barriers):
                findings.append(Finding(at, name, f"tl.{_tl_name(c)} without a tl.debug_barrier() "
                                        "before it (another thread's stores may not be issued)"))
    called = {n.func.id for node in jit.values() for n in _calls(node)
              if isinstance(n.func, ast.Name)}
    reach: dict = {}

    def reaches(name, seen=()):
        if name in seen or name not in jit:
            return set()
        own = {name} & helpers
        return own.union(*(reaches(n.func.id, seen + (name,)) for n in _calls(jit[name])
                           if isinstance(n.func, ast.Name)))

    for name in jit:
        if name not in called and reaches(name):
            reach[name] = sorted(reaches(name))
    if not atomics:
        findings.append(Finding("triton_kernels", "-", "no tl.atomic_* found: the lint would "
                                "check nothing"))
    return TritonSource(reach, atomics, findings)


def ptx_ticket_findings(kernel: str, label: str, ptx: str) -> tuple[int, list]:
    """(atomics, findings) of one compiled kernel's PTX: every atom must be .acq_rel."""
    atoms = re.findall(r"\batom\.[\w.]+", ptx)
    bad = [a for a in atoms if ".acq_rel." not in a + "."]
    return len(atoms), [Finding(f"PTX of {label}", kernel, f"{a} is not acq_rel (the ticket "
                                "neither releases this program's partials nor acquires the "
                                "others')") for a in bad]


def _ticket_launches():
    """The launcher calls whose launches reach every ticket (meta tensors, several tiles)."""
    import torch

    import lomo_kernels.triton_kernels as tk
    from lomo_kernels import ops

    def t(shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    def f(n=1):
        return torch.empty(n, dtype=torch.float32, device="meta")

    def ws(op, shapes):
        return f(tk.workspace_numel(op, shapes))

    def adalomo(shape):
        st = {k: f(max(1, torch.Size(s).numel())) for k, s in ops.adalomo_state_shapes(shape).items()}
        tk.adalomo_update_(t(shape), t(shape), st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
                           st.get("exp_avg_sq"), f(), f(), 1e-3, 0.01, 1.0, 1.0, 0.5, 1e-30, 1e-3,
                           1.0, "nearest", 1, 2, f(), ws("adalomo_update_", [shape]))

    def multi(op, shapes):
        k, ps = len(shapes), [t(s) for s in shapes]
        if op == "lomo_update_multi_":
            tk.lomo_update_multi_(ps, ps, f(), f(), [1e-3] * k, [0.01] * k, 1.0, [1.0] * k,
                                  "nearest", [1] * k, [2] * k, f(), ws(op, shapes))
        else:
            tk.adalomo_update_multi_(ps, ps, [f(p.numel()) for p in ps], f(), f(), [1e-3] * k,
                                     [0.01] * k, 1.0, [1.0] * k, [0.5] * k, [1e-30] * k,
                                     [1e-3] * k, [1.0] * k, "nearest", [1] * k, [2] * k, f(),
                                     ws(op, shapes))

    big = (4096, 4096)
    return {
        "lomo_grad_sq": lambda: tk.lomo_update_(t(big), t(big), f(), f(), 1e-3, 0.01, 1.0, 1.0,
                                                "nearest", 1, 2, f(), ws("lomo_update_", [big])),
        "lomo_multi_grad_sq": lambda: multi("lomo_update_multi_", [(4096,), (10000,)]),
        "adalomo_factored": lambda: adalomo(big),
        "adalomo_vector": lambda: adalomo((10000,)),
        "adalomo_multi": lambda: multi("adalomo_update_multi_", [(4096,), (10000,)]),
        "grad_accumulate_buf_sq": lambda: tk.grad_accumulate_(
            f(big[0] * big[1]), t(big), f(), 1.0, False, "nearest", 1, 2, f(),
            ws("grad_accumulate_", [big])),
    }


def lint_triton(root: Path = ROOT) -> tuple[TritonSource, dict, list]:
    """(source result, {kernel: atomics in its compiled PTX}, findings): the source rules, then
    every ticket kernel compiled for sm_90 from the launches of ``_ticket_launches``."""
    os.environ["TRITON_INTERPRET"] = "0"  # compile, not interpret (before triton is imported)
    sys.path[:0] = [str(root), str(root / "tests")]
    from triton_launches import capture, compile_sm90

    src = lint_triton_source(sorted((root / "triton_kernels").glob("*.py")), root)
    findings, atoms = list(src.findings), {k: 0 for k in src.ticket_kernels}
    for label, call in _ticket_launches().items():
        with capture() as seen:
            call()
        for kernel, _, args, kwargs in seen:
            name = kernel.fn.__name__
            if name not in atoms:
                continue
            mode = f" MODE={kwargs['MODE']}" if "MODE" in kwargs else ""
            n, bad = ptx_ticket_findings(name, f"{label}{mode}", compile_sm90(kernel, args, kwargs)
                                         .asm["ptx"])
            atoms[name] += n
            findings += bad
    for name, n in atoms.items():
        if n == 0:
            findings.append(Finding("triton_kernels", name, "reaches a ticket "
                                    f"({', '.join(src.ticket_kernels[name])}) but no compiled "
                                    "launch of it has an atom: add a launch to _ticket_launches"))
    return src, atoms, findings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--native", action="store_true", help="only the CUDA source")
    ap.add_argument("--triton", action="store_true", help="only the Triton kernels")
    args = ap.parse_args(argv)
    both = not (args.native or args.triton)
    findings = []
    if args.native or both:
        lint = lint_native()
        print(f"native: {len(lint.tickets)} ticket atomic(s), {len(lint.sites)} call sites, "
              f"{lint.coherent_reads} coherent reads on finishing paths, "
              f"{len(lint.findings)} finding(s)")
        findings += lint.findings
    if args.triton or both:
        src, atoms, bad = lint_triton()
        print(f"triton: {src.atomics} tl.atomic_* in the source; ticket kernels and their PTX "
              f"atoms (sm_90): {', '.join(f'{k} {n}' for k, n in sorted(atoms.items()))}; "
              f"{len(bad)} finding(s)")
        findings += bad
    for f in findings:
        print(f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
