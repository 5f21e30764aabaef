"""``python -m lomo_kernels``: what is installed, what runs where, and a self-test of every available
backend on every device against the reference (each op, dtype and rounding, on odd and LLM-shaped
tensors). Exit status 1 when any kernel disagrees with the reference, 0 otherwise.

Triton on the CPU runs only in its interpreter, a test vehicle: it is included when the environment
sets TRITON_INTERPRET=1 (slower). Run ``python -m lomo_kernels --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import textwrap
import time

import torch

from . import __version__, ops, selfcheck
from .backends import can_run, native_extension, raw_impl, triton_interpret

# Odd shapes (scalar tails, ragged tiles) and LLM-shaped ones (16-byte vector paths, >= 32 slices).
SHAPES = [(4097,), (37, 129), (3, 17, 33), (4096,), (130, 1024), (40, 8, 64)]
KERNEL_BACKENDS = ("native", "triton", "cuda_emulated")


def _versions() -> list[tuple[str, str]]:
    rows = [("lomo_kernels", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:
        rows.append(("triton", f"not importable ({type(exc).__name__})"))
    native = native_extension()
    archs = native.cuda_archs().replace("+", " ") if native is not None else ""
    rows.append(("CUDA kernels compiled for", archs or "none (no CUDA kernels in this build)"))
    return rows


def devices() -> list[torch.device]:
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return out


def _describe(device: torch.device) -> str:
    if device.type == "cpu":
        return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    prop = torch.cuda.get_device_properties(device)
    cap = f"{prop.major}{prop.minor}"
    native = native_extension()
    archs = native.cuda_archs().split("+") if native is not None else []
    if f"sm_{cap}" in archs:
        fit = f"native kernels: sm_{cap} binary"
    elif any(a.startswith("compute_") and int(a[8:]) <= int(cap) for a in archs):
        fit = "native kernels: JIT-compiled from PTX at first use"
    else:
        fit = "native kernels: no binary or PTX for this GPU"
    return (f"{prop.name}, sm_{cap}, {prop.multi_processor_count} SMs, "
            f"{prop.total_memory / 2**30:.1f} GiB; {fit}")


def _status(backend: str, device: torch.device) -> str:
    reason = can_run(backend, device)
    if reason is None:
        return "ok"
    return f"no: {reason}"


def _runnable(backend: str, device: torch.device) -> bool:
    if can_run(backend, device) is not None:
        return False
    # the Triton interpreter is a test vehicle: only when asked for (TRITON_INTERPRET=1)
    return not (backend == "triton" and device.type == "cpu" and not triton_interpret())


def self_test(devs, backends=KERNEL_BACKENDS, shapes=None, impl_of=None):
    """One row per (backend, device, op, dtype, rounding): the worst case over ``shapes``."""
    impl_of, shapes = impl_of or raw_impl, shapes or SHAPES
    shapes_of = {op: shapes if op != "golore_update_" else shapes[:2] for op in
                 selfcheck.FIRST_USE_SHAPES}  # element-wise GoLore: a 1-D and a 2-D shape
    rows, cache = [], {}
    for device in devs:
        for backend in backends:
            if not _runnable(backend, device):
                continue
            for op in shapes_of:  # single-tensor ops (multi-tensor kernels: the test suite)
                impl = impl_of(op, backend, device)
                if impl is None:
                    continue
                for dtype in ops.SUPPORTED_DTYPES:
                    for rounding in selfcheck.ROUNDINGS_OF[dtype]:
                        worst, detail, ok = 0, "", True
                        for shape in shapes_of[op]:
                            v = selfcheck.run_case(op, impl, shape, dtype, rounding, device,
                                                  cache=cache)
                            worst = max(worst, v.max_ulp)
                            if not v.ok:
                                ok, detail = False, f"{tuple(shape)}: {v.detail}"
                                break
                        rows.append((backend, str(device), op, str(dtype).replace("torch.", ""),
                                     rounding, worst, ok, detail))
    return rows


WIDTH = 100  # the doctor's output fits a terminal of this many columns


def _table(header, rows, width=WIDTH) -> str:
    """Columns separated by two spaces; a table wider than ``width`` caps its widest columns at one
    width, and their cells wrap onto continuation lines (a long reason, a path)."""
    cells = [[str(x) for x in r] for r in [header, *rows]]
    widths = [max(len(x) for x in col) for col in zip(*cells)]
    cap = max(widths)
    while cap > 12 and sum(min(w, cap) for w in widths) + 2 * (len(widths) - 1) > width:
        cap -= 1
    widths = [min(w, cap) for w in widths]
    out = []
    for i, row in enumerate(cells):
        wrapped = [textwrap.wrap(x, w, break_long_words=True, break_on_hyphens=False) or [""]
                   for x, w in zip(row, widths)]
        for k in range(max(len(c) for c in wrapped)):
            out.append("  ".join((c[k] if k < len(c) else "").ljust(w)
                                 for c, w in zip(wrapped, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _say(text: str) -> None:
    print(textwrap.fill(text, WIDTH, break_on_hyphens=False))


def main(argv=None, impl_of=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomo_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-self-test", action="store_true",
                        help="only report versions, devices and backends")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(_table(("component", "version"), _versions()))
    devs = devices()
    print()
    print(_table(("device", "description"), [(str(d), _describe(d)) for d in devs]))
    print()
    loaded = ops.available_backends()
    rows = [(b, loaded.get(b, "loaded"), *(_status(b, d) for d in devs))
            for b in ("native", "triton", "torch", "cuda_emulated")]
    print(_table(("backend", "build", *(str(d) for d in devs)), rows))
    picks = ", ".join(f"{d}: {ops.resolve_backend('auto', d)}" for d in devs)
    check = "off" if selfcheck.mode() == "0" else "on"
    _say(f"(auto picks {picks}; first-use self-check on CUDA: {check}, LOMO_KERNELS_SELF_CHECK)")
    if args.no_self_test:
        return 0
    print()
    _say("self-test against the reference (each op, dtype and rounding on shapes "
         f"{', '.join(str(s) for s in SHAPES)}):")
    results = self_test(devs, impl_of=impl_of)
    table = [(b, d, op, dt, r, ulp if ulp >= 0 else "-", "ok" if ok else f"DISAGREES: {why}")
             for b, d, op, dt, r, ulp, ok, why in results]
    print(_table(("backend", "device", "op", "dtype", "rounding", "max ulp", "result"), table))
    bad = sum(1 for r in results if not r[6])
    print(f"{len(results)} checks, {bad} disagreement{'s' * (bad != 1)}, "
          f"{time.perf_counter() - start:.1f} s")
    if not results:
        print("(no kernel backend can run here: only the reference)")
    return 1 if bad else 0
