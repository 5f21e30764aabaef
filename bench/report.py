"""Text tables (no wider than 100 columns, units in the headers) and plots of the benchmark
results."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from bench.results import Row

WIDTH = 100


def fmt(v, spec="{:.3g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return spec.format(v)
    return str(v)


def fmt_bytes(n, si: bool = True) -> str:
    """``1.23 GB`` (si) or ``1.15 GiB``; "-" for None; strings (e.g. "OOM") unchanged."""
    if n is None or isinstance(n, str):
        return "-" if n is None else n
    base, units = (1000, ("B", "kB", "MB", "GB", "TB")) if si else \
        (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    x, i = float(n), 0
    while abs(x) >= base and i < len(units) - 1:
        x /= base
        i += 1
    return f"{x:.0f} {units[i]}" if i == 0 else f"{x:.3g} {units[i]}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence], *, keys: int = 1,
                 width: int = WIDTH) -> str:
    """Aligned text, key columns left-aligned, the others right-aligned. When the columns do not
    fit in ``width``, the table is split into several, each repeating the first ``keys``
    columns; a cell too wide for any block is cut with "...". (Long notes belong in
    ``footnotes``.)"""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    key_w = sum(widths[:keys]) + 2 * keys
    room = max(8, width - key_w)
    for i in range(keys, len(headers)):
        if widths[i] > room:
            widths[i] = room
            for r in cells:
                r[i] = r[i] if len(r[i]) <= room else r[i][:room - 3] + "..."
    groups, cur, used = [], [], key_w
    for i in range(keys, len(headers)):
        if cur and used + widths[i] > width:
            groups.append(cur)
            cur, used = [], key_w
        cur.append(i)
        used += widths[i] + 2
    groups.append(cur)

    def line(vals, cols):
        parts = [vals[i].ljust(widths[i]) if i < keys else vals[i].rjust(widths[i]) for i in cols]
        return "  ".join(parts).rstrip()

    blocks = []
    for g in groups:
        cols = list(range(keys)) + g
        out = [line(list(headers), cols), "  ".join("-" * widths[i] for i in cols)]
        out += [line(r, cols) for r in cells]
        blocks.append("\n".join(out))
    return "\n\n".join(blocks)


def footnotes(notes: Sequence[str], width: int = WIDTH) -> str:
    """``[1] note`` lines wrapped at ``width``."""
    out = []
    for i, n in enumerate(notes, 1):
        out.append(textwrap.fill(n, width, initial_indent=f"[{i}] ",
                                 subsequent_indent=" " * (len(str(i)) + 3)))
    return "\n".join(out)


def load_range(pairs) -> str:
    """"lo-hi" of the 1-minute load averages recorded as (start, end) pairs of each session."""
    loads = [x for pair in pairs for x in pair]
    return f"{min(loads):.1f}-{max(loads):.1f}"


def wrap(text: str, width: int = WIDTH) -> str:
    return "\n".join(textwrap.fill(t, width, subsequent_indent="    ") for t in text.split("\n"))


def _speedup_header(key: str) -> str:
    return "vs " + key.removeprefix("speedup_vs_").removesuffix("_backend") + " (x)"


def format_table(rows: Sequence[Row]) -> str:
    """One table per case (op, dtype, shape): a row per implementation with its time, bandwidth,
    memory and speed-ups; the notes below, numbered."""
    cases: dict[tuple, list[Row]] = {}
    for r in rows:
        cases.setdefault((r.op, r.dtype, r.shape), []).append(r)
    notes: list[str] = []
    blocks = []
    for (op, dtype, shape), group in cases.items():
        sp_keys = [k for k in dict.fromkeys(k for r in group for k in r.speedups)
                   if any(r.speedups.get(k) is not None for r in group)]
        headers = ["backend", "median (ms)", "p20-p80 (ms)"]
        bw = any(r.gbps for r in group)
        if bw:
            headers += ["GB/s", "of same-bytes"]
        headers += ["peak+ (MiB)", "state (MiB)"]
        bwd = any(r.ratio_to_plain_backward is not None for r in group)
        if bwd:
            headers.append("vs plain bwd (x)")
        headers += [_speedup_header(k) for k in sp_keys]
        headers.append("note")
        table = []
        for r in group:
            cells = [r.backend, fmt(r.median_ms, "{:.4g}"),
                     "-" if r.p20_ms is None else f"{r.p20_ms:.3g}-{r.p80_ms:.3g}"]
            if bw:
                cells += [fmt(r.gbps, "{:.1f}"), fmt(r.frac_same_bytes, "{:.2f}")]
            cells += ["-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:.1f}",
                      "-" if r.state_bytes is None else f"{r.state_bytes / 2**20:.2f}"]
            if bwd:
                cells.append(fmt(r.ratio_to_plain_backward, "{:.3f}"))
            cells += [fmt(r.speedups.get(k), "{:.2f}") for k in sp_keys]
            if r.note:
                if r.note not in notes:
                    notes.append(r.note)
                cells.append(f"[{notes.index(r.note) + 1}]")
            else:
                cells.append("")
            table.append(cells)
        n = group[0]
        title = f"{op}  {dtype}  {shape}  ({n.numel:,} elements in {n.n_tensors} tensor(s)"
        title += f", fewest bytes {fmt_bytes(n.bytes_min)})" if n.bytes_min else ")"
        blocks.append(wrap(title) + "\n" + render_table(headers, table))
    out = "\n\n".join(blocks)
    if notes:
        out += "\n\nnotes:\n" + footnotes(notes)
    return out





def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (plots are skipped)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_record(env: dict) -> str:
    """The run's record in two short lines (device, torch, commit; date, load): one long line
    is cut at the figure's edges."""
    return (f"{env['device_name']} | torch {env['torch_version']} | commit {env['git_commit']}\n"
            f"{env['date'][:16].replace('T', ' ')} UTC | load average "
            f"{env.get('load_avg_1_5_15min') or env.get('load_avg_1min')}")


def save(fig, path: Path, env: dict, title: str = "", fontsize: int = 8) -> bool:
    """The run's record as the figure's title (device, torch, commit, date, load), then save."""
    import matplotlib.pyplot as plt

    fig.suptitle((title + "\n" if title else "") + run_record(env), fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_LINESTYLES = {"bf16": "-", "fp16": "--", "fp32": ":"}
_MARKERS = {"bf16": "o", "fp16": "s", "fp32": "^"}


def write_plot(path: Path, rows: Sequence[Row], env: dict, copy_gbps: float | None = None) -> bool:
    """GB/s per backend and dtype, one panel per op, with the measured copy bandwidth as a line.
    Several sizes: GB/s against size (log axis), whole models (many tensors) as labelled stars.
    One size per series: horizontal bars (a line through one point would show nothing).
    False if there was nothing to plot."""
    ops = [op for op in ("lomo_update", "adalomo_update")
           if any(r.op == op and r.gbps for r in rows)]
    if not ops:
        return False
    plt = pyplot()
    if plt is None:
        return False
    sizes = {(r.numel, r.n_tensors) for r in rows if r.op in ops and r.gbps}
    draw = _bars if len(sizes) == 1 else _lines
    fig, axes = plt.subplots(1, len(ops), figsize=(7 * len(ops), 5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        draw(ax, plt, [r for r in rows if r.op == op and r.gbps], copy_gbps)
        ax.set_title(op if len(sizes) > 1 else f"{op}, {rows[0].shape} {rows[0].dtype}")
    return save(fig, path, env)


def _bars(ax, plt, rows, copy_gbps) -> None:
    """One bar per implementation (fastest at the top), its GB/s written at the bar's end."""
    rows = sorted(rows, key=lambda r: r.gbps)
    names = [f"{r.backend} {r.dtype}" for r in rows]
    colors = ["tab:green" if r.backend == "native" else "tab:gray" for r in rows]
    ax.barh(range(len(rows)), [r.gbps for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(r.gbps, i, f" {r.gbps:.1f} GB/s ({r.median_ms:.2f} ms)", va="center", fontsize=8)
    if copy_gbps:
        ax.axvline(copy_gbps, color="black", linestyle="-.", linewidth=1.2,
                   label=f"device copy {copy_gbps:.0f} GB/s")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 1.35 * max(max(r.gbps for r in rows), copy_gbps or 0))
    ax.set_xlabel("effective GB/s (fewest bytes, docs/spec.md)")
    ax.grid(True, axis="x", alpha=0.3)


def _lines(ax, plt, rows, copy_gbps) -> None:
    backends = sorted({r.backend for r in rows})
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
    labelled, stars = set(), False
    for b in backends:
        for dt in ("bf16", "fp16", "fp32"):
            sel = [r for r in rows if r.backend == b and r.dtype == dt]
            pts = sorted((r.numel, r.gbps) for r in sel if r.n_tensors == 1)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=_LINESTYLES[dt],
                        marker=_MARKERS[dt], color=colors[b], label=f"{b} {dt}")
            models = [r for r in sel if r.n_tensors > 1]
            if models:
                stars = True
                ax.scatter([r.numel for r in models], [r.gbps for r in models], marker="*",
                           s=90, color=colors[b], label=None if pts else f"{b} {dt}")
                for r in models:
                    if r.shape not in labelled:  # name each model once per panel
                        labelled.add(r.shape)
                        ax.annotate(r.shape, (r.numel, r.gbps), fontsize=7,
                                    textcoords="offset points", xytext=(4, 4))
    if copy_gbps:
        ax.axhline(copy_gbps, color="black", linestyle="-.", linewidth=1.2,
                   label=f"device copy {copy_gbps:.0f} GB/s")
    ax.set_xscale("log")
    ax.set_xlabel("elements updated (log)" + ("; stars: whole-model passes" if stars else ""))
    ax.set_ylabel("effective GB/s (fewest bytes, docs/spec.md)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def plot_memory(path: Path, rows: Sequence[dict], env: dict, args: dict) -> bool:
    """Bars of the peak memory above the baseline per case, one panel per model; the allocator's
    peak (dot) and the independent estimate (cross) on each bar; cases that do not fit reach
    the limit, hatched. False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False

    panels = list(dict.fromkeys((r["model_config"], r.get("seq_len", args["seq_len"]))
                                for r in rows))
    most = max(sum(1 for r in rows if (r["model_config"], r.get("seq_len", args["seq_len"])) == p)
               for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 0.6 * most) * len(panels), 5.5),
                             squeeze=False)
    gib = 2**30
    for ax, (config, seq_len) in zip(axes[0], panels):
        sel = [r for r in rows if r["model_config"] == config
               and r.get("seq_len", args["seq_len"]) == seq_len]
        names = [r["optimizer"] + (f"\n(loss in {r['loss_chunk']}-token chunks)"
                                   if r.get("loss_chunk") else "")
                 + (f"\n(glibc mmap threshold {r['mmap_threshold_mib']:g} MiB)"
                    if r.get("mmap_threshold_mib") else "") for r in sel]
        for i, r in enumerate(sel):
            color = ("tab:gray" if r["optimizer"].startswith("floor") else
                     "tab:green" if r["optimizer"].startswith("lk-") else
                     "tab:orange" if r["optimizer"].startswith("lomo_optim") else "tab:red")
            if r["status"] == "ok":
                ax.bar(i, r["peak_bytes"] / gib, color=color)
                ax.annotate(f"{r['peak_bytes'] / gib:.1f}", (i, r["peak_bytes"] / gib),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
            elif r.get("limit_bytes"):
                ax.bar(i, r["limit_bytes"] / gib, color="none", edgecolor=color, hatch="//")
                ax.text(i, r["limit_bytes"] / gib / 2, "does not fit", ha="center",
                        va="center", rotation=90, fontsize=8)
            if isinstance(r.get("alloc_peak_bytes"), int):
                ax.plot(i, r["alloc_peak_bytes"] / gib, "o", color="black", markersize=4,
                        label="allocator peak (torch.profiler)" if i == 0 else None)
            if r.get("estimate_bytes"):
                ax.plot(i, r["estimate_bytes"] / gib, "x", color="blue", markersize=7,
                        label="estimate from the shape" if i == 0 else None)
        # each case's own limit (lowered to the memory free when it started)
        limited = [(i, r["limit_bytes"]) for i, r in enumerate(sel) if r.get("limit_bytes")]
        for k, (i, lim) in enumerate(limited):
            ax.hlines(lim / gib, i - 0.45, i + 0.45, color="black", linewidth=1.5,
                      label="the case's memory limit" if k == 0 else None)
        if env.get("memory_total_gib") and limited:
            ax.axhline(env["memory_total_gib"], color="black", linestyle=":", linewidth=1,
                       label=f"the machine's memory, {env['memory_total_gib']:.1f} GiB")
        n = next((r["n_params"] for r in sel if r.get("n_params")), None)
        ax.set_title(f"{config}" + (f" ({n / 1e9:.2f}B parameters)" if n else "")
                     + f", {args['dtype']}, seq {seq_len} x batch {args['batch_size']}"
                     + (", checkpointing" if args["gradient_checkpointing"] else ""), fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("peak memory above the process baseline (GiB)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    return save(fig, path, env, "Peak memory of one full-parameter training step per case "
                "(hatched: the case ran under the limit and failed to allocate)")


def plot_curves(path: Path, runs: list[dict], env: dict, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for r in runs:
        if "error" in r:
            continue
        xs = [c["step"] for c in r["curve"]]
        ts = [c["train_s"] / 60 for c in r["curve"]]
        ys = [c["eval_loss"] for c in r["curve"]]
        label = f"{r['label']}, lr {r['lr']:g}: {r['final_eval_loss']:.3f}"
        style = "--" if r["optimizer"].startswith("lomo_optim") else "-"
        axes[0].plot(xs, ys, style, marker=".", label=label)
        axes[1].plot(ts, ys, style, marker=".", label=label)
    for ax, xl in zip(axes, ("training step", "training wall time (min, evaluation excluded)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out eval loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    lo = min(min(c["eval_loss"] for c in r["curve"]) for r in runs if "error" not in r)
    for ax in axes:
        ax.set_ylim(lo - 0.1, lo + 2.0)
    return save(fig, path, env, title, fontsize=9)


def plot_sweep(path: Path, runs: list[dict], env: dict) -> bool:
    plt = pyplot()
    if plt is None:
        return False

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        pts = sorted((r["lr"], r["final_eval_loss"]) for r in runs
                     if r["optimizer"] == name and "error" not in r
                     and math.isfinite(r["final_eval_loss"]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (peak of the schedule)")
    ax.set_ylabel("final held-out eval loss (nats/byte)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path, env, "learning-rate sweep")
