"""Write every measured number of README.md and docs/*.md from the committed results files.

    python bench/render_docs.py            # rewrite the generated parts of the docs in place
    python bench/render_docs.py --check    # exit 1 when a doc differs or a results file is missing

A generated part sits between two markers, in a block or inline:

    <!-- results:NAME -->
    ...written by this script...
    <!-- /results:NAME -->

NAME is one of GENERATORS below (bench/docgen/, a module per page); each reads its files under
bench/results/ (or computes a prediction with the script that makes it) and says which machine,
load, command and commit the numbers come from. Anything between the markers is
replaced, so edit the generator (or re-measure), never the numbers. An unknown NAME, a marker
without its closing twin, or a results file that is missing is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/render_docs.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.docgen import (  # noqa: E402
    accumulation, benchmarks, clipping, distributed, evidence, evidence_memory, golore, readme,
    results_page, spec)
from bench.docgen.common import MissingResults, Results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- results:([a-z0-9-]+) -->(.*?)<!-- /results:\1 -->", re.S)
OPENING = re.compile(r"<!-- results:([a-z0-9-]+) -->")

GENERATORS = {
    # README.md
    "headline": readme.headline, "summary": readme.summary_table,
    "build-time": readme.build_time, "test-time": readme.test_time,
    # docs/results.md (finetune-example also in docs/finetune.md)
    "memory": results_page.memory_table, "convergence": results_page.convergence_table,
    "step-time": results_page.step_time_table,
    "whole-step": results_page.whole_step_table,
    "whole-step-profile": results_page.whole_step_profile, "clip-modes": results_page.clip_modes_table,
    "microbench": results_page.microbench_table, "finetune-example": results_page.finetune_example,
    # docs/accumulation.md
    "accumulation-k1": accumulation.measured_k1, "accumulation-memory": accumulation.memory_table,
    "accumulation-logits": accumulation.logits, "accumulation-time": accumulation.buffer_time,
    "accumulation-fp32": accumulation.fp32_table,
    # docs/benchmarks.md
    "bandwidth": benchmarks.table, "bandwidth-load": benchmarks.load_range,
    "bandwidth-wall-over-cpu": benchmarks.wall_over_cpu,
    "bandwidth-stream": benchmarks.stream_speed, "gpu-predictions": benchmarks.gpu_predictions,
    "bandwidth-in-cache": benchmarks.in_cache, "bandwidth-lomo-runs": benchmarks.lomo_runs,
    # docs/clipping.md
    "clip-cost": clipping.clip_cost, "clip-exact-cost": clipping.exact_cost,
    "clip-previous-cost": clipping.previous_cost, "spike-warning": clipping.spike_table,
    "spike-margins": clipping.spike_margins, "spike-lomo": clipping.lomo_spikes,
    "spike-first-norms": clipping.first_norms, "spike-demo-largest": clipping.demo_largest,
    # docs/golore.md
    "golore-state": golore.state_table, "golore-recipe-state": golore.recipe_state,
    "golore-svd-working-set": golore.svd_working_set, "golore-svd-example": golore.svd_example,
    "golore-shards": golore.shards_table, "golore-shards-comparison": golore.shards_comparison,
    # docs/evidence.md
    "finetune-study": evidence.finetune_study, "finetune-greedy": evidence.greedy_check,
    "finetune-baseline-fp32": evidence.baseline_fp32,
    "finetune-baseline-bf16": evidence.baseline_bf16,
    "finetune-fp32-params": evidence.fp32_params, "finetune-overall": evidence.overall,
    "finetune-same-trajectory": evidence.same_trajectory,
    "finetune-lomo-window": evidence.lomo_window, "finetune-seed-spread": evidence.seed_spread,
    "finetune-state": evidence.state_sizes, "finetune-adalomo-rates": evidence.adalomo_rates,
    "rounding-result": evidence.rounding,
    "memory-llama3-8b": evidence_memory.measured,
    "memory-llama3-8b-estimates": evidence_memory.estimates,
    "memory-llama3-8b-activations": evidence_memory.activations,
    "bf16-matmul-check": evidence_memory.tiles_check,
    "memory-8b-depth4": evidence_memory.depth4,
    "memory-8b-seq2048": evidence_memory.long_sequence,
    "memory-8b-malloc": evidence_memory.malloc_effect,
    # docs/distributed.md
    "fsdp-prediction": distributed.fsdp_prediction, "fsdp-prediction-70b": distributed.seventy_b,
    # docs/spec.md
    "sum-accuracy": spec.sum_accuracy,
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
