"""The results tables of docs/results.md (Markdown), from the JSON files a benchmark run wrote

    python bench/summary.py                       # bench/results/cpu/, the committed results
    python bench/summary.py bench/results/runs/cpu-20260101T000000Z

Reads memory.json (bench_memory.py), convergence.json (bench_convergence.py) and
results-backward.json (run.py --ops none --tag backward) where they exist, and prints for each
the machine, the load, the command that reproduces it, and the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/summary.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def markdown(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _machine(env: dict) -> str:
    load = env.get("load_avg_1_5_15min") or [env.get("load_avg_1min")]
    mem = f", {env['memory_total_gib']:.0f} GiB" if env.get("memory_total_gib") else ""
    return (f"{env['device_name']}{mem}, torch {env['torch_version']}, commit "
            f"{env['git_commit']}, {env['date'][:10]}, load average {load[0]} at the start")


def _gib(x) -> str:
    return f"{x / GIB:.2f}" if isinstance(x, (int, float)) else "-"


def memory_case(r: dict) -> str:
    """A memory row's case: the optimizer, its loss chunking and glibc's mmap threshold."""
    opts = [f"loss/{r['loss_chunk']}" if r.get("loss_chunk") else "",
            f"mmap {r['mmap_threshold_mib']:g} MiB" if r.get("mmap_threshold_mib") else ""]
    opts = ", ".join(o for o in opts if o)
    return r["optimizer"] + (f" ({opts})" if opts else "")


def memory(path: Path) -> str:
    data = json.loads(path.read_text())
    rows, args = data["rows"], data["args"]
    # a column group per (model, sequence length); a row per case (and loss chunking)
    col = lambda r: (r["model_config"], r.get("seq_len", args["seq_len"]))  # noqa: E731
    case_of = memory_case
    configs = list(dict.fromkeys(col(r) for r in rows))
    cases = list(dict.fromkeys(case_of(r) for r in rows))
    by = {(col(r), case_of(r)): r for r in rows}
    seqs = sorted({s for _, s in configs})
    headers = ["case"]
    for c in configs:
        n = next((r["n_params"] for r in rows if r["model_config"] == c[0] and r.get("n_params")),
                 0)
        seq = f" seq {c[1]}" if len(seqs) > 1 else ""
        headers += [f"{c[0]} ({n / 1e9:.2f}B){seq} peak RSS", "allocator", "estimate",
                    "step (s)"]
    headers.append("state (MiB)")
    table = []
    for case in cases:
        cells = [f"`{case}`"]
        state = "-"
        for c in configs:
            r = by.get((c, case))
            if r is None:
                cells += ["-"] * 4
                continue
            if r["status"] == "ok":
                cells += [_gib(r.get("peak_bytes")), _gib(r.get("alloc_peak_bytes")),
                          _gib(r.get("estimate_bytes")),
                          f"{r['step_s']:.1f}" if r.get("step_s") else "-"]
                state = f"{r['state_bytes'] / 2**20:,.1f}" if state == "-" else state
            else:
                cells += [r.get("note") or r["status"], "-", _gib(r.get("estimate_bytes")), "-"]
        table.append(cells + [state])
    cmd = (f"python bench/bench_memory.py --device {args['device']} --model-config "
           f"{' '.join(dict.fromkeys(c for c, _ in configs))} --seq-len "
           f"{' / '.join(map(str, seqs))}"
           + (" --gradient-checkpointing" if args["gradient_checkpointing"] else "")
           + " --update-committed")
    if any(r["model_config"] == "llama3-8b" for r in rows):
        cmd += "`; the llama3-8b rows: `bash bench/memory_llama3_8b.sh"
    loads = sorted(r["load_avg_1min_before"] for r in rows if "load_avg_1min_before" in r)
    during = f"; 1-minute load during the cases {loads[0]}-{loads[-1]}" if loads else ""
    # rows merged from several runs: each row records its commit and date
    commits = list(dict.fromkeys(r["git_commit"] for r in rows if r.get("git_commit")))
    dates = sorted(r["date"][:10] for r in rows if r.get("date"))
    machine = _machine(data["environment"])
    if len(commits) > 1 or (dates and dates[0] != dates[-1]):
        machine = (machine[:machine.index(", commit ")] + f", commits {', '.join(commits)}, "
                   + (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"))
    return (f"Memory (GiB above the process baseline; {args['dtype']}, seq "
            f"{' / '.join(map(str, seqs))} x "
            f"batch {args['batch_size']}): {machine}{during}.\n`{cmd}`\n\n"
            + markdown(headers, table))


def convergence(path: Path) -> str:
    data = json.loads(path.read_text())
    runs = data["runs"]
    base = next((r for r in runs if r["optimizer"] == "adamw" and "error" not in r), None)
    table = []
    for r in runs:
        if "error" in r:
            table.append([r["optimizer"], r["lr"], "error", "-", "-", "-", "-"])
            continue
        gap = f"{100 * (r['final_eval_loss'] / base['final_eval_loss'] - 1):+.1f}%" if base \
            else "-"
        frac = f"{100 * r['state_bytes'] / base['state_bytes']:.1f}%" if base else "-"
        table.append([r["label"], f"{r['lr']:g}", f"{r['final_eval_loss']:.4f}", gap,
                      f"{r['tokens_per_s']:,.0f}", f"{r['state_bytes'] / 2**20:.2f} ({frac})",
                      f"{r['peak_rss_above_base_bytes'] / 2**20:,.0f}"])
    a = data["args"]
    loads = sorted({x for r in runs if "load_avg_before" in r for x in r["load_avg_before"][:1]})
    flags = "".join(f" --{k.replace('_', '-')} {a[k]}" for k in
                    ("model", "steps", "batch_size", "seq_len", "warmup", "eval_every",
                     "eval_batches") if k in a)
    return (f"Convergence ({a['model']}, {a['steps']} steps x {a['batch_size']} x {a['seq_len']} "
            f"tokens): {_machine(data['environment'])}; 1-minute load during the runs "
            f"{loads[0]}-{loads[-1]}.\n`python bench/bench_convergence.py{flags} "
            f"--update-committed`\n\n"
            + markdown(["optimizer", "lr", "final eval loss", "vs AdamW", "tokens/s",
                        "state MiB (vs AdamW)", "peak RSS MiB"], table))


def step_time(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["op"].startswith("backward_")]
    table = [[r["shape"], r["op"].removeprefix("backward_"), r["backend"],
              f"{r['median_ms']:.1f}" if r["median_ms"] else "-",
              f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}" if r["p20_ms"] else "-",
              f"{r['ratio_to_plain_backward']:.3f}x" if r["ratio_to_plain_backward"] else "-"]
             for r in rows]
    shape = f"{rows[0]['dtype']}, {rows[0]['note']}" if rows else ""
    return (f"Step time (forward + backward, {shape}): {_machine(data['environment'])}.\n"
            f"`python bench/run.py {' '.join(data['meta']['argv'])}`\n\n"
            + markdown(["model", "optimizer", "implementation", "median ms", "p20-p80 ms",
                        "vs plain backward"], table))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results" / "cpu"
    parts = []
    for name, fn in (("memory.json", memory), ("convergence.json", convergence),
                     ("results-backward.json", step_time)):
        if (folder / name).exists():
            parts.append(fn(folder / name))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
