"""Tables and a plot of bench/finetune_study.py's results: the learning-rate sweep, each optimizer
at its best rate over 3 seeds (held-out loss and exact match: mean, standard deviation, range),
step time and its ratio to a plain forward+backward, peak memory, optimizer state; the bf16
rounding study.

    python bench/finetune_study_report.py                     # the committed results
    python bench/finetune_study_report.py --dir /tmp/x        # another run's folder

Adds ``summary`` to finetune_study.json, draws finetune_study.png next to it, prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/finetune_study_report.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import pyplot, render_table, save
from bench.results import write_json_payload

COMMITTED = Path(__file__).resolve().parent / "results" / "cpu"
MIB = 2**20


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals}


def _ok(runs: list, **match) -> list:
    return [r for r in runs if "error" not in r
            and all(r["spec"].get(k) == v for k, v in match.items())]


def _group(runs: list, stage_runs: list) -> dict:
    """Mean/spread of one optimizer setting over its seeds."""
    return {
        "seeds": sorted(r["spec"]["seed"] for r in stage_runs),
        "eval_loss": _stats([r["eval_loss"] for r in stage_runs]),
        "exact_match": _stats([r["exact_match"] for r in stage_runs]),
        "final_train_loss": _stats([statistics.fmean(r["losses"][-4:]) for r in stage_runs]),
        "step_s": _stats([r["step_s"] for r in stage_runs]),
        "peak_rss_bytes": _stats([r["peak_rss_train_bytes"] for r in stage_runs]),
        "optimizer_state_bytes": stage_runs[0]["optimizer_state_bytes"] if stage_runs else None,
        "load_avg": _stats([r["load_avg_start"][0] for r in stage_runs]),
    }


def _timing(runs: list, **match):
    timed = [r for r in _ok(runs, stage="timing", **match) if "timing" in r]
    if not timed:
        return None
    t = timed[-1]["timing"]
    return {"step_ratio": t["step_ratio"], "ratios": t["ratios"],
            "opt_step_s": statistics.median(t["opt_step_s"]),
            "plain_fwd_bwd_s": statistics.median(t["plain_fwd_bwd_s"])}


def summarise(data: dict) -> dict:
    from bench.finetune_study import FAMILY, LABELS, best_lr

    runs = data["runs"]
    out = {"baseline": {}, "sweep": {}, "best": {}, "rounding": {}}
    for r in _ok(runs, stage="baseline"):
        key = r["spec"]["dtype"] + ("/fp32 compute" if r["spec"].get("compute") else "")
        out["baseline"][key] = {k: r.get(k) for k in ("eval_loss", "exact_match",
                                                      "generated_exact_match")}
    for name in LABELS:
        fam = FAMILY.get(name, name)
        out["sweep"][fam] = {repr(r["spec"]["lr"]): {"eval_loss": r["eval_loss"],
                                                     "exact_match": r["exact_match"]}
                             for r in _ok(runs, stage="sweep", optimizer=fam)}
        lr = best_lr(runs, name)
        if lr is None:
            continue
        seeds = [r for r in _ok(runs, optimizer=name, lr=lr, dtype="fp32")
                 if r["spec"]["stage"] in ("sweep", "seeds")]
        out["best"][name] = {"label": LABELS[name], "lr": lr, **_group(runs, seeds),
                             "timing": _timing(runs, optimizer=name, dtype="fp32")}
        for rounding in ("nearest", "stochastic"):
            rr = _ok(runs, stage="rounding", optimizer=name, rounding=rounding)
            if rr:
                out["rounding"][f"{name}/{rounding}"] = {
                    "label": LABELS[name], "lr": lr, "rounding": rounding, **_group(runs, rr),
                    "timing": _timing(runs, optimizer=name, dtype="bf16", rounding=rounding)}
    return out


def _pm(s: dict, scale: float = 1.0, spec: str = "{:.3f}") -> str:
    if not s.get("n"):
        return "-"
    return (spec.format(s["mean"] * scale) + " ± " + spec.format(s["std"] * scale)
            + f" [{spec.format(s['min'] * scale)}, {spec.format(s['max'] * scale)}]")


def tables(summary: dict) -> str:
    lines = ["Learning-rate sweep (seed 0): final held-out loss / exact match"]
    rows = [[fam, lr, f"{v['eval_loss']:.4f}", f"{v['exact_match']:.0%}"]
            for fam, d in summary["sweep"].items() for lr, v in d.items()]
    lines.append(render_table(["family", "lr", "held-out loss", "exact match"], rows))
    lines.append("\nEach optimizer at its best rate (mean ± std [min, max] over the seeds)")
    rows = []
    for name, g in list(summary["best"].items()) + list(summary["rounding"].items()):
        t = g.get("timing") or {}
        rows.append([name, f"{g['lr']:g}", len(g["seeds"]), _pm(g["eval_loss"]),
                     _pm(g["exact_match"], 100, "{:.0f}"),
                     "-" if not g["step_s"].get("n") else f"{g['step_s']['mean']:.1f}",
                     "-" if not t else f"{t['step_ratio']:.2f}",
                     f"{g['peak_rss_bytes'].get('mean', 0) / 2**30:.2f}",
                     f"{(g['optimizer_state_bytes'] or 0) / MIB:.1f}"])
    lines.append(render_table(["optimizer", "lr", "seeds", "held-out loss", "exact match %",
                               "step (s)", "step / fwd+bwd", "peak RSS (GiB)", "state (MiB)"],
                              rows))
    return "\n".join(lines)


def plot(path: Path, data: dict, summary: dict) -> bool:
    """Training loss per step (mean over seeds, band min-max) per optimizer at its best rate;
    the same for the bf16 rounding runs; held-out loss per run."""
    from bench.finetune_study import LABELS

    plt = pyplot()
    if plt is None:
        return False
    runs = data["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    base = summary["baseline"].get("fp32", {}).get("eval_loss")

    def curves(ax, groups):
        for label, rr in groups:
            if not rr:
                continue
            n = min(len(r["losses"]) for r in rr)
            xs = list(range(1, n + 1))
            per_step = list(zip(*(r["losses"][:n] for r in rr)))
            line, = ax.plot(xs, [statistics.fmean(v) for v in per_step], label=label)
            ax.fill_between(xs, [min(v) for v in per_step], [max(v) for v in per_step],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (mean over seeds; band: min-max)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    groups = []
    for name, g in summary["best"].items():
        rr = [r for r in _ok(runs, optimizer=name, lr=g["lr"], dtype="fp32")
              if r["spec"]["stage"] in ("sweep", "seeds")]
        groups.append((f"{LABELS[name]}, lr {g['lr']:g} ({len(rr)} seeds)", rr))
    curves(axes[0], groups)
    axes[0].set_title("fp32 parameters: each optimizer at its best learning rate")
    groups = [(f"{g['label']}, {g['rounding']} ({len(g['seeds'])} seeds)",
               _ok(runs, stage="rounding", optimizer=k.split("/")[0], rounding=g["rounding"]))
              for k, g in summary["rounding"].items()]
    curves(axes[1], groups)
    axes[1].set_title("bf16 parameters: rounding of the update")
    ax = axes[2]
    names = list(summary["best"]) + list(summary["rounding"])
    for i, name in enumerate(names):
        g = summary["best"].get(name) or summary["rounding"][name]
        vals = g["eval_loss"].get("values", [])
        ax.plot([i] * len(vals), vals, "o", color="tab:blue", alpha=0.7)
        if vals:
            ax.plot([i - 0.3, i + 0.3], [statistics.fmean(vals)] * 2, color="black")
    if base:
        ax.axhline(base, color="tab:red", linestyle="--", linewidth=1,
                   label=f"before fine-tuning: {base:.3f}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("held-out loss after training (per seed; bar: mean)")
    s = data["settings"]
    ax.set_title(f"held-out loss ({s['eval_examples']} dates) after training")
    ax.grid(True, axis="y", alpha=0.3)
    return save(fig, path, data["environment"],
                f"SmolLM2-135M-Instruct fine-tuned on the dates task: {s['steps']} steps x "
                f"batch {s['batch_size']}, 1 thread", fontsize=9)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=COMMITTED)
    args = p.parse_args(argv)
    path = args.dir / "finetune_study.json"
    data = json.loads(path.read_text())
    data["summary"] = summarise(data)
    write_json_payload(path, data)
    plot(args.dir / "finetune_study.png", data, data["summary"])
    print(tables(data["summary"]))
    return data


if __name__ == "__main__":
    main()
