"""The bandwidth fraction of the native CPU updates: each update timed interleaved with its
same-bytes stream, at several thread counts, in one process.

For every op (``lomo``, ``adalomo``), dtype, shape and thread count: the native update, called as
the optimizers' hooks call it (``bench_lomo_update`` / ``bench_adalomo_update``: found_inf flag,
gradient-norm accumulator, workspace allocated once), and the same-bytes stream of the same
tensors (bench/same_bytes.py: the update's fewest bytes, docs/spec.md, in its own passes, work
units and threads, with no arithmetic) are called alternately, round after round, for
``--rep-ms`` per function; ``--repeats`` such sessions per case, the thread counts taking turns,
and the rounds of all sessions pooled. ``frac_same_bytes`` is the median of the per-round ratios
``time(stream) / time(update)`` (p20 / p80 beside it): 1.0 means the update runs at the speed of
merely moving its bytes; the ratio is robust to load from other processes (both sides of a round
see the same machine), the absolute times are not. The 1-minute load average is recorded at the
start and end of every session. ``--clock thread`` (one thread) times each call by the calling
thread's CPU time instead, which leaves out the time other processes held the core: on a heavily
shared machine the wall-clock ratios scatter widely, these far less (the memory traffic of other
processes still slows both sides).

examples:
  python bench/bench_bandwidth.py                       # 4096x4096 bf16, 1 and 2 threads
  python bench/bench_bandwidth.py --dtypes bf16 fp16 fp32 --update-committed
        # what bench/results/cpu/bandwidth.json holds
  python bench/bench_bandwidth.py --threads 1 --clock thread    # CPU time: a loaded machine
  python bench/bench_bandwidth.py --threads 1 --rounding nearest stochastic
        # the 16-bit stores rounded both ways (stochastic: the optimizers' default for bf16/fp16)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_bandwidth.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import bench_adalomo_update, bench_lomo_update, memprobe, same_bytes, shapes
from bench import timing as timers
from bench.environment import add_output_args, environment, output_dir
from bench.report import load_range
from bench.results import write_json_payload

OPS = {"lomo": bench_lomo_update, "adalomo": bench_adalomo_update}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _quantiles(xs) -> tuple[float, float, float]:
    s = sorted(xs)
    return statistics.median(s), timers.quantile(s, 0.2), timers.quantile(s, 0.8)


def measure_case(op_name: str, dtype, shape_token: str, threads: list[int], repeats: int,
                 timing: dict, rounding: str = "nearest") -> list[dict]:
    """One row per thread count: the update against its same-bytes stream (module docstring)."""
    module = OPS[op_name]
    shape_name, shape_list = shapes.parse_shape(shape_token)
    params, grads = shapes.make_params(shape_list, dtype, "cpu", g_std=module.grad_std(dtype))
    cand = next(c for c in module.candidates("cpu", dtype, params, grads, ["native"], rounding)
                if c.backend == "native")
    fn, _ = cand.setup()
    ref = module.same_bytes_stream(params, grads)
    samples = {t: {"op": [], "same_bytes": [], "loads": []} for t in threads}
    for _ in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            load0 = _load()
            got = timers.time_interleaved({"op": fn, "same_bytes": ref}, "cpu", **timing)
            s = samples[t]
            s["op"] += got["op"].samples
            s["same_bytes"] += got["same_bytes"].samples
            s["loads"].append((load0, _load()))
    rows = []
    nbytes = shapes.fewest_bytes(module.OP, shape_list, dtype)
    for t in threads:
        s = samples[t]
        op_ms, op_p20, op_p80 = _quantiles(s["op"])
        sb_ms, sb_p20, sb_p80 = _quantiles(s["same_bytes"])
        rows.append({
            "op": module.OP, "backend": "native", "dtype": shapes.dtype_name(dtype),
            "shape": shape_name, "numel": shapes.numel_of(shape_list), "bytes_min": nbytes,
            "rounding": rounding,
            "threads": t, "rounds": len(s["op"]),
            "op_ms": op_ms, "op_p20_ms": op_p20, "op_p80_ms": op_p80,
            "same_bytes_ms": sb_ms, "same_bytes_p20_ms": sb_p20, "same_bytes_p80_ms": sb_p80,
            "gbps": nbytes / (op_ms * 1e-3) / 1e9,
            "same_bytes_gbps": nbytes / (sb_ms * 1e-3) / 1e9,
            **same_bytes.fraction_stats(s["same_bytes"], s["op"]),
            "same_bytes_impl": same_bytes.implementation("cpu"),
            "load_1min_start_end": s["loads"],
        })
    del fn, ref, params, grads
    memprobe.free_memory("cpu")
    return rows


def format_rows(rows) -> str:
    head = (f"{'op':<15} {'dtype':<5} {'rounding':<10} {'shape':<10} {'thr':>3} {'op ms':>8} "
            f"{'stream ms':>9} "
            f"{'GB/s':>6} {'frac':>5} {'p20-p80':>10} {'load':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['op']:<15} {r['dtype']:<5} {r.get('rounding', 'nearest'):<10} "
                   f"{r['shape']:<10} {r['threads']:>3} "
                   f"{r['op_ms']:>8.3f} {r['same_bytes_ms']:>9.3f} {r['gbps']:>6.1f} "
                   f"{r['frac_same_bytes']:>5.3f} "
                   f"{r['frac_same_bytes_p20']:.2f}-{r['frac_same_bytes_p80']:.2f} "
                   f"{load_range(r['load_1min_start_end']):>9}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_bandwidth.py",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="examples:" + __doc__.split("examples:")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], metavar="DTYPE")
    ap.add_argument("--shapes", nargs="+", default=["4096x4096"], metavar="SHAPE")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounding", nargs="+", default=["nearest"],
                    choices=["nearest", "stochastic"],
                    help="rounding of the 16-bit parameters' stores (default nearest)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved sessions per case and thread count (default 3)")
    ap.add_argument("--rep-ms", type=float, default=1500.0,
                    help="timed budget per function and session (default 1500)")
    ap.add_argument("--warmup-ms", type=float, default=100.0)
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: each call's CPU time of the calling thread, which leaves out "
                         "the time other processes held the core (needs --threads 1)")
    add_output_args(ap, "bandwidth.json")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    load_start = list(os.getloadavg())
    if a.clock == "thread" and a.threads != [1]:
        ap.error("--clock thread needs --threads 1 (other threads' time is not counted)")
    timing = dict(warmup_ms=a.warmup_ms, rep_ms=a.rep_ms, min_reps=5, clock=a.clock)
    rows = []
    for op in a.ops:
        for dt in shapes.split_list(a.dtypes):
            for shape in shapes.split_list(a.shapes):
                for rnd in a.rounding:
                    rows += measure_case(op, shapes.parse_dtype(dt), shape, a.threads, a.repeats,
                                         timing, rnd)
                    print(f"# {op} {dt} {rnd} {shape} done", file=sys.stderr, flush=True)
    env = environment("cpu")
    meta = {"argv": sys.argv[1:] if argv is None else list(argv),
            "command": "python bench/bench_bandwidth.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "threads": a.threads, "repeats": a.repeats, "timing": timing,
            "cpu_isa": os.environ.get("LOMO_KERNELS_CPU_ISA", "best for this CPU"),
            "load_avg_1_5_15min_start": [round(x, 2) for x in load_start],
            "load_avg_1_5_15min_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"# {env['device_name']} | torch {env['torch_version']} | commit {env['git_commit']}"
          f"{' (dirty)' if env['git_dirty'] else ''} | load {meta['load_avg_1_5_15min_start']}"
          f" -> {meta['load_avg_1_5_15min_end']}")
    print(format_rows(rows))
    out = output_dir(a, env)
    write_json_payload(out / "bandwidth.json", {"environment": env, "meta": meta, "rows": rows})
    print(f"wrote {out / 'bandwidth.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
