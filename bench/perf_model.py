"""Performance model of the fused updates: bytes moved, kernel launches, predicted GPU time, and
the time measured here on the CPU next to it.

For each op (``lomo_update``, ``adalomo_update``, bf16) and shape (a 4096x4096 weight, a
32000x4096 and a 128256x4096 embedding / LM head, a whole Llama-3-8B), the model counts

* bytes: docs/spec.md's fewest bytes (LOMO: read p, read g, write p = 6 B/element in bf16;
  AdaLomo 2-d: g read 3x, p read 2x, p written once = 12 B/element; 1-d: 5 x element size + 12,
  see bench/shapes.py) plus the fp32 AdaLomo state read and written once (r, c or v);
* launches per backend (CUDA native, Triton), today and after the kernels' rewrite, from the
  ``LAUNCHES`` table below (the kernels' owners keep it current);
* predicted time = bytes / bandwidth + launches x launch latency, at the peak HBM bandwidths of an
  H100 (3.0 TB/s) and an H200 (4.3 TB/s) and ``--launch-us`` (default 4 us: the 3-5 us a
  dependent kernel costs from the host through PyTorch's dispatcher and the GPU's launch queue;
  Triton's Python launcher costs more on the host, which is not modelled). PREDICTIONS: no GPU
  was used.

``--measure`` times the native CPU kernels here (``--threads``, default 2) side by side with the
same-bytes stream of the same tensors (bench/same_bytes.py: the update's fewest bytes in its own
passes, interleaved call by call with the op so that load from other processes hits both alike),
``--repeats`` times, and reports medians with the 1-minute load average before and after. A
whole model is measured as the sum over its distinct shapes of (count x time of one update). The
CPU prediction is the same-bytes stream's time (the update at the memory bound).

examples:
  python bench/perf_model.py                                   # the model only (no timing)
  python bench/perf_model.py --measure --shapes 4096x4096      # + CPU, 2 threads (one line)
  python bench/perf_model.py --measure --out bench/results/perf_model   # what is committed
  python bench/perf_model.py --backward --repeats 5        # whole step of bench_backward's
                                                           # bwd-small: Lomo / AdaLomo vs plain
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # python bench/perf_model.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import environment, memprobe, same_bytes, shapes as model_shapes, timing as bench_timing

OPS = ("lomo_update", "adalomo_update")
SHAPES = ("4096x4096", "32000x4096", "128256x4096", "llama3-8b")
GPUS = {"H100": 3.0e12, "H200": 4.3e12}  # bytes / s (peak HBM, as the project plans with)
LAUNCH_US = 4.0

# Kernel launches of one update call, per backend: per 2-d (or N-d) parameter, per 1-d
# parameter updated on its own, and per multi-tensor call over a list of 1-d parameters (None:
# no multi-tensor kernel, the list costs one single-tensor call per tensor). A cudaMemset
# counts as a launch. "today": read from csrc/cuda/*.cu and triton_kernels/*.py at this commit;
# "target": after the rewrite (at most 3 launches per factored AdaLomo update, no memset, the
# 1-d parameters of a step in one multi-tensor call per dtype: a statistics pass and an apply
# pass).
LAUNCHES = {
    "cuda": {
        # adalomo 2-d: stats, unorm, apply with ticketed finishers; a 1-d tensor up to 65,536
        # elements, or a multi-tensor call per dtype: one launch (tests/test_cuda_contract.py)
        "today": {"lomo": (1, 1, 1), "adalomo": (3, 1, 1)},
        "target": {"lomo": (1, 1, 1), "adalomo": (3, 2, 2)},
    },
    "triton": {
        # adalomo 2-d: 3 passes with ticket finishers; a small 1-d tensor, or a multi-tensor
        # call per dtype: one launch (triton_kernels.launches, tests/test_triton_launches.py)
        "today": {"lomo": (1, 1, 1), "adalomo": (3, 1, 1)},
        "target": {"lomo": (1, 1, 1), "adalomo": (3, 2, 2)},
    },
}

DTYPE = torch.bfloat16
LR, LOSS_SCALE, BETA = 1e-3, 2.0**10, 1.0 - 2.0**-0.8  # AdaLomo at t = 2 (bench_adalomo_update)


def shape_list(token: str):
    return model_shapes.parse_shape(token)[1]


def model_bytes(op: str, shapes) -> int:
    """Fewest bytes (docs/spec.md) + the fp32 AdaLomo state read and written once."""
    total = model_shapes.fewest_bytes(op, shapes, DTYPE)
    if op == "adalomo_update":
        for s in shapes:  # the 1-d state is already in fewest_bytes (the 12 B per element)
            if len(s) >= 2:
                total += 2 * 4 * math.prod(s[:-2]) * (s[-2] + s[-1])
    return total


def launches(op: str, shapes, backend: str, when: str) -> int:
    per_2d, per_1d, multi = LAUNCHES[backend][when][op.removesuffix("_update")]
    n2 = sum(1 for s in shapes if len(s) >= 2)
    n1 = len(shapes) - n2
    if n1 == 0:
        return n2 * per_2d
    return n2 * per_2d + (multi if multi is not None and n1 > 1 else n1 * per_1d)


def predict(op: str, shapes, launch_us: float) -> dict:
    nbytes = model_bytes(op, shapes)
    row = {"op": op, "bytes": nbytes}
    for backend in LAUNCHES:
        for when in ("today", "target"):
            n = launches(op, shapes, backend, when)
            row[f"launches_{backend}_{when}"] = n
            for gpu, bw in GPUS.items():
                row[f"pred_us_{gpu}_{backend}_{when}"] = nbytes / bw * 1e6 + n * launch_us
    return row


# ---------------------------------------------------------------------------------------------
# CPU measurement
# ---------------------------------------------------------------------------------------------


def _op_fn(op: str, p, g):
    """(one update of (p, g) through the native CPU kernel, as an optimizer calls it: a reused
    workspace, a device overflow flag, lomo-optim's default loss scale for AdaLomo; its state)"""
    from lomo_kernels import ops

    impl = ops.get_impl(op + "_", "native", "cpu")
    ws = torch.zeros(ops.workspace_numel(op + "_", [p.shape], backend="native"))
    flag = torch.zeros(1)
    if op == "lomo_update":
        return (lambda: impl(p, g, None, flag, LR, 0.0, 1.0, 0.0, "nearest", 0, 1, None, ws)), {}
    st = {k: torch.rand(s) * 1e-4 + 1e-6 for k, s in ops.adalomo_state_shapes(p.shape).items()}
    return (lambda: impl(p, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
                         st.get("exp_avg_sq"), None, flag, LR, 0.0, LOSS_SCALE, 0.0, BETA,
                         1e-30, 1e-3, 1.0, "nearest", 0, 2, None, ws)), st


def _time_interleaved(fns: dict, **timing) -> dict:
    """timing.time_interleaved (one call of each function per round), also recording per call
    the CPU time of the whole process (all threads): {name: (wall ms, CPU ms)}, medians. On a
    shared machine the CPU time is the steadier of the two (it does not count the time a thread
    waits for a core; it does count threads spinning at a barrier)."""
    cpu = {k: [] for k in fns}

    def with_cpu_time(k, f):
        def run():
            c0 = time.process_time()
            f()
            cpu[k].append((time.process_time() - c0) * 1e3)
        return run

    t = bench_timing.time_interleaved({k: with_cpu_time(k, f) for k, f in fns.items()}, "cpu",
                                **timing)
    # the last `reps` calls are the timed ones (the others warmed up)
    return {k: (t[k].median_ms, statistics.median(cpu[k][-t[k].reps:])) for k in fns}


def measure_shape(op: str, shape, repeats: int, timing: dict) -> dict:
    """Median ms of one update of `shape` and of its same-bytes stream, interleaved, `repeats`
    times."""
    params, grads = model_shapes.make_params([shape], DTYPE, "cpu", g_std=1e-3 * LOSS_SCALE)
    fn, states = _op_fn(op, params[0], grads[0])
    ref = same_bytes.stream_fn(op, params, grads, [states])
    res = {"op_ms": [], "same_bytes_ms": [], "op_cpu_ms": [], "same_bytes_cpu_ms": [],
           "load_1min": []}
    for _ in range(repeats):
        load0 = os.getloadavg()[0]
        t = _time_interleaved({"op": fn, "same_bytes": ref}, **timing)
        res["op_ms"].append(t["op"][0])
        res["op_cpu_ms"].append(t["op"][1])
        res["same_bytes_ms"].append(t["same_bytes"][0])
        res["same_bytes_cpu_ms"].append(t["same_bytes"][1])
        res["load_1min"].append((round(load0, 2), round(os.getloadavg()[0], 2)))
    return {**{k + "_median": statistics.median(v) for k, v in res.items() if k != "load_1min"},
            **res}


def measure(op: str, token: str, repeats: int, timing: dict) -> dict:
    counts = Counter(tuple(s) for s in shape_list(token))
    tot = Counter()
    per_shape, loads = {}, []
    for shape, count in counts.items():
        m = measure_shape(op, shape, repeats, timing)
        for k in ("op_ms", "same_bytes_ms", "op_cpu_ms", "same_bytes_cpu_ms"):
            tot[k] += count * m[k + "_median"]
        loads += m["load_1min"]
        per_shape["x".join(map(str, shape))] = {"count": count, **m}
        memprobe.free_memory("cpu")
    nbytes = model_bytes(op, shape_list(token))
    return {"cpu_ms": tot["op_ms"], "cpu_gbps": nbytes / (tot["op_ms"] * 1e-3) / 1e9,
            "same_bytes_gbps": nbytes / (tot["same_bytes_ms"] * 1e-3) / 1e9,
            "frac_same_bytes": tot["same_bytes_ms"] / tot["op_ms"],
            "cpu_pred_ms": tot["same_bytes_ms"],
            "cpu_time_ms": tot["op_cpu_ms"], "same_bytes_cpu_time_ms": tot["same_bytes_cpu_ms"],
            "frac_same_bytes_cpu_time": tot["same_bytes_cpu_ms"] / tot["op_cpu_ms"],
            "same_bytes_impl": same_bytes.implementation("cpu"),
            "load_1min_min": min(min(x) for x in loads),
            "load_1min_max": max(max(x) for x in loads), "per_shape": per_shape}


def measure_backward(model: str, repeats: int, timing: dict, backend: str = "native") -> list:
    """Forward + backward (+ the in-backward update) of bench_backward's `model`, plain / Lomo /
    AdaLomo side by side (interleaved), `repeats` times: rows with the medians and the ratios to
    the plain step."""
    import copy

    from bench import bench_backward

    base, ids = bench_backward.build_model(model, DTYPE, "cpu")
    variants = [("backward_plain", "none"), ("backward_lomo", backend),
                ("backward_adalomo", backend)]
    steps = {v: bench_backward._make_step(*v, copy.deepcopy(base), ids, "cpu")[0]
             for v in variants}
    res = {v: {"wall": [], "cpu": []} for v in variants}
    loads = []
    for _ in range(repeats):
        load0 = os.getloadavg()[0]
        t = _time_interleaved(steps, **timing)
        for v in variants:
            res[v]["wall"].append(t[v][0])
            res[v]["cpu"].append(t[v][1])
        loads.append((round(load0, 2), round(os.getloadavg()[0], 2)))
    plain = res[variants[0]]
    rows = []
    for v in variants:
        r = res[v]
        rows.append({
            "op": v[0], "backend": v[1], "shape": model, "wall_ms": statistics.median(r["wall"]),
            "cpu_ms": statistics.median(r["cpu"]),
            # the ratio of each interleaved timing, then the median over the repeats
            "ratio_wall": statistics.median(a / b for a, b in zip(r["wall"], plain["wall"])),
            "ratio_cpu": statistics.median(a / b for a, b in zip(r["cpu"], plain["cpu"])),
            "wall_ms_all": r["wall"], "cpu_ms_all": r["cpu"], "load_1min": loads})
    return rows


def format_backward(rows) -> str:
    out = [f"{'step':<18} {'backend':<8} {'model':<10} {'wall ms':>8} {'x plain':>8} "
           f"{'CPU ms':>8} {'x plain (CPU time)':>18}  load"]
    for r in rows:
        lo = min(min(x) for x in r["load_1min"])
        hi = max(max(x) for x in r["load_1min"])
        out.append(f"{r['op']:<18} {r['backend']:<8} {r['shape']:<10} {r['wall_ms']:>8.1f} "
                   f"{r['ratio_wall']:>8.3f} {r['cpu_ms']:>8.1f} {r['ratio_cpu']:>18.3f}  "
                   f"{lo:.1f}-{hi:.1f}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _cell(v, spec):
    return "-" if v is None else spec.format(v)


def format_table(rows, measured: bool) -> str:
    head = ["op", "shape", "MB", "launches cuda now/target", "triton now/target",
            "H100 us cuda now/target", "H200 us cuda now/target", "H100 us triton target",
            "H200 us triton target"]
    if measured:
        head += ["CPU ms", "CPU GB/s", "same-bytes GB/s", "of same-bytes",
                 "of same-bytes (CPU time)", "load"]
    lines = [head]
    for r in rows:
        cells = [r["op"], r["shape"], f"{r['bytes'] / 1e6:.1f}",
                 f"{r['launches_cuda_today']}/{r['launches_cuda_target']}",
                 f"{r['launches_triton_today']}/{r['launches_triton_target']}"]
        for gpu in GPUS:
            cells.append(f"{r[f'pred_us_{gpu}_cuda_today']:.0f}/"
                         f"{r[f'pred_us_{gpu}_cuda_target']:.0f}")
        cells += [f"{r[f'pred_us_{gpu}_triton_target']:.0f}" for gpu in GPUS]
        if measured:
            cells += [_cell(r.get("cpu_ms"), "{:.2f}"), _cell(r.get("cpu_gbps"), "{:.1f}"),
                      _cell(r.get("same_bytes_gbps"), "{:.1f}"),
                      _cell(r.get("frac_same_bytes"), "{:.2f}"),
                      _cell(r.get("frac_same_bytes_cpu_time"), "{:.2f}"),
                      "-" if "load_1min_min" not in r
                      else f"{r['load_1min_min']:.1f}-{r['load_1min_max']:.1f}"]
        lines.append(cells)
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python bench/perf_model.py", description=__doc__.split("\n\n")[0],
        epilog="examples:" + __doc__.split("examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="SHAPE",
                    help=f"shapes or models (default: {' '.join(SHAPES)})")
    ap.add_argument("--launch-us", type=float, default=LAUNCH_US,
                    help="latency of one kernel launch in the prediction (default 4)")
    ap.add_argument("--measure", action="store_true", help="time the native CPU kernels here")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timings per shape")
    ap.add_argument("--rep-ms", type=float, default=400.0, help="timer budget per timing")
    ap.add_argument("--backward", nargs="?", const="bwd-small", default=None, metavar="MODEL",
                    help="instead of the model: time forward + backward + update of "
                         "bench_backward's MODEL (default bwd-small) against a plain one")
    ap.add_argument("--out", type=Path, default=None,
                    help="write perf_model.json and perf_model.md there")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    timing = dict(warmup_ms=50.0, rep_ms=a.rep_ms, min_reps=5)
    if a.backward:
        rows = measure_backward(a.backward, a.repeats, timing)
        env = environment.environment("cpu")
        title = (f"{env['device_name']}, {a.threads} threads, torch {env['torch_version']}, "
                 f"commit {env['git_commit']}" + (" (dirty)" if env["git_dirty"] else ""))
        print(title)
        print(format_backward(rows))
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / f"backward_{a.backward}.json").write_text(json.dumps(
                {"environment": env, "meta": {"argv": sys.argv[1:] if argv is None else argv},
                 "rows": rows}, indent=1) + "\n")
        return
    rows = []
    for token in a.shapes:
        shapes = shape_list(token)
        for op in a.ops:
            row = {"shape": token, "n_tensors": len(shapes), "numel": model_shapes.numel_of(shapes),
                   **predict(op, shapes, a.launch_us)}
            if a.measure:
                row.update(measure(op, token, a.repeats, timing))
            rows.append(row)
            print(f"# {op} {token} done", file=sys.stderr, flush=True)
    env = environment.environment("cpu")
    title = (f"GPU times are PREDICTIONS (bytes / peak bandwidth + launches x {a.launch_us:g} us; "
             f"{', '.join(f'{k} {v / 1e12:.1f} TB/s' for k, v in GPUS.items())})"
             + (f"; CPU: measured on {env['device_name']}, {a.threads} threads, "
                f"torch {env['torch_version']}" if a.measure else "")
             + f"; commit {env['git_commit']}" + (" (dirty)" if env["git_dirty"] else ""))
    table = format_table(rows, a.measure)
    print(title)
    print(table)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        meta = {"argv": sys.argv[1:] if argv is None else argv, "launch_us": a.launch_us,
                "gpu_bandwidth_bytes_per_s": GPUS, "launches_table": LAUNCHES,
                "gpu_times": "predictions", "cpu_times": "measured" if a.measure else None}
        (a.out / "perf_model.json").write_text(
            json.dumps({"environment": env, "meta": meta, "rows": rows}, indent=1) + "\n")
        (a.out / "perf_model.md").write_text(f"{title}\n\n```\n{table}\n```\n")


if __name__ == "__main__":
    main()
