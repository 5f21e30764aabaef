"""Throughput of the SIMT emulation that runs the CUDA kernels on the CPU (backend cuda_emulated):
elements per second and fiber context switches per second, per kernel, fiber switch (the x86-64
switch or glibc's ucontext) and number of OS threads. It says how fast CI executes the CUDA code,
not how fast a GPU runs it.

    python bench/bench_emulation.py [--numel 4194304] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lomo_kernels import ops


def _cases(numel):
    cols = 4096
    rows = max(numel // cols, 1)
    return [("lomo_update_", (numel,)), ("adalomo_update_", (rows, cols)),
            ("adalomo_update_", (numel,))]


def _run(op, backend, p, g, st):
    if op == "lomo_update_":
        ops.lomo_update_(p, g, lr=1e-3, weight_decay=0.01, rounding="stochastic", backend=backend)
    else:
        ops.adalomo_update_(p, g, lr=1e-3, beta=0.5, rounding="stochastic", backend=backend, **st)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}, torch threads: {torch.get_num_threads()}")
    header = ("op", "shape", "fibers", "OS threads", "median s", "Melem/s", "Mswitch/s",
              "switches/elem", "native CPU s")
    rows = []
    for op, shape in _cases(args.numel):
        gen = torch.Generator().manual_seed(0)
        p0 = torch.randn(shape, generator=gen).to(torch.bfloat16)
        g = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
        st0 = {k: torch.rand(s, generator=gen) + 0.1
               for k, s in ops.adalomo_state_shapes(shape).items()}
        p, st = p0.clone(), {k: v.clone() for k, v in st0.items()}
        t = time.perf_counter()
        _run(op, "native", p, g, st)
        native = time.perf_counter() - t
        for fibers in ("asm", "ucontext"):
            for threads in (1, 2):
                os.environ["LOMO_KERNELS_EMULATION_FIBERS"] = fibers
                os.environ["LOMO_KERNELS_EMULATION_THREADS"] = str(threads)
                times, switches = [], []
                for _ in range(args.reps):
                    p, st = p0.clone(), {k: v.clone() for k, v in st0.items()}
                    before = ops.emulation_stats()["context_switches"]
                    t = time.perf_counter()
                    _run(op, "cuda_emulated", p, g, st)
                    times.append(time.perf_counter() - t)
                    switches.append(ops.emulation_stats()["context_switches"] - before)
                med, sw = statistics.median(times), statistics.median(switches)
                n = p0.numel()
                rows.append((op, "x".join(map(str, shape)), fibers, threads, f"{med:.3f}",
                             f"{n / med / 1e6:.1f}", f"{sw / med / 1e6:.1f}", f"{sw / n:.3f}",
                             f"{native:.3f}"))
    for k in ("LOMO_KERNELS_EMULATION_FIBERS", "LOMO_KERNELS_EMULATION_THREADS"):
        os.environ.pop(k, None)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
