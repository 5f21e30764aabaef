"""docs/accumulation.md: the memory of gradient accumulation at the Llama-3.2-1B shape, predicted
by bench/memory_estimate.py next to the measured K=1 AdaLomo step of memory.json."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import CPU, Results

GB = 1e9
MODEL, SEQ = "1b", 256
CASES = {"lk-adalomo-acc4": "K=4, float32 buffers", "lk-adalomo-acc4-bf16": "K=4, bf16 buffers",
         "lk-adalomo-window1": "K=1 through float32 buffers"}


def _rows(res: Results, case: str) -> list:
    return [r for r in res(f"{CPU}/memory.json")["rows"]
            if r["optimizer"] == case and r.get("model_config") == MODEL
            and r.get("seq_len", SEQ) == SEQ and not r.get("loss_chunk") and r["status"] == "ok"]


def _measured(res: Results) -> dict:
    return _rows(res, "lk-adalomo")[0]


def _estimate(case: str) -> dict:
    from bench.memory_estimate import estimate
    from lomo_kernels.finetune.model import MODEL_CONFIGS

    shape = MODEL_CONFIGS[MODEL]
    return estimate(case, shape, vocab=shape["vocab_size"], seq=SEQ, batch=1, es=2,
                    checkpointing=True)


def _step(r: dict) -> str:
    return f"{r['step_s']:.0f} s" if r.get("step_s") else "-"


def memory_table(res: Results) -> str:
    """The K=1 row and each accumulation case: measured where memory.json has the row (its
    commit and date named), the prediction beside it."""
    k1 = _measured(res)
    rows = [["K=1, batch 1", "0", f"{k1['peak_bytes'] / GB:.2f} GB",
             f"{k1['estimate_bytes'] / GB:.2f} GB", _step(k1)]]
    sources = {(k1["git_commit"], k1["date"][:10])}
    for case, label in CASES.items():
        e = _estimate(case)
        got = _rows(res, case)
        rows.append([f"{label} (`{case}`)", f"{e['buffers'] / GB:.2f} GB",
                     f"{got[0]['peak_bytes'] / GB:.2f} GB" if got else "not measured",
                     f"{e['total'] / GB:.2f} GB", _step(got[0]) if got else "-"])
        sources |= {(r["git_commit"], r["date"][:10]) for r in got[:1]}
    runs = ", ".join(f"commit {c} ({d})" for c, d in sorted(sources))
    return (f"`{CPU}/memory.json` ({runs}; CPU, one step after a warm-up, peak above the "
            "process's baseline); predictions by `bench/memory_estimate.py`. A step of K=4 is four "
            "micro-batches.\n\n"
            + summary.markdown(["AdaLomo step on the 1B shape", "buffers", "peak (measured)",
                                "peak (predicted)", "step time"], rows))


def measured_k1(res: Results) -> str:
    return f"{_measured(res)['peak_bytes'] / GB:.2f} GB"


def logits(res: Results) -> str:
    """The output layer's activations of one sequence, as bench/memory_estimate.py counts them
    (its activations with the vocabulary, less those without)."""
    from bench.memory_estimate import activation_bytes
    from lomo_kernels.finetune.model import MODEL_CONFIGS

    shape = MODEL_CONFIGS[MODEL]
    v = shape["vocab_size"]
    out = activation_bytes(shape, v, SEQ, 1, 2, True) - activation_bytes(shape, 0, SEQ, 1, 2, True)
    return f"{v} x {SEQ} x {out // (v * SEQ)} bytes per sequence, {out / GB:.2f} GB"
