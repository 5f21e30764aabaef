"""Write every measured number of README.md and docs/*.md from the committed results files.

    python bench/render_docs.py            # rewrite the generated parts of the docs in place
    python bench/render_docs.py --check    # exit 1 when a doc differs or a results file is missing

A generated part sits between two markers, in a block or inline:

    <!-- results:NAME -->
    ...written by this script...
    <!-- /results:NAME -->

NAME is one of GENERATORS below; each reads its files under bench/results/ and says which
machine, load, command and commit the numbers come from. Anything between the markers is
replaced, so edit the generator (or re-measure), never the numbers. An unknown NAME, a marker
without its closing twin, or a results file that is missing is an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/render_docs.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = "bench/results/cpu"
GIB, MIB = 2**30, 2**20
MARKER = re.compile(r"<!-- results:([a-z0-9-]+) -->(.*?)<!-- /results:\1 -->", re.S)
OPENING = re.compile(r"<!-- results:([a-z0-9-]+) -->")


class MissingResults(Exception):
    pass


class Results:
    """The results files under one repository root, read once each."""

    def __init__(self, root: Path):
        self.root, self._cache = root, {}

    def path(self, rel: str) -> Path:
        p = self.root / rel
        if not p.exists():
            raise MissingResults(f"{rel}: results file missing")
        return p

    def __call__(self, rel: str) -> dict:
        if rel not in self._cache:
            self._cache[rel] = json.loads(self.path(rel).read_text())
        return self._cache[rel]


def _source(env: dict, command: str, load: str | None = None) -> str:
    """The line with every table: machine, load, commit, and the command that measured it.
    ``load`` replaces the environment's own load reading where the file has better ones."""
    machine = summary._machine(env)
    if load is not None:
        machine = machine[:machine.index(", load average")] + f", load average {load}"
    return f"Measured on {machine}.\n`{command}`"


# --- tables (docs/results.md) --------------------------------------------------------------------

def memory_table(res: Results) -> str:
    return summary.memory(res.path(f"{CPU}/memory.json"))


def convergence_table(res: Results) -> str:
    return summary.convergence(res.path(f"{CPU}/convergence.json"))


def step_time_table(res: Results) -> str:
    return summary.step_time(res.path(f"{CPU}/results-backward.json"))


def clip_modes_table(res: Results) -> str:
    data = res(f"{CPU}/clip_modes.json")
    env = data["environment"]
    table = [[r["optimizer"], r["mode"], f"{r['median_ms']:.1f}",
              f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
              f"{r['ratio_to_unclipped']:.2f}x" if r["ratio_to_unclipped"] else "-",
              f"{r['ratio_to_plain_backward']:.2f}x"] for r in data["rows"]]
    cmd = (f"python bench/bench_clip_modes.py --device {env['device']} --model {env['model']} "
           f"--dtype {env['dtype']} --clip-grad-norm {env['clip_grad_norm']} "
           f"--threads {env['cpu_threads']}")
    head = (f"Clipping modes ({env['model']}, {env['dtype']}, batch {env['batch']} x seq "
            f"{env['seq']}, {env['cpu_threads']} thread): ")
    return (head + _source(env, cmd, f"{env['load_avg_before'][0]} before, "
                           f"{env['load_avg_after'][0]} after") + "\n\n"
            + summary.markdown(["optimizer", "clipping", "median ms", "p20-p80 ms",
                                "vs unclipped", "vs plain backward"], table))


_LABELS = {"native": "lomo_kernels native", "torch": "lomo_kernels torch (reference)",
           "lomo_optim": "lomo-optim's per-tensor math", "sgd_fused": "`SGD(fused=True)`",
           "adafactor_foreach": "`Adafactor` (foreach)", "adafactor_single": "`Adafactor`"}


def microbench_table(res: Results) -> str:
    data = res(f"{CPU}/results.json")
    env, meta = data["environment"], data["meta"]
    rows = sorted(data["rows"], key=lambda r: (r["op"] != "lomo_update", r["median_ms"]))
    table = [[r["op"], _LABELS.get(r["backend"], r["backend"]), f"{r['median_ms']:.2f}",
              f"{r['gbps']:.1f}", f"{100 * r['frac_copy_same_size']:.0f}%",
              f"{r['speedup_vs_lomo_optim']:.1f}x"] for r in rows]
    shape = f"{rows[0]['shape']} {rows[0]['dtype']}" if rows else ""
    return (f"One update of a {shape} parameter, {env['cpu_threads']} threads: "
            + _source(env, "python bench/run.py " + " ".join(meta["argv"])) + "\n\n"
            + summary.markdown(["op", "implementation", "median ms", "GB/s",
                                "of a same-size copy", "vs lomo-optim"], table))


_NAMES = {"adalomo": "AdaLomo", "lomo": "Lomo", "golore": "GoLore", "galore": "GaLore",
          "adamw": "AdamW"}


def finetune_example(res: Results) -> str:
    d = res(f"{CPU}/finetune_example.json")
    env = d["environment"]
    return (f"Exact match on the {d['exact_match_n']} held-out dates: "
            f"**{100 * d['exact_match_before']:.0f}% before -> {100 * d['exact_match_after']:.0f}% "
            f"after** {d['steps']} {_NAMES.get(d['optimizer'], d['optimizer'])} steps (batch {d['batch_size']}; held-out loss "
            f"{d['eval_loss_start']:.2f} -> {d['eval_loss_end']:.4f}); {d['n_params'] / 1e6:.0f}M "
            f"parameters, peak memory {d['peak_memory_bytes'] / GIB:.1f} GiB (RSS), optimizer "
            f"state {d['optimizer_state_bytes'] / MIB:.1f} MiB; {d['train_s']:.0f} s of training "
            f"({d['step_s']:.0f} s per step, {d['tokens_per_s']:.0f} tokens/s, "
            f"{d['torch_threads']} torch thread), {d['wall_s']:.0f} s in all, plus "
            f"{d['conversion_s']:.0f} s converting the GGUF file once. "
            + _source(env, d["command"], f"{d['load_avg_start'][0]} at the start, "
                      f"{d['load_avg_end'][0]} at the end"))


# --- the numbers README.md quotes ----------------------------------------------------------------

def _memory_peaks(res: Results) -> dict:
    rows = res(f"{CPU}/memory.json")["rows"]
    return {r["optimizer"]: r["peak_bytes"] / GIB for r in rows if r["status"] == "ok"}


def _convergence(res: Results) -> dict:
    runs = res(f"{CPU}/convergence.json")["runs"]
    return {r["optimizer"]: r for r in runs if "error" not in r}


def _microbench(res: Results) -> dict:
    rows = res(f"{CPU}/results.json")["rows"]
    return {(r["op"], r["backend"]): r for r in rows}


def headline(res: Results) -> str:
    """The README's opening claims, one bullet each, with where they were measured."""
    peak, conv, micro = _memory_peaks(res), _convergence(res), _microbench(res)
    ex = res(f"{CPU}/finetune_example.json")
    mem_cfg = res(f"{CPU}/memory.json")["args"]
    ada, adamw = conv["lk-adalomo"], conv["adamw"]
    gap = 100 * (ada["final_eval_loss"] / adamw["final_eval_loss"] - 1)
    share = 100 * ada["state_bytes"] / adamw["state_bytes"]
    lomo_x = micro[("lomo_update", "native")]["speedup_vs_lomo_optim"]
    ada_x = micro[("adalomo_update", "native")]["speedup_vs_lomo_optim"]
    return "\n".join([
        f"* **Memory**: one training step of a Llama-3.2-1B-shaped model ({mem_cfg['dtype']}, "
        f"checkpointing) peaks at {peak['lk-adalomo']:.2f} GiB with AdaLomo, "
        f"{peak['lomo_optim-adalomo']:.2f} GiB with lomo-optim's AdaLomo and "
        f"{peak['adamw']:.2f} GiB with AdamW ({peak['adamw'] / peak['lk-adalomo']:.1f}x); "
        f"the parameters alone are {peak['floor-params']:.2f} GiB.",
        f"* **Quality**: on a short pre-training run AdaLomo ends {abs(gap):.1f}% "
        f"{'below' if gap < 0 else 'above'} AdamW's held-out loss with {share:.1f}% of its "
        f"optimizer state.",
        f"* **Speed**: one bf16 update of a 4096 x 4096 parameter on 2 CPU cores is "
        f"{lomo_x:.0f}x (LOMO) and {ada_x:.0f}x (AdaLomo) faster than lomo-optim's.",
        f"* **End to end**: SmolLM2-135M-Instruct learns a date-formatting task offline on a "
        f"CPU, exact match {100 * ex['exact_match_before']:.0f}% -> "
        f"{100 * ex['exact_match_after']:.0f}% on {ex['exact_match_n']} held-out dates in "
        f"{ex['steps']} steps.",
        "",
        "All measured on a shared 2-core AMD EPYC CPU; machine, load, commands and commits in "
        "[docs/results.md](docs/results.md). No GPU has measured these kernels yet.",
    ])


def summary_table(res: Results) -> str:
    """README's results summary: one line per question, the numbers from four results files."""
    peak, conv, micro = _memory_peaks(res), _convergence(res), _microbench(res)
    step = {(r["shape"], r["op"], r["backend"]): r["ratio_to_plain_backward"]
            for r in res(f"{CPU}/results-backward.json")["rows"]}
    base = conv["adamw"]["final_eval_loss"]
    rows = [
        ["peak memory, one step, Llama-3.2-1B shape (GiB)",
         f"{peak['lk-adalomo']:.2f} (AdaLomo), {peak['lk-lomo']:.2f} (Lomo)",
         f"{peak['lomo_optim-adalomo']:.2f} (lomo-optim AdaLomo), {peak['adamw']:.2f} (AdamW)"],
        ["held-out loss vs AdamW, 18M Llama, 120 steps",
         f"{100 * (conv['lk-adalomo']['final_eval_loss'] / base - 1):+.1f}% (AdaLomo), "
         f"{100 * (conv['lk-galore']['final_eval_loss'] / base - 1):+.1f}% (GaLore)",
         f"{100 * (conv['lomo_optim-adalomo']['final_eval_loss'] / base - 1):+.1f}% "
         "(lomo-optim AdaLomo)"],
        ["one 4096 x 4096 bf16 update (ms)",
         f"{micro[('lomo_update', 'native')]['median_ms']:.2f} (LOMO), "
         f"{micro[('adalomo_update', 'native')]['median_ms']:.2f} (AdaLomo)",
         f"{micro[('lomo_update', 'lomo_optim')]['median_ms']:.1f}, "
         f"{micro[('adalomo_update', 'lomo_optim')]['median_ms']:.1f} (lomo-optim)"],
        ["forward + backward with AdaLomo, vs a plain one (125M model)",
         f"{step[('bwd-medium', 'backward_adalomo', 'native')]:.2f}x",
         f"{step[('bwd-medium', 'backward_adalomo', 'lomo_optim')]:.2f}x (lomo-optim)"],
    ]
    return summary.markdown(["measured (2-core CPU)", "lomo_kernels", "compared with"], rows)


def clip_cost(res: Results) -> str:
    """Inline: what a step costs with each clipping mode, relative to an unclipped one."""
    rows = res(f"{CPU}/clip_modes.json")["rows"]
    exact = sorted(r["ratio_to_unclipped"] for r in rows if r["mode"] == "exact")
    prev = sorted(r["ratio_to_unclipped"] for r in rows if r["mode"] == "previous")
    return (f"a step with exact clipping takes {exact[0]:.2f}-{exact[-1]:.2f}x an unclipped one "
            f"(a second backward), with `clip_mode=\"previous\"` {prev[0]:.2f}-{prev[-1]:.2f}x "
            "(docs/results.md, \"Clipping modes\")")


def finetune_study(res: Results) -> str:
    """docs/evidence.md: the pretrained model's learning-rate sweep, each optimizer at its best rate
    over the seeds, and the bf16 rounding study (bench/finetune_study_report.py's tables)."""
    from bench import finetune_study_report as report

    data = res(f"{CPU}/finetune_study.json")
    env = data.get("environment", {})
    command = data.get("command", "python bench/finetune_study.py --update-committed")
    return (_source(env, command) + "\n\n```text\n"
            + report.tables(report.summarise(data)).rstrip("\n") + "\n```")


GENERATORS = {
    "headline": headline, "summary": summary_table, "memory": memory_table,
    "convergence": convergence_table, "step-time": step_time_table,
    "clip-modes": clip_modes_table, "clip-cost": clip_cost, "microbench": microbench_table,
    "finetune-example": finetune_example, "finetune-study": finetune_study,
}


def render(text: str, res: Results, where: str) -> tuple[str, list[str]]:
    """``text`` with every generated part rewritten, and the problems found."""
    problems = []
    closed = {m.start() for m in MARKER.finditer(text)}
    for m in OPENING.finditer(text):
        if m.start() not in closed:
            problems.append(f"{where}: <!-- results:{m.group(1)} --> has no closing marker")

    def one(m: re.Match) -> str:
        name, old = m.group(1), m.group(2)
        if name not in GENERATORS:
            problems.append(f"{where}: unknown results block {name!r} "
                            f"(known: {', '.join(GENERATORS)})")
            return m.group(0)
        try:
            body = GENERATORS[name](res)
        except MissingResults as e:
            problems.append(f"{where}: results:{name}: {e}")
            return m.group(0)
        body = f"\n{body}\n" if old.startswith("\n") else body  # a block, or inline
        return f"<!-- results:{name} -->{body}<!-- /results:{name} -->"

    return MARKER.sub(one, text), problems


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a doc differs from what would be written")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository root")
    a = ap.parse_args(argv)
    res, problems, stale = Results(a.root), [], []
    for path in doc_files(a.root):
        if not path.exists():
            continue
        text = path.read_text()
        new, found = render(text, res, str(path.relative_to(a.root)))
        problems += found
        if new != text:
            stale.append(str(path.relative_to(a.root)))
            if not a.check:
                path.write_text(new)
    for p in problems:
        print(p, file=sys.stderr)
    if a.check and stale:
        print("numbers differ from bench/results/ in: " + ", ".join(stale)
              + " (run python bench/render_docs.py)", file=sys.stderr)
    elif stale:
        print("rewrote: " + ", ".join(stale))
    return 1 if problems or (a.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
