"""docs/accumulation.md: the memory of gradient accumulation at the Llama-3.2-1B shape, predicted
by bench/memory_estimate.py next to the measured K=1 AdaLomo step of memory.json."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import CPU, Results

GB = 1e9
MODEL, SEQ = "1b", 256
CASES = {"lk-adalomo-acc4": "K=4, float32 buffers", "lk-adalomo-acc4-bf16": "K=4, bf16 buffers",
         "lk-adalomo-window1": "K=1 through float32 buffers"}


def _measured(res: Results) -> dict:
    return next(r for r in res(f"{CPU}/memory.json")["rows"]
                if r["optimizer"] == "lk-adalomo" and r.get("model_config") == MODEL
                and r.get("seq_len", SEQ) == SEQ and not r.get("loss_chunk") and r["status"] == "ok")


def _estimate(case: str) -> dict:
    from bench.memory_estimate import estimate
    from lomo_kernels.finetune.model import MODEL_CONFIGS

    shape = MODEL_CONFIGS[MODEL]
    return estimate(case, shape, vocab=shape["vocab_size"], seq=SEQ, batch=1, es=2,
                    checkpointing=True)


def memory_table(res: Results) -> str:
    k1 = _measured(res)
    rows = [["K=1, batch 1 (measured)", "0", f"{k1['peak_bytes'] / GB:.2f} GB"]]
    for case, label in CASES.items():
        e = _estimate(case)
        rows.append([f"{label} (`{case}`)", f"{e['buffers'] / GB:.2f} GB",
                     f"{e['total'] / GB:.2f} GB"])
    return (f"Measured K=1 row: `{CPU}/memory.json` (commit {k1['git_commit']}, "
            f"{k1['date'][:10]}); the others predicted by `bench/memory_estimate.py`.\n\n"
            + summary.markdown(["AdaLomo step on the 1B shape", "buffers", "peak (predicted)"],
                               rows))


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
