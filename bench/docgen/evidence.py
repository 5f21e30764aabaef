"""docs/evidence.md: the fine-tuning study (tables and the numbers its prose quotes), and the
Llama-3-8B shape on a 24 GiB machine (measured rows and the estimates from the shape)."""

from __future__ import annotations

from bench.docgen.common import CPU, GIB, MIB, Results, source as _source

STUDY = f"{CPU}/finetune_study.json"


def finetune_study(res: Results) -> str:
    """The pretrained model's learning-rate sweep, each optimizer at its best rate over the seeds,
    and the bf16 rounding study (bench/finetune_study_report.py's tables)."""
    from bench import finetune_study_report as report

    data = res(STUDY)
    env = data.get("environment", {})
    command = data.get("command", "python bench/finetune_study.py --update-committed")
    return (_source(env, command) + "\n\n```text\n"
            + report.tables(report.summarise(data)).rstrip("\n") + "\n```")


def _study(res: Results) -> dict:
    from bench import finetune_study_report as report

    return report.summarise(res(STUDY))


def _runs(res: Results, **match) -> list:
    return [r for r in res(STUDY)["runs"] if "error" not in r
            and all(r["spec"].get(k) == v for k, v in match.items())]


def _base(res: Results, dtype: str) -> str:
    b = _study(res)["baseline"][dtype]
    return f"{b['eval_loss']:.3f} ({100 * b['exact_match']:.0f}%)"


def baseline_fp32(res: Results) -> str:
    return _base(res, "fp32")


def baseline_bf16(res: Results) -> str:
    return _base(res, next(k for k in _study(res)["baseline"] if k.startswith("bf16")))


def greedy_check(res: Results) -> str:
    """The runs that also decoded greedily: both exact matches, which must agree."""
    gen = [r for r in _runs(res) if r.get("generated_exact_match") is not None]
    parts = [f"{100 * r['generated_exact_match']:.0f}% "
             + ("before training" if r["spec"]["steps"] == 0 else "for one trained run")
             for r in gen if r["generated_exact_match"] == r["exact_match"]]
    if len(parts) != len(gen):
        return "they disagree on some runs: see the results file"
    return "the two agree (" + ", ".join(parts) + ")"


def fp32_params(res: Results) -> str:
    r = _runs(res)[0]
    return f"float32 parameters {4 * r['n_params'] / GIB:.2f} GiB"


def _best(res: Results) -> dict:
    return _study(res)["best"]


def overall(res: Results) -> str:
    """Every optimizer's mean exact match and held-out loss, from before to after."""
    best, base = _best(res), _study(res)["baseline"]["fp32"]
    em = [g["exact_match"]["mean"] for g in best.values()]
    loss = [g["eval_loss"]["mean"] for g in best.values()]
    return (f"exact match {100 * base['exact_match']:.0f}% before, {100 * min(em):.0f}-"
            f"{100 * max(em):.0f}% on average after, held-out loss {base['eval_loss']:.2f} -> "
            f"{min(loss):.2f}-{max(loss):.2f}")


def same_trajectory(res: Results) -> str:
    best = _best(res)
    theirs, ours = (best[k]["eval_loss"]["values"] for k in ("lomo_optim-adalomo", "adalomo"))
    return ("held-out losses " + " / ".join(f"{x:.4f}" for x in theirs) + " against "
            + " / ".join(f"{x:.4f}" for x in ours) + f" on the {len(ours)} seeds")


def lomo_window(res: Results) -> str:
    """Lomo's spread and what its neighbouring rates in the sweep did."""
    g, sweep = _best(res)["lomo"], _study(res)["sweep"]["lomo"]
    lr = g["lr"]
    near = sorted((float(k), v["eval_loss"]) for k, v in sweep.items() if float(k) != lr)
    up = min((x for x in near if x[0] > lr), default=None)
    down = max((x for x in near if x[0] < lr), default=None)
    out = f"({g['eval_loss']['mean']:.3f} ± {g['eval_loss']['std']:.3f})"
    if up and down:
        out += (f" and has the narrowest window: {up[0]:g} diverges ({up[1]:.1f}), "
                f"{down[0]:g} is slower ({down[1]:.2f})")
    return out


def seed_spread(res: Results) -> str:
    v = _best(res)["adalomo"]["eval_loss"]
    return f"AdaLomo {v['min']:.3f} to {v['max']:.3f} across seeds"


def state_sizes(res: Results) -> str:
    best = _best(res)
    st = {k: best[k]["optimizer_state_bytes"] for k in ("adalomo", "golore", "galore", "adamw")}
    return (f"AdaLomo {st['adalomo'] / MIB:.1f} MiB of state, GoLore {st['golore'] / MIB:.0f} MiB "
            f"and GaLore {st['galore'] / MIB:.0f} MiB (rank 16, the embeddings at full rank with "
            f"Adam moments), AdamW {st['adamw'] / GIB:.1f} GiB")


def adalomo_rates(res: Results) -> str:
    """AdaLomo at the CLI's default rate against its best, seed 0."""
    best = _best(res)["adalomo"]["lr"]
    fast = _runs(res, stage="sweep", optimizer="adalomo", lr=3e-3)[0]
    slow = _runs(res, stage="sweep", optimizer="adalomo", lr=best)[0]
    peak = max(range(len(fast["losses"])), key=lambda i: fast["losses"][i])
    return (f"AdaLomo's early steps at 3e-3 spike (loss {fast['losses'][peak]:.1f} at step "
            f"{peak + 1}) and end at {fast['eval_loss']:.2f}; {best:g} ends at "
            f"{slow['eval_loss']:.2f}")


def rounding(res: Results) -> str:
    """Stochastic against nearest rounding, bf16 parameters, per optimizer."""
    r = _study(res)["rounding"]
    parts = []
    for name, label in (("adalomo", "AdaLomo"), ("lomo", "Lomo")):
        s, n = r[f"{name}/stochastic"], r[f"{name}/nearest"]
        parts.append(f"{label} {s['eval_loss']['mean']:.3f} ± {s['eval_loss']['std']:.3f} "
                     f"against {n['eval_loss']['mean']:.3f} ± {n['eval_loss']['std']:.3f}"
                     + (" with round-to-nearest" if not parts else "")
                     + f" (exact match {100 * s['exact_match']['mean']:.0f}% against "
                     f"{100 * n['exact_match']['mean']:.0f}%)")
    return ", ".join(parts)
