"""Run every lomo_kernels benchmark, print the tables, write JSON + CSV + a PNG plot.

Microbenchmarks of the fused updates (bench_lomo_update.py, bench_adalomo_update.py) over
shapes x dtypes x implementations (this project's native / triton / torch backends and the
references: lomo-optim's per-tensor update, torch.optim.SGD(fused=True), torch.optim.Adafactor),
then the whole-backward benchmark (bench_backward.py: forward + backward of a Llama-shaped model
with in-backward Lomo / AdaLomo against a plain backward). Every row carries the device,
versions, git commit, date and machine load; GB/s come from the fewest bytes each update must
move (docs/spec.md), and each update is timed interleaved with a stream that moves those bytes in
its passes (bench/same_bytes.py): the bandwidth fraction.
Results go to a new directory per run, bench/results/runs/<device>-<date>/, unless --out or
--update-committed says otherwise.

examples:
  python bench/run.py                                     # GPU if there is one: full sizes
  python bench/run.py --device cpu --sizes tiny --out /tmp/b   # CI smoke run (seconds)
  python bench/run.py --device cpu --threads 2 --shapes 4096x4096 --dtypes bf16
        # native CPU kernels against lomo-optim's per-tensor math and backend="torch",
        # and the fraction of the same-bytes stream (see the summary at the end)
  python bench/run.py --device cpu --threads 2 --ops none --update-committed --tag backward
        # the whole-backward step times quoted in README.md
  python bench/run.py --device cuda --ops adalomo --shapes llama3-8b --no-backward
  python bench/run.py --device cuda --ops none --backward-models llama-1b
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench import bench_adalomo_update, bench_backward, bench_lomo_update, shapes
from bench.environment import add_output_args, environment, output_dir
from bench.microbench import add_common_args, resolve_common_args
from bench.report import format_table, wrap, write_plot
from bench.results import write_csv, write_json

OPS = {"lomo": bench_lomo_update, "adalomo": bench_adalomo_update}
_OP_ALIASES = {"lomo": "lomo", "lomo_update": "lomo", "lomo_update_": "lomo",
               "adalomo": "adalomo", "adalomo_update": "adalomo", "adalomo_update_": "adalomo",
               "none": None}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.split("\n\nexamples:")[0],
        epilog="examples:" + __doc__.split("examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--ops", nargs="+", default=["lomo", "adalomo"], metavar="OP",
                    help="microbenchmarks to run: lomo, adalomo, or none (default: both)")
    ap.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                    help="run the whole-backward benchmark (default: on)")
    ap.add_argument("--backward-models", nargs="+", default=None, metavar="MODEL",
                    help="models of the backward benchmark (default by --sizes: "
                         + "; ".join(f"{k}={','.join(v)}" for k, v in
                                     bench_backward.SIZE_MODELS.items())
                         + f"); all: {', '.join(bench_backward.BACKWARD_MODELS)}")
    ap.add_argument("--backward-dtype", default="bf16",
                    help="parameter dtype of the backward benchmark (default bf16)")
    add_output_args(ap, "results.json / results.csv / results.png")
    ap.add_argument("--tag", default=None,
                    help="file name prefix: results-TAG.json etc. (to keep several runs, e.g. a "
                         "full GPU run split by --ops/--shapes, in one directory)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap.parse_args(argv)


def _summary(rows, env) -> list[str]:
    lines = [f"device: {env['device_name']} | torch {env['torch_version']} | triton "
             f"{env['triton_version']} | CUDA {env['cuda_version']} | threads {env['cpu_threads']}"
             f" | commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} | {env['date']}"
             f" | load (1/5/15 min) {env['load_avg_1_5_15min']}",
             f"backends: {env['backends_status']}"]
    for r in rows:
        if r.kind != "kernel" or r.backend == "torch" or not r.median_ms:
            continue
        sp = ", ".join(f"{k.replace('speedup_vs_', 'vs ')} {v:.2f}x" for k, v in r.speedups.items()
                       if v is not None)
        frac = (f" = {r.frac_same_bytes:.2f} of the same-bytes stream ({r.same_bytes_gbps:.1f}"
                f" GB/s; p20-p80 {r.frac_same_bytes_p20:.2f}-{r.frac_same_bytes_p80:.2f})"
                if r.frac_same_bytes and r.frac_same_bytes_p20 is not None else "")
        lines.append(f"{r.backend} {r.op} {r.dtype} {r.shape}: {r.median_ms:.4g} ms, "
                     f"{r.gbps:.1f} GB/s{frac}; {sp}")
    for r in rows:
        if r.ratio_to_plain_backward is not None and r.op != "backward_plain":
            lines.append(f"{r.op} [{r.backend}] {r.shape} {r.dtype}: "
                         f"{r.ratio_to_plain_backward:.3f}x a plain forward+backward")
    return lines


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    kw = resolve_common_args(args)
    device, sizes = kw["device"], kw["sizes"]
    ops = []
    for o in shapes.split_list(args.ops):
        if o.lower() not in _OP_ALIASES:
            raise SystemExit(f"--ops: unknown op {o!r}; use lomo, adalomo or none")
        if _OP_ALIASES[o.lower()] and _OP_ALIASES[o.lower()] not in ops:
            ops.append(_OP_ALIASES[o.lower()])
    bwd_models = (shapes.split_list(args.backward_models) if args.backward_models
                  else bench_backward.SIZE_MODELS[sizes]) if args.backward else []
    for m in bwd_models:
        if m not in bench_backward.BACKWARD_MODELS:
            raise SystemExit(f"--backward-models: unknown model {m!r}; "
                             f"use {', '.join(bench_backward.BACKWARD_MODELS)}")

    env = environment(device)
    out = output_dir(args, env)

    total = sum(OPS[o].n_measurements(device, kw["dtypes"], kw["shapes"], kw["backends"])
                for o in ops)
    total += bench_backward.n_measurements(device, bwd_models, kw["backends"])
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, mininterval=0.5,
                   disable=args.no_progress, dynamic_ncols=True)
    except ImportError:
        bar = None

    rows = []
    for o in ops:
        rows += OPS[o].run(device, kw["dtypes"], kw["shapes"], backends=kw["backends"],
                           timing=kw["timing"], progress=bar)
    if bwd_models:
        rows += bench_backward.run(device, bwd_models, dtype=args.backward_dtype,
                                   backends=kw["backends"], timing=kw["timing"], sizes=sizes,
                                   progress=bar)
    if bar is not None:
        bar.close()

    meta = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "sizes": sizes,
        "shapes": [name for name, _ in kw["shapes"]],
        "dtypes": [shapes.dtype_name(d) for d in kw["dtypes"]],
        "ops": ops,
        "backward_models": bwd_models,
        "timing": kw["timing"],
        "wall_s": None,
        "tag": args.tag,
    }
    print(format_table(rows))
    print()
    for line in _summary(rows, env):
        print(wrap(line))
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    stem = out / (f"results-{args.tag}" if args.tag else "results")
    write_json(Path(f"{stem}.json"), rows, env, meta)
    write_csv(Path(f"{stem}.csv"), rows, env)
    plotted = write_plot(Path(f"{stem}.png"), rows, env)
    print()
    plot = ", .png" if plotted else " (no plot: no microbenchmark rows)"
    print(wrap(f"wrote {stem}.json, .csv{plot} in {meta['wall_s']} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
