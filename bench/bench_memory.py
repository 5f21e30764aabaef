"""Peak memory and step time of full-parameter training of a Llama-shaped model, per optimizer.

    # CPU, real shapes (the committed results): Llama-3.2-1B and -3B shapes, bf16, seq 256
    python bench/bench_memory.py --device cpu --model-config 1b 3b --seq-len 256 \\
        --gradient-checkpointing --update-committed
    # GPU: Llama-3-8B shape, seq 1024; and the largest shape whose AdaLomo step fits in 20 GB
    python bench/bench_memory.py --model-config llama3-8b --seq-len 1024 --gradient-checkpointing
    python bench/bench_memory.py --model-config llama3-8b --memory-cap-gb 20 \\
        --gradient-checkpointing --optimizers lk-adalomo
    # CPU, a tiny config: every code path in seconds
    python bench/bench_memory.py --device cpu

Cases (``--optimizers``, comma-separated; the optimizers are bench/optimizers.py's):
    floor-params         the parameters alone (the model is built, nothing runs)
    floor-backward       parameters + a plain forward and backward that keeps every gradient
    lk-adalomo, lk-lomo  this project's AdaLomo / Lomo (updates fused into the backward)
    lk-adalomo-acc4,     AdaLomo with accumulation_steps=4 (4 micro-batches of --batch-size
    lk-adalomo-acc4-bf16 per step; float32 / bf16 buffers); lk-adalomo-window1: one micro-batch
    lk-adalomo-window1   per step through float32 buffers (exact clipping from one backward)
    lomo_optim-adalomo,  the lomo-optim 0.1.1 package's AdaLomo / Lomo
    lomo_optim-lomo
    adamw                torch.optim.AdamW (foreach); adamw-fused: fused=True
    adafactor            torch.optim.Adafactor (foreach)

Every case runs in a fresh process (a clean allocator; one that runs out of memory cannot
disturb the next). A case: build the model on the meta device and materialise it in ``--dtype``
on the device (the model's own initialisation); one warm-up step (optimizer state is created);
``--steps`` timed steps (forward, loss, backward with the update), the last of which, on CPU, is
recorded by torch.profiler for the allocator's peak (its time includes the profiler's overhead,
a few per cent; the resident peak is read before it). ``--steps 0``: the warm-up step alone is
measured and timed (``step_is_first``). On CPU the process may use at most ``--cpu-limit-gib``
above its baseline (an address-space limit; a case that needs more fails to allocate and is
reported as "does not fit in N GiB", a result). ``--bf16-matmul float32-tiles`` computes the bf16
linear layers in float32 tiles (bench/bf16_matmul.py), for CPUs whose bf16 matrix product is
slow. ``--mmap-threshold-mib N`` (CPU) makes glibc serve every allocation of N MiB or more from
its own mapping, unmapped when freed; by default glibc's threshold follows the largest block
freed, up to 32 MiB, and freed blocks below it stay in its heap, which at long sequences holds
gigabytes of resident memory that torch no longer uses. Reported per case:

    peak_bytes        CUDA: torch.cuda.max_memory_allocated over the steps. CPU: the peak
                      resident set over the steps before the profiled one (VmHWM) minus the
                      baseline (VmRSS after a toy step of the same code path, before the model
                      is built).
    alloc_peak_bytes  torch's allocator: CUDA, the same as peak_bytes; CPU, parameters + state +
                      the highest sum of live allocations during the profiled step
                      (torch.profiler, profile_memory=True).
    estimate_bytes    the independent estimate of bench/memory_estimate.py (from the shape only).
    rss_file_evicted_bytes  CPU: mapped library pages the kernel evicted during the case
                      (memory pressure from other processes); peak_bytes is low by up to it.
    step_s            median time of the timed steps; tokens_per_s.
    state_bytes       the optimizer's persistent state after the steps.
    param_bytes, largest_grad_bytes, n_params, build_peak_bytes (building the model).

``--memory-cap-gb C`` also searches a family of Llama shapes for the largest one whose step fits
in C GB (1e9 B): for each width (``--search-widths``; heads of 128 dims, 8 KV heads, intermediate
3.5x width, the model's vocabulary) the peak is measured at two depths, extrapolated linearly to
the deepest model under the cap, and that depth verified by a real run.

Output (``--out`` / ``--update-committed``, else bench/results/runs/<device>-<date>/):
memory.json {"environment", "args", "rows", "search"} and memory.png (bars per optimizer and
model; the estimate and the limit marked), written after every case. ``--merge`` keeps the rows
of an existing memory.json that this run does not measure (to re-measure some cases; each row
carries its date and commit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import bf16_matmul, memprobe, optimizers, summary
from bench.environment import add_output_args, environment, output_dir, script_parser
from bench.memory_estimate import estimate
from bench.report import fmt_bytes, plot_memory, render_table, wrap
from bench.results import merge_rows as merge_by, write_json_payload
from lomo_kernels import ops
from lomo_kernels.finetune import DTYPES, MODEL_CONFIGS, ByteTokenizer, build_config, build_model

FLOORS = ("floor-params", "floor-backward")
DEFAULT_CASES = FLOORS + optimizers.defaults("memory")
GB = 1e9
REPO_ROOT = Path(__file__).resolve().parents[1]


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    # CUDA: "out of memory"; CPU: "DefaultCPUAllocator: can't allocate memory"
    msg = str(exc).lower()
    return (isinstance(exc, oom_types + (MemoryError,)) or "out of memory" in msg
            or "can't allocate memory" in msg or "cannot allocate memory" in msg)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def family_shape(width: int, depth: int, vocab_size: int | None) -> dict:
    """A Llama-3-style shape of ``width`` and ``depth``: heads of 128 dims (fewer for tiny widths),
    8 KV heads where the head count allows, intermediate ~3.5x width (a multiple of 256, of 8 for
    tiny widths)."""
    head_dim = 128 if width >= 1024 else max(8, width // 4)
    heads = max(1, width // head_dim)
    kv = 8 if heads % 8 == 0 else heads
    mult = 256 if width >= 1024 else 8
    inter = int(math.ceil(3.5 * width / mult) * mult)
    return dict(hidden_size=width, intermediate_size=inter, num_hidden_layers=depth,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab_size,
                tie_word_embeddings=False, rope_theta=500000.0)


def resolve_shape(model_config: str, overrides: dict | None = None) -> dict:
    if model_config not in MODEL_CONFIGS:
        raise ValueError(
            f"unknown model config {model_config!r}; choose one of {sorted(MODEL_CONFIGS)}"
        )
    shape = dict(MODEL_CONFIGS[model_config])
    shape.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return shape


# ---------------------------------------------------------------------------------------------
# One case (in its own process)
# ---------------------------------------------------------------------------------------------


class Probe:
    """Peak memory from ``reset()`` on: CUDA allocator bytes, or the CPU resident-set peak."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            memprobe.reset_rss_peak()

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return memprobe.proc_status_bytes("VmRSS")["VmRSS"]

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return memprobe.proc_status_bytes("VmHWM")["VmHWM"]


def limit_address_space(limit_bytes: int | None) -> None:
    """CPU: allow this process ``limit_bytes`` of address space above what it has now, so that a
    case that needs more fails to allocate (and is reported) instead of exhausting the machine."""
    if limit_bytes:
        vm = memprobe.proc_status_bytes("VmSize")["VmSize"]
        resource.setrlimit(resource.RLIMIT_AS, (vm + limit_bytes, vm + limit_bytes))


def _largest_grad_bytes(model) -> int:
    return max(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _warm_up(case: dict, device, dtype) -> None:
    """One step of a toy model with the same code path (imports, kernels, thread pools), so that
    the baseline taken after it holds everything but this case's tensors."""
    shape = dict(case["shape"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=None, head_dim=32)
    cfg = build_config(shape, max_position_embeddings=max(4096, case["seq_len"]))
    model = build_model(cfg, dtype=dtype, device=device, meta_init=True,
                        gradient_checkpointing=case["gradient_checkpointing"], seed=0)
    batch = torch.zeros((1, 8), dtype=torch.long, device=device)
    if case["optimizer"] == "floor-backward":
        model(input_ids=batch, labels=batch).loss.backward()
    else:
        spec = optimizers.get(case["optimizer"])
        opt = spec.make(model, case["lr"], device, backend=case["backend"])
        optimizers.train_step(spec, opt, model, batch, case["lr"],
                              loss_chunk=case.get("loss_chunk"))
        optimizers.detach(opt)


def run_case(case: dict) -> dict:
    """Measure one (shape, optimizer) case in this process. ``case`` keys: optimizer, shape
    (LlamaConfig keyword arguments), device, dtype, seq_len, batch_size, steps,
    gradient_checkpointing, lr, backend, limit_bytes (CPU), allocator_trace."""
    device = torch.device(case["device"])
    dtype = DTYPES[case["dtype"]]
    name = case["optimizer"]
    probe = Probe(device)
    row = {"optimizer": name, "status": "ok", "limit_bytes": case.get("limit_bytes")}
    row["estimate"] = _estimate(case)
    row["estimate_bytes"] = row["estimate"]["total"]
    model = opt = None
    unpatch = bf16_matmul.patch() if case.get("bf16_matmul") == "float32-tiles" else None
    malloc = contextlib.ExitStack()
    if case.get("mmap_threshold_mib") and device.type == "cpu":
        malloc.enter_context(memprobe.exact_rss(int(case["mmap_threshold_mib"] * 2**20)))
    try:
        if name != "floor-params":
            _warm_up(case, device, dtype)
        cfg = build_config(dict(case["shape"]), max_position_embeddings=max(4096, case["seq_len"]))
        memprobe.free_memory(device)
        base = probe.current()
        # under memory pressure the kernel evicts mapped library pages, which lowers the RSS
        # peak (not the allocator's): recorded, so that a low peak_bytes can be recognised
        file_base = memprobe.proc_status_bytes("RssFile").get("RssFile", 0)
        if device.type == "cpu":
            limit_address_space(case.get("limit_bytes"))
        probe.reset()
        model = build_model(cfg, dtype=dtype, device=device, meta_init=True,
                            gradient_checkpointing=case["gradient_checkpointing"], seed=0)
        row["build_peak_bytes"] = probe.peak() - (base if device.type == "cpu" else 0)
        row.update(n_params=sum(p.numel() for p in model.parameters()),
                   param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                   largest_grad_bytes=_largest_grad_bytes(model))
        spec = None if name in FLOORS else optimizers.get(name)
        if spec is not None:
            opt = spec.make(model, case["lr"], device, backend=case["backend"])
            if name.startswith("lk-"):
                row["backend"] = ops.resolve_backend(case["backend"], device)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, min(cfg.vocab_size, 256), (case["batch_size"], case["seq_len"]),
                              generator=gen).to(device)

        def step():
            if name == "floor-backward":
                for p in model.parameters():
                    p.grad = None  # the previous step's; this step's stay until it ends
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                return loss
            return optimizers.train_step(spec, opt, model, batch, case["lr"],
                                         loss_chunk=case.get("loss_chunk"))

        times, losses = [], []
        probe.reset()
        traced = device.type == "cpu" and case.get("allocator_trace", True)
        n = 0 if name == "floor-params" else 1 + case["steps"]
        trace = None
        for i in range(n):
            if traced and i == n - 1:  # the resident peak is taken before the profiler runs
                row["peak_bytes"] = probe.peak() - base
                out = []
                t0 = time.perf_counter()
                trace = memprobe.allocation_trace(lambda: out.append(step()), device)
                loss = out[0]
            else:
                t0 = time.perf_counter()
                loss = step()
            losses.append(float(loss.detach()))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0 or n == 1:  # --steps 0: the one step, state creation included
                times.append(time.perf_counter() - t0)
        if "peak_bytes" not in row:
            row["peak_bytes"] = probe.peak() - (base if device.type == "cpu" else 0)
        if device.type == "cpu":
            row["rss_file_evicted_bytes"] = max(
                0, file_base - memprobe.proc_status_bytes("RssFile").get("RssFile", 0))
        state = optimizers.state_bytes(opt) if opt is not None else 0
        row["state_bytes"] = state
        if device.type == "cuda":
            row["alloc_peak_bytes"] = row["peak_bytes"]
        elif name == "floor-params":
            row["alloc_peak_bytes"] = row["param_bytes"]
        elif trace is not None:
            row["alloc_peak_bytes"] = row["param_bytes"] + state + trace.peak
            row["alloc_largest_bytes"] = trace.largest
        if times:
            med = statistics.median(times)
            micro = spec.micro_batches if spec is not None else 1
            row.update(step_s=med, step_s_min=min(times), step_s_max=max(times),
                       tokens_per_s=micro * case["batch_size"] * case["seq_len"] / med,
                       step_profiled=trace is not None, micro_batches=micro,
                       step_is_first=n == 1)
        row["losses"] = losses
        row["finite"] = all(math.isfinite(x) for x in losses)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        if _is_oom(exc):
            row["status"] = "does not fit"
            row["note"] = (f"does not fit in {fmt_bytes(case.get('limit_bytes'), si=False)}"
                           if case.get("limit_bytes") else "out of memory")
        else:
            row["status"] = "error"
            row["note"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if opt is not None:
            optimizers.detach(opt)
        model = opt = None
        memprobe.free_memory(device)
        malloc.close()
        if unpatch is not None:
            unpatch()
    return row


def run_case_isolated(case: dict, timeout: float | None = None) -> dict:
    """``run_case`` in a fresh Python process (a clean allocator; a crash is reported)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"optimizer": case["optimizer"], "status": "timeout"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (r.stderr or "")[-2000:]
    killed = r.returncode in (-9, 137)
    return {"optimizer": case["optimizer"], "status": "does not fit" if killed else "error",
            "note": "killed (out of memory?)" if killed else tail, "returncode": r.returncode}


# ---------------------------------------------------------------------------------------------
# Cap search (GPU)
# ---------------------------------------------------------------------------------------------


def search_cap(base_case: dict, cap_bytes: float, widths, vocab_size, runner, *,
               probe_depths=(2, 4), max_depth: int = 160, log=print) -> dict:
    """For each width the deepest family shape whose measured peak is <= ``cap_bytes``."""
    from lomo_kernels.finetune import llama_num_params

    def peak_of(shape):
        r = runner({**base_case, "shape": shape})
        return r if r.get("status") == "ok" and isinstance(r.get("peak_bytes"), int) else None

    results = []
    for width in widths:
        d1, d2 = probe_depths
        peaks = {d: peak_of(family_shape(width, d, vocab_size)) for d in probe_depths}
        peaks = {d: (r["peak_bytes"] if r else None) for d, r in peaks.items()}
        entry = {"width": width, "probe_peaks": {str(k): v for k, v in peaks.items()}}
        if peaks[d1] is None or peaks[d1] > cap_bytes:
            entry.update(depth=0, fits=False, note="the smallest probe depth does not fit")
            results.append(entry)
            log(f"  width {width}: depth {d1} does not fit")
            continue
        if peaks[d2] is None:
            per_layer, depth = None, d1
        else:
            per_layer = max(1, (peaks[d2] - peaks[d1]) / (d2 - d1))
            depth = int(min(max_depth, d1 + (cap_bytes - peaks[d1]) // per_layer))
        verified = None
        for _ in range(4):
            if depth < d1:
                break
            r = peak_of(family_shape(width, depth, vocab_size))
            if r is not None and r["peak_bytes"] <= cap_bytes:
                verified = r
                break
            depth -= 1 if per_layer is None else max(1, int(0.02 * depth))
        shape = family_shape(width, max(depth, d1), vocab_size)
        entry.update(depth=depth if verified else 0, fits=verified is not None,
                     per_layer_bytes=per_layer, shape=shape,
                     n_params=llama_num_params(shape, vocab_size),
                     peak_bytes=verified["peak_bytes"] if verified else None,
                     step_s=verified.get("step_s") if verified else None)
        results.append(entry)
        log(f"  width {width}: depth {entry['depth']} fits={entry['fits']} "
            f"({entry['n_params'] / 1e9:.2f}B params, peak {fmt_bytes(entry['peak_bytes'])})")
    fitting = [e for e in results if e.get("fits")]
    best = max(fitting, key=lambda e: e["n_params"]) if fitting else None
    return {"cap_bytes": cap_bytes, "optimizer": base_case["optimizer"], "widths": results,
            "largest": best}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def format_rows(rows) -> str:
    """One table of every case (GiB = 2**30 bytes), split to fit 100 columns; notes below."""
    gib = lambda x: "-" if not isinstance(x, (int, float)) else f"{x / 2**30:.2f}"  # noqa: E731
    table, notes = [], []
    for r in rows:
        note = "; ".join(n for n in (r.get("note"), r.get("limit_note")) if n)
        if note and note not in notes:
            notes.append(note)
        st = r.get("step_s")
        case = summary.memory_case(r)
        table.append([r.get("model_config", "") + (f" @{r['seq_len']}" if r.get("seq_len") else ""),
                      case, r["status"],
                      gib(r.get("peak_bytes")), gib(r.get("alloc_peak_bytes")),
                      gib(r.get("estimate_bytes")), gib(r.get("state_bytes")),
                      "-" if st is None else f"{st:.2f}",
                      "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
                      f"[{notes.index(note) + 1}]" if note else ""])
    out = render_table(["model", "case", "status", "peak RSS+ (GiB)", "alloc peak (GiB)",
                        "estimate (GiB)", "state (GiB)", "step (s)", "tokens/s", "note"],
                       table, keys=2)
    if notes:
        out += "\n" + "\n".join(wrap(f"[{i}] {n}") for i, n in enumerate(notes, 1))
    return out


def parse_args(argv=None):
    p = script_parser("python bench/bench_memory.py", __doc__)
    p.add_argument("--model-config", nargs="+", default=None, choices=sorted(MODEL_CONFIGS),
                   help="one or more shapes (default: llama3-8b on CUDA, tiny on CPU)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the config's width")
    p.add_argument("--num-layers", type=int, default=None, help="override the config's depth")
    p.add_argument("--seq-len", type=int, default=None, help="default: 1024 on CUDA, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--optimizers", default=",".join(DEFAULT_CASES),
                   help="comma-separated cases: "
                        + ", ".join(FLOORS + tuple(optimizers.OPTIMIZERS)))
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="lk-* update kernels")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16-matmul", choices=("native", "float32-tiles"), default="native",
                   help="float32-tiles: bf16 linear layers computed in float32 tiles "
                        "(bench/bf16_matmul.py; for CPUs whose bf16 matrix product is slow)")
    p.add_argument("--steps", type=int, default=1, help="timed steps (after one warm-up step)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="N",
                   help="compute the output layer and the loss N positions at a time, each "
                        "chunk recomputed in the backward (bench/chunked_loss.py); default: the "
                        "model's own loss over the whole sequence")
    p.add_argument("--cpu-limit-gib", type=float, default=16.0,
                   help="CPU: memory a case may use above its baseline; a case needing more "
                        "does not fit (default 16 GiB; lowered to what is free, less 1.5 GiB)")
    p.add_argument("--mmap-threshold-mib", type=float, default=None, metavar="N",
                   help="CPU: glibc maps every allocation of N MiB or more on its own and "
                        "unmaps it when freed (default: glibc's dynamic threshold, whose heap "
                        "keeps freed blocks of up to 32 MiB resident)")
    p.add_argument("--wait-minutes", type=float, default=60,
                   help="CPU: how long a case waits for other processes to free the memory it "
                        "is estimated to need before it runs under a lower limit (default 60)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other rows of an existing memory.json in the output "
                        "directory (re-measure some cases of an earlier run)")
    p.add_argument("--no-allocator-trace", action="store_true",
                   help="CPU: skip the profiled step (the allocator's peak)")
    p.add_argument("--isolation", choices=("subprocess", "inprocess"), default="subprocess",
                   help="a fresh process per case (default), or all in this one (tests; no "
                        "memory limit, and the peaks of one case include what earlier cases "
                        "left resident)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per isolated case")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="also search the largest Llama-family shape whose peak fits this cap "
                        "(GB = 1e9 B)")
    p.add_argument("--search-widths", default=None,
                   help="comma-separated widths (default: 2048..8192 on CUDA, 64,128 on CPU)")
    p.add_argument("--search-optimizer", default="lk-adalomo", choices=tuple(optimizers.OPTIMIZERS))
    add_output_args(p, "memory.json / memory.png")
    p.add_argument("--reestimate", type=Path, default=None, metavar="DIR",
                   help="only recompute the estimates of DIR/memory.json (after a change to "
                        "memory_estimate.py) and redraw DIR/memory.png; nothing is measured")
    p.add_argument("--plot-model", default=None, choices=sorted(MODEL_CONFIGS),
                   help="also draw memory-<config>.png with that model's rows only")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every (model, sequence length, case, loss chunking, mmap threshold) that
    ``new`` measured replaced."""
    return merge_by(old, new, lambda r: (r.get("model_config"), r.get("seq_len"), r["optimizer"],
                                         r.get("loss_chunk"), r.get("mmap_threshold_mib")))


def _estimate(case: dict) -> dict:
    return estimate(case["optimizer"], case["shape"],
                    vocab=case["shape"].get("vocab_size") or ByteTokenizer.vocab_size,
                    seq=case["seq_len"], batch=case["batch_size"],
                    loss_chunk=case.get("loss_chunk"),
                    es=torch.empty((), dtype=DTYPES[case["dtype"]]).itemsize,
                    checkpointing=case["gradient_checkpointing"])


def reestimate(folder: Path) -> dict:
    data = json.loads((folder / "memory.json").read_text())
    a = data["args"]
    for r in data["rows"]:
        r["estimate"] = _estimate({**a, "optimizer": r["optimizer"],
                                   "seq_len": r.get("seq_len", a["seq_len"]),
                                   "loss_chunk": r.get("loss_chunk"),
                                   "shape": a["shapes"][r["model_config"]]})
        r["estimate_bytes"] = r["estimate"]["total"]
    write_json_payload(folder / "memory.json", data)
    plot_memory(folder / "memory.png", data["rows"], data["environment"], a)
    print(format_rows(data["rows"]))
    return data


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:  # a subprocess case
        print(json.dumps(run_case(json.loads(args.worker)), default=str), flush=True)
        return {}
    if args.reestimate is not None:
        return reestimate(args.reestimate)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    configs = args.model_config or (["tiny"] if cpu else ["llama3-8b"])
    seq_len = args.seq_len or (64 if cpu else 1024)
    cases = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in cases:
        if o not in FLOORS:
            optimizers.get(o)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    def runner(case):
        if args.isolation == "inprocess":  # no address-space limit on this process
            return run_case(case)
        note = ""
        if cpu:
            limit, note = memprobe.cpu_limit(int(args.cpu_limit_gib * 2**30), _estimate(case)["total"],
                                    args.wait_minutes * 60, log)
            case = {**case, "limit_bytes": limit}
        row = run_case_isolated(case, timeout=args.timeout)
        if note:
            row["limit_note"] = note
        return row

    base = dict(device=str(device), dtype=args.dtype, seq_len=seq_len, batch_size=args.batch_size,
                steps=args.steps, gradient_checkpointing=args.gradient_checkpointing, lr=args.lr,
                loss_chunk=args.loss_chunk, bf16_matmul=args.bf16_matmul,
                mmap_threshold_mib=args.mmap_threshold_mib if cpu else None,
                backend=args.backend, allocator_trace=not args.no_allocator_trace)
    env = environment(device)
    for mod in ("transformers", "lomo_optim"):
        try:
            env[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:
            env[f"{mod}_version"] = None
    out = output_dir(args, env)
    old = (json.loads((out / "memory.json").read_text())
           if args.merge and (out / "memory.json").exists() else None)
    if old is not None:  # rows written before rows carried their sequence length
        for r in old["rows"]:
            r.setdefault("seq_len", old["args"]["seq_len"])
    rows, shapes, search = [], {}, None

    def write() -> tuple[dict, bool]:
        """memory.json and memory.png with every case measured so far (after each case: an
        interrupted run keeps what it measured)."""
        result = {"environment": env,
                  "args": {**base, "model_configs": configs, "shapes": shapes, "cases": cases,
                           "isolation": args.isolation, "cpu_limit_gib": args.cpu_limit_gib
                           if cpu else None, "memory_cap_gb": args.memory_cap_gb},
                  "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                  "rows": rows, "search": search}
        if old is not None:
            result["rows"] = merge_rows(old["rows"], rows)
            result["args"]["model_configs"] = list(dict.fromkeys(
                r["model_config"] for r in result["rows"]))
            result["args"]["shapes"] = {**old["args"].get("shapes", {}), **shapes}
        write_json_payload(out / "memory.json", result)
        if args.plot_model:  # one model's rows (every sequence length) in a figure of their own
            sel = [r for r in result["rows"] if r.get("model_config") == args.plot_model]
            if sel:
                plot_memory(out / f"memory-{args.plot_model}.png", sel, env, result["args"])
        return result, plot_memory(out / "memory.png", result["rows"], env, result["args"])

    for config in configs:
        shape = shapes[config] = resolve_shape(config, {"hidden_size": args.hidden_size,
                                                        "num_hidden_layers": args.num_layers})
        for o in cases:
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            r = runner({**base, "optimizer": o, "shape": shape})
            r.update(model_config=config, seq_len=seq_len, loss_chunk=args.loss_chunk,
                     bf16_matmul=args.bf16_matmul, steps=args.steps,
                     mmap_threshold_mib=base["mmap_threshold_mib"],
                     load_avg_1min_before=round(load, 2),
                     wall_s=round(time.perf_counter() - t0, 1), date=env["date"],
                     git_commit=env["git_commit"])
            log(f"  {config} {o}: {r['status']}, peak {fmt_bytes(r.get('peak_bytes'), si=False)}"
                f" ({r['wall_s']} s)")
            rows.append(r)
            write()
    if args.memory_cap_gb is not None:
        default_widths = "64,128" if cpu else "2048,3072,4096,5120,6144,8192"
        widths = [int(w) for w in (args.search_widths or default_widths).split(",")]
        log(f"searching the largest shape under {args.memory_cap_gb} GB with "
            f"{args.search_optimizer} ...")
        search = search_cap({**base, "optimizer": args.search_optimizer}, args.memory_cap_gb * GB,
                            widths, shapes[configs[0]].get("vocab_size"), runner, log=log)
    result, plotted = write()
    rows = result["rows"]
    if not args.quiet:
        print(format_rows(rows))
        print(wrap(f"wrote {out / 'memory.json'}" + (", memory.png" if plotted else "")))
    return result


if __name__ == "__main__":
    main()
