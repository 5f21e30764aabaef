"""docs/distributed.md, "Memory per rank": bench/fsdp_prediction.py's per-GPU prediction (a
model from the public shapes, not a measurement), read from its results file."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import GIB, Results

FILE = "bench/results/model/fsdp_prediction.json"
COLUMNS = {"shards": ("parameters / {ranks}", 2), "gathered": ("gathered parameters", 2),
           "largest_gradient_x2": ("largest gradient x 2", 2),
           "activations": ("activations", 2), "adalomo_state": ("AdaLomo state", 3)}
GPU_GIB = 80e9 / GIB  # an 80 GB GPU


def _row(data: dict, model: str) -> dict:
    return next(r for r in data["rows"] if r["model"] == model)


def fsdp_prediction(res: Results) -> str:
    data = res(FILE)
    n = data["ranks"]
    head = [f"model ({n} GPUs)"] + [c.format(ranks=n) for c, _ in COLUMNS.values()] \
        + ["total", "FSDP + AdamW (fp32 master, moments)"]
    rows = [[r["name"]] + [f"{r[k] / GIB:.{d}f}" for k, (_, d) in COLUMNS.items()]
            + [f"**{r['total'] / GIB:.1f}**", f"{r['fsdp_adamw'] / GIB:.1f}"]
            for r in data["rows"]]
    return (f"Predicted, not measured, for {n} GPUs from the public shapes (`--model-config`), "
            f"with activations for a micro-batch of one {data['seq_len']}-token sequence per GPU "
            f"(`python bench/fsdp_prediction.py`, `{FILE}`, commit {data['git_commit']}). "
            "GiB per GPU:\n\n" + summary.markdown(head, rows))


def seventy_b(res: Results) -> str:
    """The 70B rows against one node of 80 GB GPUs."""
    data = res(FILE)
    big = [r for r in data["rows"] if r["parameters"] > 50e9]
    ours = " and ".join(f"{r['total'] / GIB:.1f}" for r in big)
    adamw = [r["fsdp_adamw"] / GIB for r in big]
    return (f"So a 70B model ({ours} GiB per GPU predicted) fine-tunes on one node of "
            f"{data['ranks']} x 80 GB ({GPU_GIB:.1f} GiB) GPUs with full-parameter AdaLomo, where "
            f"FSDP with AdamW would need {min(adamw):.0f}-{max(adamw):.0f} GiB per GPU")
