"""The GPU steps of bench/gpu_check.sh that need a Python driver: one call of each op (what
compute-sanitizer watches), and a bitwise determinism stress of the kernels that finish their
sums with tickets (many repeats on one reused workspace, every result bit for bit the first; the
native CUDA result bit for bit the same kernel source run by ``cuda_emulated`` on the CPU).

    python bench/gpu_check_ops.py --list                  # the calls, nothing run (no GPU needed)
    python bench/gpu_check_ops.py --once                  # each op once, native and triton, CUDA
    python bench/gpu_check_ops.py --determinism 200       # the stress (CUDA)
    python bench/gpu_check_ops.py --once --device cpu --backends cuda_emulated --small

Inputs are seeded (CPU generator), sized so that every ticketed op runs many blocks; ``--small``
shrinks them (for a CPU run of the driver itself). Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lomo_kernels import ops  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32
BETA = 1.0 - 2 ** -0.8


@dataclass
class Case:
    name: str
    op: str
    shapes: list  # the parameter shapes
    dtype: torch.dtype
    ticket: bool  # finishes a sum with a ticket (the determinism stress runs it)
    make: Callable  # (device, tensors) -> positional arguments
    multi: bool = False


def _tensors(case: Case, seed: int = 0) -> dict:
    """Fresh seeded CPU inputs of ``case``: parameters, gradients, state."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, dtype, lo=None):
        x = torch.randn(shape, generator=gen)
        return (x.abs() + lo if lo is not None else x * 0.5 + 0.01).to(dtype)

    t = {"p": [rand(s, case.dtype) for s in case.shapes],
         "g": [rand(s, case.dtype) for s in case.shapes]}
    if case.op.startswith("adalomo"):
        for i, s in enumerate(case.shapes):
            for k, ss in ops.adalomo_state_shapes(s).items():
                t[f"{k}{i}"] = rand(ss, F32, lo=0.5)
    if case.op == "golore_update_":
        t["m"], t["v"] = rand(case.shapes[0], F32), rand(case.shapes[0], F32, lo=0.1)
    if case.op == "grad_accumulate_":
        t["buf"] = rand(case.shapes[0], F32)
    return t


def _lomo(dev, t, scalars, ws):
    p, g = t["p"][0], t["g"][0]
    return (p, g, scalars["clip"], scalars["found"], 1e-2, 0.1, 1.0, 0.0, "nearest", 3, 1,
            scalars["sq"], ws)


def _lomo_multi(dev, t, scalars, ws):
    k = len(t["p"])
    return (t["p"], t["g"], scalars["clip"], scalars["found"], [1e-2] * k, [0.1] * k, 1.0,
            [0.0] * k, "stochastic", [3] * k, [1] * k, scalars["sq"], ws)


def _adalomo(dev, t, scalars, ws):
    return (t["p"][0], t["g"][0], t.get("exp_avg_sq_row0"), t.get("exp_avg_sq_col0"),
            t.get("exp_avg_sq0"), scalars["clip"], scalars["found"], 1e-2, 0.1, 1.0, 0.0, BETA,
            1e-30, 1e-3, 1.0, "nearest", 3, 2, scalars["sq"], ws)


def _adalomo_multi(dev, t, scalars, ws):
    k = len(t["p"])
    return (t["p"], t["g"], [t[f"exp_avg_sq{i}"] for i in range(k)], scalars["clip"],
            scalars["found"], [1e-2] * k, [0.1] * k, 1.0, [0.0] * k, [BETA] * k, [1e-30] * k,
            [1e-3] * k, [1.0] * k, "stochastic", [3] * k, [2] * k, scalars["sq"], ws)


def _accumulate(dev, t, scalars, ws):
    return (t["buf"], t["g"][0], scalars["found"], 1.0, False, "nearest", 3, 1, scalars["sq"], ws)


def _golore(dev, t, scalars, ws):
    return (t["p"][0].float(), None, t["m"], t["v"], None, scalars["clip"], scalars["found"],
            "adamw", 1e-2, 0.0, 1.0, 0.9, 0.999, 1e-8, 0.0, "nearest", 0, 1)


def cases(small: bool = False) -> list:
    m, n, v = (37, 129, 5001) if small else (517, 613, 70001)
    return [
        Case("lomo_bf16_grad_sq", "lomo_update_", [(m, n)], BF16, True, _lomo),
        Case("lomo_multi_bf16", "lomo_update_multi_", [(7,), (4097,), (m, n)], BF16, True,
             _lomo_multi, multi=True),
        Case("adalomo_factored_bf16", "adalomo_update_", [(m, n)], BF16, True, _adalomo),
        Case("adalomo_vector_fp32", "adalomo_update_", [(v,)], F32, True, _adalomo),
        Case("adalomo_multi_bf16", "adalomo_update_multi_", [(7,), (4097,), (v,)], BF16, True,
             _adalomo_multi, multi=True),
        Case("grad_accumulate_bf16", "grad_accumulate_", [(m * n,)], BF16, True, _accumulate),
        Case("golore_adamw", "golore_update_", [(m, 5)], F32, False, _golore),
    ]


def workspace(case: Case, backend: str, device: str):
    if case.op == "golore_update_":
        return None
    shapes = case.shapes
    numel = ops.workspace_numel(case.op, shapes, backend=backend, device=device)
    return torch.zeros(max(1, numel), dtype=F32, device=device)


def run(case: Case, backend: str, device: str, t_cpu: dict, ws) -> dict:
    """One call of ``case`` on copies of ``t_cpu`` on ``device``: every tensor it wrote (CPU)."""
    t = {k: [x.to(device, copy=True) for x in v] if isinstance(v, list) else v.to(device, copy=True)
         for k, v in t_cpu.items()}
    scalars = {"clip": torch.tensor([0.7], device=device), "found": torch.zeros(1, device=device),
               "sq": torch.zeros(1, device=device)}
    impl = ops.get_impl(case.op, backend, device)
    impl(*case.make(device, t, scalars, ws))
    out = {"found_inf": scalars["found"], "grad_sq": scalars["sq"]}
    for k, v in t.items():
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            out[f"{k}{i}"] = x
    return {k: x.detach().to("cpu", copy=True) for k, x in out.items()}


def bits(x: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.contiguous().view(view)


def differences(a: dict, b: dict) -> list:
    """Names of the tensors whose bits differ (and how many elements)."""
    out = []
    for k in a:
        diff = int((bits(a[k]) != bits(b[k])).sum())
        if diff:
            out.append(f"{k}: {diff} of {a[k].numel()} elements")
    return out


def once(device: str, backends: list, small: bool) -> int:
    for case in cases(small):
        for backend in backends:
            start = time.perf_counter()
            run(case, backend, device, _tensors(case), workspace(case, backend, device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"{case.name:24s} {backend:14s} ok  {time.perf_counter() - start:7.3f} s")
    return 0


def determinism(device: str, backends: list, repeats: int, small: bool, emulated: bool) -> int:
    failed = 0
    for case in [c for c in cases(small) if c.ticket]:
        t = _tensors(case)
        for backend in backends:
            ws = workspace(case, backend, device)
            first = run(case, backend, device, t, ws)
            diffs = [(i, d) for i in range(1, repeats)
                     for d in [differences(first, run(case, backend, device, t, ws))] if d]
            line = f"{case.name:24s} {backend:14s} {repeats} runs: "
            line += "bitwise identical" if not diffs else f"{len(diffs)} differ, first {diffs[0]}"
            if emulated and backend == "native":
                emu = run(case, "cuda_emulated", "cpu", t, workspace(case, "cuda_emulated", "cpu"))
                d = differences(first, emu)
                line += "; = cuda_emulated bitwise" if not d else f"; cuda_emulated differs: {d}"
                failed += bool(d)
            failed += bool(diffs)
            print(line, flush=True)
    print("determinism:", "FAILED" if failed else "passed")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the calls, run nothing")
    mode.add_argument("--once", action="store_true", help="each op once")
    mode.add_argument("--determinism", type=int, metavar="REPEATS", help="the stress")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", nargs="+", default=["native", "triton"])
    ap.add_argument("--small", action="store_true", help="small inputs (a CPU run of the driver)")
    ap.add_argument("--no-emulated", action="store_true",
                    help="skip the comparison of native CUDA with cuda_emulated")
    args = ap.parse_args(argv)
    if args.list:
        for case in cases(args.small):
            print(f"{case.name:24s} {case.op:22s} {case.dtype} {case.shapes}"
                  f"{'  ticket' if case.ticket else ''}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --list, or --device cpu --backends cuda_emulated")
    if args.once:
        return once(args.device, args.backends, args.small)
    emulated = (not args.no_emulated and args.device.startswith("cuda")
                and ops.available_backends()["cuda_emulated"].startswith("loaded"))
    return determinism(args.device, args.backends, args.determinism, args.small, emulated)


if __name__ == "__main__":
    sys.exit(main())
