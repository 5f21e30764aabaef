"""docs/evidence.md, "The Llama-3-8B shape on a 24 GiB machine": the cases that
bench/memory_llama3_8b.sh runs, the rows of bench/results/cpu/memory.json it wrote, and the
estimates of bench/memory_estimate.py from the shape alone."""

from __future__ import annotations

import re
from pathlib import Path

from bench import summary
from bench.docgen.common import CPU, GIB, Results

MODEL = "llama3-8b"
SCRIPT = "bench/memory_llama3_8b.sh"
SCRIPT_TEXT = (Path(__file__).resolve().parents[2] / SCRIPT).read_text  # code, not a result
ES = 2  # bf16, as the script runs it
WHAT = {"floor-params": "the parameters only", "lk-adalomo": "this project's AdaLomo",
        "lk-golore": "r128, every matrix low-rank",
        "lk-golore-embfull": "r128, embeddings and head full rank", "lk-galore": "r128",
        "lk-golore-r64": "r64, every matrix low-rank", "lk-galore-r64": "r64",
        "lk-adalomo-acc4-bf16": "4 micro-batches, bf16 buffers",
        "floor-backward": "a plain backward keeping every gradient",
        "adamw": "torch, foreach", "adafactor": "torch, foreach"}


def _shape() -> dict:
    from lomo_kernels.finetune.model import MODEL_CONFIGS

    return MODEL_CONFIGS[MODEL]


def script_cases() -> list[tuple[str, int, int | None]]:
    """(case, seq, loss chunk) in the order the script runs them, read from the script."""
    text = SCRIPT_TEXT()
    found = []  # (offset in the script, case, seq, flags): the loops' cases and the single ones
    for loop in re.finditer(r"for name in (.*?); do\s+case_ (\d+) \S+([^\n]*)", text, re.S):
        found += [(loop.start(), n, loop.group(2), loop.group(3))
                  for n in loop.group(1).replace("\\", " ").split()]
    for one in re.finditer(r"^case_ (\d+) (\S+)(.*)$", text, re.M):
        found.append((one.start(), one.group(2), one.group(1), one.group(3)))
    cases = []
    for _, name, seq, flags in sorted(found, key=lambda f: f[0]):
        chunk = re.search(r"--loss-chunk (\d+)", flags)
        cases.append((name, int(seq), int(chunk.group(1)) if chunk else None))
    return cases


def _estimate(case: str, seq: int, chunk: int | None) -> dict:
    from bench.memory_estimate import estimate

    shape = _shape()
    return estimate(case, shape, vocab=shape["vocab_size"], seq=seq, batch=1, es=ES,
                    checkpointing=True, loss_chunk=chunk)


def _gib(x) -> str:
    return f"{x / GIB:.2f}" if isinstance(x, (int, float)) else "-"


def measured(res: Results) -> str:
    """One line per row of memory.json for the 8B shape; the estimate beside each."""
    data = res(f"{CPU}/memory.json")
    rows = [r for r in data["rows"] if r.get("model_config") == MODEL]
    if not rows:
        return (f"Not measured yet: `{CPU}/memory.json` holds no {MODEL} row "
                f"(`bash {SCRIPT}` writes them).")
    table = []
    for r in rows:
        chunk = f", loss in {r['loss_chunk']}-token chunks" if r.get("loss_chunk") else ""
        if r.get("mmap_threshold_mib"):
            chunk += f", glibc mmap threshold {r['mmap_threshold_mib']:g} MiB"
        stepped = r.get("step_s") is not None or r["optimizer"] == "floor-params"
        matmul = r.get("bf16_matmul", "native") if r["optimizer"] != "floor-params" else "-"
        table.append([f"`{r['optimizer']}`{chunk}", r.get("seq_len", "-"),
                      MATMUL.get(matmul, matmul),
                      "ok" if r["status"] == "ok" else (r.get("note") or r["status"]),
                      _gib(r.get("peak_bytes")) if r["status"] == "ok" and stepped else "-",
                      _gib(r.get("alloc_peak_bytes")) if r["status"] == "ok" else "-",
                      _gib(r.get("estimate_bytes") or _estimate(
                          r["optimizer"], r.get("seq_len", 256), r.get("loss_chunk"))["total"]),
                      f"{r['step_s']:.0f}" if r.get("step_s") else "-"])
    loads = sorted(r["load_avg_1min_before"] for r in rows if "load_avg_1min_before" in r)
    commits = ", ".join(dict.fromkeys(r["git_commit"] for r in rows if r.get("git_commit")))
    dates = sorted(r["date"][:16].replace("T", " ") for r in rows if r.get("date"))
    env = data["environment"]
    head = (f"Measured on {env['device_name']}, {env['memory_total_gib']:.0f} GiB, torch "
            f"{env['torch_version']}, commit {commits}, {dates[0]} to {dates[-1]} UTC, 1-minute "
            f"load before each case {loads[0]}-{loads[-1]}.\n`bash {SCRIPT}`")
    note = ("\n\nPeak RSS: the resident peak of the step above the process baseline (the first "
            "step, optimizer state created in it); allocator: torch's allocator peak, where the "
            "step was profiled; step: the wall time of that one step; bf16 matmul: `tiles`, "
            "the linear layers computed in float32 tiles (below).")
    return (head + "\n\n" + summary.markdown(
        ["case", "seq", "bf16 matmul", "status", "peak RSS (GiB)", "allocator (GiB)",
         "estimate (GiB)", "step (s)"], table) + note)


MATMUL = {"float32-tiles": "tiles", "native": "native"}
CHECK = f"{CPU}/bf16_matmul_check.json"


def tiles_check(res: Results) -> str:
    """The same small case with torch's bf16 matrix product and with the float32 tiles: what the
    tiles change in the peak and in the step time."""
    data = res(CHECK)
    by = {(r["optimizer"], r["bf16_matmul"]): r for r in data["rows"]}
    names = {"lk-adalomo": "this project's AdaLomo", "lomo_optim-adalomo": "lomo-optim's AdaLomo"}
    parts = [f"{names.get(o, o)} {_gib(by[(o, 'native')]['peak_bytes'])} GiB native, "
             f"{_gib(by[(o, 'float32-tiles')]['peak_bytes'])} GiB with tiles (step "
             f"{by[(o, 'native')]['step_s']:.0f} s, {by[(o, 'float32-tiles')]['step_s']:.1f} s)"
             for o in dict.fromkeys(o for o, _ in by)]
    shape = next(iter(data["args"]["shapes"].values()))
    env = data["environment"]
    return (f"One decoder layer of the Llama-3.2-1B shape (hidden {shape['hidden_size']}, "
            f"vocabulary {shape['vocab_size']:,}, seq {data['args']['seq_len']}), one step, peak "
            f"above the baseline: " + "; ".join(parts) + f" (`{CHECK}`, {env['date'][:10]}, "
            f"`{data['command']}`)")


def estimates(res: Results) -> str:
    """bench/memory_estimate.py for every case of the script, one column per sequence length
    (and loss chunking)."""
    cases = script_cases()
    cols = list(dict.fromkeys((seq, chunk) for _, seq, chunk in cases))
    names = list(dict.fromkeys(c for c, _, _ in cases))
    have = {(c, seq, chunk) for c, seq, chunk in cases}
    head = ["case"] + [f"seq {s}" + (f", loss in {k}-token chunks" if k else "") for s, k in cols]
    table = [[f"`{n}`" + (f" ({WHAT[n]})" if n in WHAT else "")]
             + [_gib(_estimate(n, s, k)["total"]) if (n, s, k) in have else "" for s, k in cols]
             for n in names]
    p = _estimate("floor-params", 256, None)["total"]
    return (f"Estimated from the shape alone (`bench/memory_estimate.py`, GiB; parameters "
            f"{_gib(p)}), for the cases `{SCRIPT}` runs:\n\n" + summary.markdown(head, table))


def activations(res: Results) -> str:
    """What dominates at the longest sequence: the activations, the output layer's share, the
    chunked loss, and the chunking's extra compute against the step's (8 N s FLOPs: forward,
    backward and the checkpointing's recomputation)."""
    from bench.memory_estimate import activation_bytes

    shape, cases = _shape(), script_cases()
    short = min(s for _, s, _ in cases)
    long_ = max(s for _, s, _ in cases)
    chunk = next(k for _, s, k in cases if k)
    h, v = shape["hidden_size"], shape["vocab_size"]
    act = {s: activation_bytes(shape, v, s, 1, ES, True) for s in (short, long_)}
    logits = act[long_] - activation_bytes(shape, 0, long_, 1, ES, True)  # the vocabulary's
    n = _estimate("floor-params", short, None)["params"] / ES
    extra, step = 2 * long_ * h * v, 8 * n * long_
    plain = _estimate("lk-adalomo", long_, None)["total"]
    limit = float(re.search(r"--cpu-limit-gib (\d+)", SCRIPT_TEXT()).group(1))
    def fits(b: float) -> str:
        return ("under" if b / GIB < limit else "over") + f" the script's {limit:g} GiB limit"

    chunked = _estimate("lk-adalomo", long_, chunk)["total"]
    return (f"The activations grow from {act[short] / GIB:.2f} GiB at seq {short} to "
            f"{act[long_] / GIB:.2f} GiB at seq {long_}, and {logits / GIB:.2f} GiB of those are "
            f"the output layer's: {long_} positions x {v:,} vocabulary entries x "
            f"{logits // (long_ * v)} bytes (the bf16 logits, the loss's float32 upcast and "
            f"log-softmax, and the gradients of both on the way back). The decoder body with "
            f"checkpointing is {(act[long_] - logits) / GIB:.2f} GiB. So AdaLomo at seq {long_} "
            f"is estimated at {plain / GIB:.1f} GiB, {fits(plain)}. Computing the output layer and "
            f"the loss over {chunk} positions at a time, each chunk's logits recomputed in the "
            f"backward (`bench/chunked_loss.py`, `bench_memory.py --loss-chunk {chunk}`), keeps "
            f"one chunk's logits alive: estimated {chunked / GIB:.1f} GiB, {fits(chunked)}. "
            f"Its cost is one more forward of the output layer, "
            f"2 x {long_} x {h} x {v:,} FLOPs = {extra / 1e12:.1f} TFLOPs, about "
            f"{100 * extra / step:.0f}% of the step's ~{step / 1e12:.0f} TFLOPs (forward, "
            f"backward and the checkpointing's recomputation, 8 x parameters x tokens)")


DEPTH4 = f"{CPU}/memory_8b_depth4_seq2048.json"


def _malloc(r: dict) -> str:
    t = r.get("mmap_threshold_mib")
    return f"`--mmap-threshold-mib {t:g}`" if t else "glibc's default"


def depth4(res: Results) -> str:
    """The seq-2048 step with 4 decoder layers, under glibc's default allocator and with a fixed
    mmap threshold: the resident peak against the estimate."""
    data = res(DEPTH4)
    rows = sorted(data["rows"], key=lambda r: r.get("mmap_threshold_mib") or 0)
    parts = [f"{_malloc(r)} {_gib(r['peak_bytes'])} GiB peak RSS (step {r['step_s']:.0f} s)"
             for r in rows]
    return (", ".join(parts) + f", against an estimate of {_gib(rows[0]['estimate_bytes'])} GiB "
            f"(`{DEPTH4}`)")


def long_sequence(res: Results) -> str:
    """AdaLomo's 32-layer seq-2048 step with a fixed mmap threshold: its row of memory.json, in
    a sentence."""
    rows = [r for r in res(f"{CPU}/memory.json")["rows"] if r.get("model_config") == MODEL
            and r["optimizer"] == "lk-adalomo" and r.get("seq_len") == 2048
            and r.get("mmap_threshold_mib")]
    if not rows:
        return "not measured yet."
    r = rows[0]
    if r["status"] != "ok":
        return f"{r.get('note') or r['status']} (table above)."
    return (f"it fits, {_gib(r['peak_bytes'])} GiB peak RSS above the process's start against an "
            f"estimate of {_gib(r['estimate_bytes'])} GiB, one step in {r['step_s']:.0f} s "
            f"(table above).")


def malloc_effect(res: Results) -> str:
    """Each seq-256 case measured under both allocator settings: its peak with glibc's default,
    with a fixed mmap threshold, and its estimate."""
    rows = [r for r in res(f"{CPU}/memory.json")["rows"] if r.get("model_config") == MODEL
            and r.get("seq_len") == 256 and r["status"] == "ok" and not r.get("loss_chunk")]
    default = {r["optimizer"]: r for r in rows if not r.get("mmap_threshold_mib")}
    parts = [f"`{r['optimizer']}` {_gib(default[r['optimizer']]['peak_bytes'])} -> "
             f"{_gib(r['peak_bytes'])} GiB (estimate {_gib(r['estimate_bytes'])})"
             for r in rows if r.get("mmap_threshold_mib") and r["optimizer"] in default]
    return "; ".join(parts) if parts else "not measured yet"
