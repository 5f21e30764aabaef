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


def buffer_time(res: Results) -> str:
    """Inline: the step time of the buffered modes (clip_modes.json), per micro-batch, against an
    unclipped step and against exact clipping's two backwards."""
    data = res(f"{CPU}/clip_modes.json")
    by = {(r["optimizer"], r["mode"]): r["ratio_to_unclipped"] for r in data["rows"]}

    def span(mode: str) -> str:
        xs = sorted(by[(o, mode)] for o in ("lomo", "adalomo"))
        return f"{xs[0]:.2f}-{xs[-1]:.2f}x"

    env = data["environment"]
    return (f"`bench/bench_clip_modes.py` ({env['model']}, {env['dtype']}, docs/results.md) measures "
            f"a step through the buffers at {span('window1')} an unclipped step (`window1`) and "
            f"{span('acc4')} per micro-batch with K=4 (`acc4`), both clipped exactly; exact "
            f"clipping with two backwards takes {span('exact')}")


FP32 = f"{CPU}/memory_accumulation_fp32.json"


def fp32_table(res: Results) -> str:
    """The accumulation cases measured in one run with float32 parameters (one step after a
    warm-up each): each peak, and its rise over the K=1 step beside the float32 buffers (4 bytes
    per parameter) that the memory model says it adds."""
    data = res(FP32)
    by = {r["optimizer"]: r for r in data["rows"]}
    k1 = by["lk-adalomo"]
    rows = []
    for case, label in {"lk-adalomo": "K=1, no buffers", **CASES}.items():
        r = by.get(case)
        if r is None:
            continue
        if r["status"] != "ok":
            rows.append([f"{label} (`{case}`)", "-", "-", "-", r["status"]])
            continue
        buffers = 0 if case == "lk-adalomo" else 4 * r["n_params"]
        rows.append([f"{label} (`{case}`)", f"{r['peak_bytes'] / GB:.2f} GB",
                     f"{(r['peak_bytes'] - k1['peak_bytes']) / GB:+.2f} GB",
                     f"{buffers / GB:.2f} GB", _step(r)])
    a = data["args"]
    cmd = (f"python bench/bench_memory.py --model-config {MODEL} --seq-len {a['seq_len']} --dtype "
           f"{a['dtype']} --gradient-checkpointing --optimizers {','.join(a['cases'])}")
    loads = [r["load_avg_1min_before"] for r in data["rows"] if "load_avg_1min_before" in r]
    return (f"`{FP32}` (commit {k1['git_commit']}, {k1['date'][:10]}, "
            f"{data['environment']['device_name']}, 1-minute load {min(loads):g}-{max(loads):g} "
            f"before the cases; one step after a warm-up, peak above the process's baseline):\n"
            f"`{cmd}`\n\n"
            + summary.markdown(["AdaLomo step, 1B shape, float32", "peak", "over K=1",
                                "buffers", "step time"], rows))
