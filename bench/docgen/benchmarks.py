"""docs/benchmarks.md: the CPU bandwidth fractions (bench/bench_bandwidth.py's two committed
files) and the GPU predictions of bench/perf_model.py."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import CPU, Results, command

FILES = (f"{CPU}/bandwidth-thread-clock.json", f"{CPU}/bandwidth.json")
OPS = {"lomo_update": "`lomo_update_`", "adalomo_update": "`adalomo_update_`"}


def _loads(data: dict) -> list[float]:
    m = data["meta"]
    return [x[0] for x in (m["load_avg_1_5_15min_start"], m["load_avg_1_5_15min_end"])] + [
        x for r in data["rows"] for pair in r.get("load_1min_start_end", []) for x in pair]


def _command(data: dict) -> str:
    return command("bench/bench_bandwidth.py", data["meta"]["argv"])


def _rounding(r: dict) -> str:
    return r.get("rounding", "nearest")  # files written before --rounding existed: nearest


def _op_label(r: dict) -> str:
    name = OPS.get(r["op"], r["op"])
    return name if _rounding(r) == "nearest" else f"{name}, {_rounding(r)} rounding"


def load_range(res: Results) -> str:
    loads = [x for f in FILES for x in _loads(res(f))]
    return f"{min(loads):g}-{max(loads):g}"


def table(res: Results) -> str:
    """One row per (clock, threads, op), thread CPU time first; where and how below."""
    rows, sources = [], []
    for f in FILES:
        data = res(f)
        clock = data["meta"]["timing"]["clock"]
        label = "thread CPU time" if clock == "thread" else "wall"
        for r in sorted(data["rows"], key=lambda r: (r["threads"], r["op"] != "lomo_update",
                                                     _rounding(r) != "nearest")):
            frac = f"{r['frac_same_bytes']:.2f}"
            rows.append([f"{label}, {r['threads']}", _op_label(r), r["rounds"],
                         f"{r['op_ms']:.2f}", f"{r['same_bytes_ms']:.2f}",
                         f"**{frac}**" if clock == "thread" else frac,
                         f"{r['frac_same_bytes_p20']:.2f}-{r['frac_same_bytes_p80']:.2f}"])
        env = data["environment"]
        sources.append(f"`{f}`: commit {env['git_commit']}, {env['date'][:16].replace('T', ' ')}"
                       f" UTC, 1-minute load {min(_loads(data)):g}-{max(_loads(data)):g}, "
                       f"`{_command(data)}`")
    return (summary.markdown(["clock, threads", "op", "rounds", "update ms", "stream ms",
                              "fraction", "p20-p80"], rows)
            + "\n\n" + ";\n".join(sources) + ".")


def _one_thread(res: Results) -> dict:
    return {(r["op"], f): r for f in FILES for r in res(f)["rows"]
            if r["threads"] == 1 and _rounding(r) == "nearest"}


def stream_speed(res: Results) -> str:
    """One core's same-bytes stream, by the thread CPU clock."""
    rows = _one_thread(res)
    lomo, ada = (rows[(op, FILES[0])]["same_bytes_gbps"] for op in OPS)
    return (f"On one core the LOMO stream moves about {lomo:.0f} GB/s (AdaLomo's, with three "
            f"passes, {ada:.0f} GB/s)")


def wall_over_cpu(res: Results) -> str:
    """The one-thread wall-clock update time over the thread CPU time of the same update."""
    rows = _one_thread(res)
    ratios = [rows[(op, FILES[1])]["op_ms"] / rows[(op, FILES[0])]["op_ms"] for op in OPS]
    return f"{min(ratios):.1f}-{max(ratios):.1f}x"


GPU_SHAPES = {"4096x4096": "4096 x 4096", "128256x4096": "128256 x 4096",
              "llama3-8b": "Llama-3-8B, every parameter"}


def gpu_predictions(res: Results) -> str:
    """bench/perf_model.py's model (no measurement): bytes at peak bandwidth + launches of the
    native CUDA kernels as they are."""
    from bench import perf_model as pm

    rows = []
    for token, label in GPU_SHAPES.items():
        for op in pm.OPS:
            p = pm.predict(op, pm.shape_list(token), pm.LAUNCH_US)
            rows.append([OPS[op], label, f"{p['bytes'] / 1e6:.1f}", p["launches_cuda_today"]]
                        + [f"{p[f'pred_us_{g}_cuda_today']:.0f}" for g in pm.GPUS])
    bw = ", ".join(f"{g} {b / 1e12:.1f} TB/s" for g, b in pm.GPUS.items())
    return (f"Predicted by `python bench/perf_model.py` (bytes at the peak HBM bandwidth, {bw}, "
            f"plus {pm.LAUNCH_US:g} us per kernel launch of the native CUDA kernels):\n\n"
            + summary.markdown(["op (bf16)", "shape", "MB moved", "launches"]
                               + [f"{g} us (predicted)" for g in pm.GPUS], rows))


IN_CACHE = f"{CPU}/bandwidth-in-cache.json"


def in_cache(res: Results) -> str:
    """The updates with their operands in the L3 cache (one core, thread CPU clock) against the
    same-bytes stream from memory at 4096 x 4096: the arithmetic's own time per element."""
    data = res(IN_CACHE)
    big = _one_thread(res)
    parts = []
    for r in sorted(data["rows"], key=lambda r: r["op"] != "lomo_update"):
        if r["threads"] != 1 or _rounding(r) != "nearest":
            continue
        mem = big[(r["op"], FILES[0])]
        parts.append(f"{OPS[r['op']]} {1e6 * r['op_ms'] / r['numel']:.2f} ns per element in "
                     f"cache, its stream {1e6 * mem['same_bytes_ms'] / mem['numel']:.2f} ns from "
                     f"memory")
    shape = data["rows"][0]["shape"].replace("x", " x ")
    return (f"At {shape} (bf16 `p` and `g` of {data['rows'][0]['numel'] * 4 / 2**20:.0f} MiB, "
            f"inside this CPU's 32 MiB L3 cache), one core: " + "; ".join(parts)
            + f" (`{IN_CACHE}`, commit {data['environment']['git_commit']}, "
            f"`{_command(data)}`)")


RUNS = {"per block of 1024": f"{CPU}/bandwidth-lomo-check-per-block.json",
        "per run of 128": f"{CPU}/bandwidth-lomo-check-per-run.json"}


def lomo_runs(res: Results) -> str:
    """LOMO's fast path with its NaN/Inf check per block of 1024 elements (the earlier loop)
    and per run of 128 (the loop now), the two builds measured back to back."""
    rows = []
    for label, f in RUNS.items():
        data = res(f)
        for r in sorted(data["rows"], key=lambda r: (_rounding(r) != "nearest", r["threads"])):
            rows.append([label, _rounding(r), r["threads"], f"{r['op_ms']:.2f}",
                         f"{r['same_bytes_ms']:.2f}", f"{r['frac_same_bytes']:.2f}",
                         f"{r['frac_same_bytes_p20']:.2f}-{r['frac_same_bytes_p80']:.2f}"])
    data = res(RUNS["per run of 128"])
    env = data["environment"]
    return (summary.markdown(["NaN/Inf check", "rounding", "threads", "update ms", "stream ms",
                              "fraction", "p20-p80"], rows)
            + f"\n\n`{'`, `'.join(RUNS.values())}`: {env['date'][:16].replace('T', ' ')} UTC, "
            f"`{_command(data)}` with each build ("
            + "; ".join(res(f)["meta"]["build"] for f in RUNS.values()) + ").")
