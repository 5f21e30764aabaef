"""docs/clipping.md: what each clipping mode costs (clip_modes.json), and the safety net's record
on real runs (spike_warning.json)."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import CPU, Results

SPIKES = f"{CPU}/spike_warning.json"


def _ratios(res: Results, mode: str) -> list[float]:
    rows = res(f"{CPU}/clip_modes.json")["rows"]
    return sorted(r["ratio_to_unclipped"] for r in rows if r["mode"] == mode)


def _span(xs: list[float]) -> str:
    return f"{xs[0]:.2f}-{xs[-1]:.2f}x"


def clip_cost(res: Results) -> str:
    """Inline: what a step costs with each clipping mode, relative to an unclipped one."""
    return (f"a step with exact clipping takes {_span(_ratios(res, 'exact'))} an unclipped one "
            f"(a second backward), with `clip_mode=\"previous\"` {_span(_ratios(res, 'previous'))} "
            "(docs/results.md, \"Clipping modes\")")


def exact_cost(res: Results) -> str:
    return _span(_ratios(res, "exact"))


def previous_cost(res: Results) -> str:
    return _span(_ratios(res, "previous"))


def _flagged(row: dict) -> list[tuple[int, float, float, float]]:
    """(step, s_t, norm, norm / previous norm) of every flagged step; steps count from 1."""
    s, n, f = row["statistic"], row["norms"], row["clip_spike_factor"]
    return [(i + 1, s[i], n[i], n[i] / n[i - 1]) for i in range(1, len(s))
            if s[i] is not None and s[i] > f]


def _label(row: dict, factor: float) -> str:
    name = row["run"].split(" + ")[0]
    opt = {"adalomo": "AdaLomo", "lomo": "Lomo (plain SGD)"}[name.split()[-1]]
    if row["spike_at_step"]:
        where = "demo" if name.startswith("demo") else "SmolLM2-135M-Instruct"
        return f"{where}, {opt}, step {row['spike_at_step']}'s gradient x{factor:g}"
    if name.startswith("demo"):
        return f"demo (`python -m lomo_kernels.finetune`), {opt}"
    return (f"SmolLM2-135M-Instruct, `transformers.Trainer`, {opt} (lr {row['lr']:g}, "
            f"{row['batch_size']} x {row['seq_len']} tokens)")


def spike_table(res: Results) -> str:
    data = res(SPIKES)
    rows = []
    for r in data["rows"]:
        flagged = sorted(_flagged(r), key=lambda x: -x[1])
        if len(flagged) > 1:
            top = f"{flagged[0][1]:.1f} ({flagged[0][0]}); " + ", ".join(
                f"{s:.1f} ({t})" for t, s, _, _ in flagged[1:])
        elif flagged:
            top = f"**{flagged[0][1]:.3g}** ({flagged[0][0]})"
        else:
            top = f"{r['max_statistic']:.2f} ({r['max_statistic_step']})"
        rows.append([_label(r, data["spike_factor_injected"]), r["steps"], r["warnings"], top])
    envs = data["environment"] if isinstance(data["environment"], list) else [data["environment"]]
    loads = [round(x, 1) for e in envs for x in (e["loadavg_before"][0], e["loadavg_after"][0])]
    e = envs[0]
    return (f"Measured on {e['device_name']}, torch {e['torch_version']}, commit "
            f"{e['git_commit']}{' (with uncommitted changes)' if e.get('git_dirty') else ''}, "
            f"{e['date'][:10]}, one thread per run, 1-minute load {min(loads):g}-{max(loads):g}."
            f"\n`python bench/spike_warning.py --out {SPIKES}`\n\n"
            + summary.markdown([f"run (`clip_grad_norm={data['clip_grad_norm']}`, "
                                "`clip_mode=\"previous\"`)", "steps", "warnings",
                                "largest `s_t` (step)"], rows))


def _healthy(data: dict, optimizer: str) -> list[dict]:
    return [r for r in data["rows"] if not r["spike_at_step"] and r["run"].endswith(optimizer)]


def spike_margins(res: Results) -> str:
    """How far AdaLomo's healthy runs stay under the threshold, and the injected spikes over it."""
    data = res(SPIKES)
    factor = data["clip_spike_factor"]
    healthy = max(r["max_statistic"] for r in _healthy(data, "adalomo"))
    spikes = sorted(r["spike_statistic"] for r in data["rows"] if r["spike_at_step"])
    return (f"stay at or below {healthy:.2f}, a factor of {factor / healthy:.1f} under the "
            f"threshold; an injected x{data['spike_factor_injected']:g} spike gives `s_t` of "
            f"{spikes[0]:.0f} to {spikes[-1]:.0f}, {spikes[0] / factor:.1f}x to "
            f"{spikes[-1] / factor:.1f}x over it")


def lomo_spikes(res: Results) -> str:
    """The steps flagged in Lomo's healthy demo run: the norms and what was applied."""
    flagged = [f for r in _healthy(res(SPIKES), "lomo") for f in _flagged(r)]
    norms, jumps, applied = (sorted(x[k] for x in flagged) for k in (2, 3, 1))
    return (f"{len(flagged)} one-step gradient spikes, the norm jumping to {norms[0]:.0f}-"
            f"{norms[-1]:.0f}, {jumps[0]:.0f}x to {jumps[-1]:.0f}x the previous step's, and the "
            f"updates applied were {applied[0]:.1f}x to {applied[-1]:.1f}x")


def first_norms(res: Results) -> str:
    rows = res(SPIKES)["rows"]
    out = []
    for label, prefix in (("demo", "demo"), ("SmolLM2", "SmolLM2")):
        n = sorted(r["first_norm"] for r in rows if r["run"].startswith(prefix))
        out.append(f"{n[0]:.1f} to {n[-1]:.1f} ({label})")
    return "The first steps' norms were " + " and ".join(out)


def demo_largest(res: Results) -> str:
    r = _healthy(res(SPIKES), "demo adalomo")[0]
    return f"the demo's {r['max_statistic']:.2f} at step {r['max_statistic_step']}"
