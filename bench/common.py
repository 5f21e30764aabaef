"""Shared machinery of the lomo_kernels benchmarks: timing, copy bandwidth, byte counts,
environment record, peak memory, result rows, and the table / JSON / CSV / PNG writers.

Conventions (DESIGN.md, "Benchmarks"):

* Time. On CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (CUDA events, L2
  flushed before every call; a CUDA-event loop when Triton is missing). On CPU: one call, a
  warm-up of ``warmup_ms``, then individually timed calls (``time.perf_counter``) until
  ``rep_ms`` has passed and at least ``min_reps`` calls were made; median, p20 and p80 of those.
* Effective bandwidth is computed from the *fewest* bytes an update can move (SPEC.md, "The fewest
  passes over memory"), whatever the implementation really moves, so GB/s values of different
  implementations compare work done per second:
    - LOMO: read p, read g, write p = 3 * element size (6 B/element for bf16).
    - AdaLomo, p of 2 or more dimensions: g read 3x, p read 2x, p written once = 6 * element size
      (12 B/element for bf16); the O(m + n) fp32 row/column state is not counted.
    - AdaLomo, 1-d p (unfactored, an fp32 state v of the same size): two passes are the minimum
      (the update norm needs every element before any write): (1) read g, p, v; (2) read g, p, v,
      write p and v. = 5 * element size + 12 bytes per element. (SPEC.md spells out only the 2-d
      count; this is the same reasoning applied to the 1-d case.)
  ``frac_copy`` = GB/s / the device copy bandwidth measured in the same run (``copy_bandwidth``:
  a large ``dst.copy_(src)``, bytes read + written / time). On CPU caches can hold a whole tensor
  (this project's CI host has a 480 MiB L3), so small and medium shapes may exceed 1.0.
* Peak extra memory: the memory an update needs beyond what is allocated when it starts
  (parameters, gradients and persistent optimizer state; state is reported apart as
  ``state_bytes``). CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
  around one call after ``reset_peak_memory_stats()`` (exact, allocator bytes). CPU (Linux): the
  rise of the process's peak resident set (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``) over ``VmRSS`` before one call. torch's CPU allocator returns freed
  memory to the C library, so large temporaries (glibc mmaps blocks of 32 MiB and more) show up
  exactly, to the page; smaller temporaries may be served from memory already resident, so on CPU
  the number is a lower bound. ``peak_method`` says which method produced the number; None where
  neither applies.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "fp16": "fp16", "fp32": "fp32",
}
QUANTILES = [0.5, 0.2, 0.8]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    key = _DTYPE_ALIASES.get(name.strip().lower())
    if key is None:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """``["a,b", "c"]`` or ``"a,b"`` -> ``["a", "b", "c"]``."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


# ---------------------------------------------------------------------------------------------
# Shapes: single tensors and whole models
# ---------------------------------------------------------------------------------------------

# Llama-shaped configurations (public config numbers; no weights are ever downloaded).
MODEL_CONFIGS = {
    # Llama-2-7B / Llama-7B: untied embeddings, multi-head attention (32 kv heads). 6.74e9 params.
    "llama7b": dict(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32,
                    kv_heads=32, tie=False),
    # Llama-3-8B: grouped-query attention (8 kv heads), 128256-token vocabulary. 8.03e9 params.
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32,
                      kv_heads=8, tie=False),
    # A toy model so that CI exercises the whole-model path in seconds.
    "llama-tiny": dict(hidden=256, intermediate=688, layers=2, vocab=1024, heads=4, kv_heads=2,
                       tie=False),
}


def llama_param_shapes(hidden, intermediate, layers, vocab, heads, kv_heads, tie=False):
    """Every parameter shape of a Llama model, in ``named_parameters()`` order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes = [(vocab, hidden)]  # embed_tokens
    for _ in range(layers):
        shapes += [
            (hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),  # gate, up, down
            (hidden,), (hidden,),  # input_layernorm, post_attention_layernorm
        ]
    shapes.append((hidden,))  # final norm
    if not tie:
        shapes.append((vocab, hidden))  # lm_head
    return shapes


def parse_shape(token: str) -> tuple[str, list[tuple[int, ...]]]:
    """``"4096x11008"`` -> ("4096x11008", [(4096, 11008)]); ``"llama7b"`` -> the model's list."""
    token = token.strip().lower()
    if token in MODEL_CONFIGS:
        return token, llama_param_shapes(**MODEL_CONFIGS[token])
    if not re.fullmatch(r"\d+(x\d+)*", token):
        raise ValueError(
            f"bad shape {token!r}: use e.g. 4096, 4096x11008, or a model: {sorted(MODEL_CONFIGS)}"
        )
    shape = tuple(int(x) for x in token.split("x"))
    if any(s <= 0 for s in shape):
        raise ValueError(f"bad shape {token!r}: sizes must be positive")
    return token, [shape]


SIZE_PRESETS = {
    # CI: must finish in seconds on a 2-core CPU.
    "tiny": ["4096", "512x1024", "llama-tiny"],
    # CPU default.
    "small": ["4096", "1024x4096", "4096x4096"],
    # GPU default: the real shapes and two whole models.
    "full": ["4096", "4096x4096", "4096x11008", "32000x4096", "128256x4096", "llama7b",
             "llama3-8b"],
}


def numel_of(shapes: Sequence[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def fewest_bytes(op: str, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
    """The fewest bytes ``op`` must move for these parameters (see the module docstring)."""
    es = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in shapes:
        n = math.prod(s)
        if op == "lomo_update":
            total += 3 * es * n
        elif op == "adalomo_update":
            total += (6 * es * n) if len(s) >= 2 else (5 * es + 12) * n
        else:
            raise ValueError(f"no byte count for op {op!r}")
    return total


# ---------------------------------------------------------------------------------------------
# Devices, timing, bandwidth
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None  # number of timed calls (None: decided inside do_bench)
    method: str


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    # linear interpolation, as numpy's default / torch.quantile
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _time_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps) -> Timing:
    fn()  # first call: lazy state, page faults
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  len(times), "perf_counter")


def _time_cuda(fn, warmup_ms, rep_ms, min_reps, device) -> Timing:
    # A rough estimate first so that slow functions (whole models, backward passes) still get
    # at least ``min_reps`` timed calls: do_bench derives its repeat count from rep / estimate.
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    est_ms = (time.perf_counter() - t0) * 1e3 / 3
    rep = max(rep_ms, min_reps * est_ms * 1.2)
    warmup = max(warmup_ms, 2 * est_ms)
    try:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
        return Timing(float(med), float(p20), float(p80), None, "triton.testing.do_bench")
    except ImportError:
        pass
    n = max(min_reps, int(rep / max(est_ms, 1e-3)))
    for _ in range(max(1, int(warmup / max(est_ms, 1e-3)))):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    synchronize(device)
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), n,
                  "cuda events")


def time_fn(fn: Callable[[], object], device, *, warmup_ms=25.0, rep_ms=100.0, min_reps=5,
            max_reps=100_000) -> Timing:
    """Median / p20 / p80 milliseconds of ``fn()`` on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, warmup_ms, rep_ms, min_reps, device)
    return _time_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps)


def time_interleaved(fns: dict, device, *, warmup_ms=25.0, rep_ms=100.0, min_reps=5,
                     max_reps=100_000) -> dict:
    """CPU: time several functions round-robin (one call of each per round) so that a burst of
    load from other processes on a shared machine hits all of them alike. ``rep_ms`` is the
    budget per function. Returns {name: Timing}. On CUDA: ``time_fn`` for each in turn."""
    device = torch.device(device)
    if device.type == "cuda":
        return {k: time_fn(f, device, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps)
                for k, f in fns.items()}
    for f in fns.values():
        f()
    t_end = time.perf_counter() + warmup_ms * len(fns) / 1e3
    while time.perf_counter() < t_end:
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    t_end = time.perf_counter() + rep_ms * len(fns) / 1e3
    rounds = 0
    while rounds < min_reps or (time.perf_counter() < t_end and rounds < max_reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = Timing(statistics.median(ts), _quantile(ts, 0.2), _quantile(ts, 0.8), len(ts),
                        "perf_counter, interleaved")
    return out


def copy_bandwidth(device, mib: float = 1024, **timing) -> dict:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``mib`` MiB, (read + written bytes) / time."""
    device = torch.device(device)
    n = max(1, int(mib * 2**20) // 4)
    src = torch.randn(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **timing)
    nbytes = 2 * src.numel() * src.element_size()
    out = {
        "copy_gbps": nbytes / (t.median_ms * 1e-3) / 1e9,
        "copy_mib": mib,
        "copy_median_ms": t.median_ms,
        "copy_p20_ms": t.p20_ms,
        "copy_p80_ms": t.p80_ms,
    }
    del src, dst
    return out


def available_memory_bytes(device) -> int | None:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _proc_status_bytes(*keys) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


def _cpu_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in _proc_status_bytes("VmHWM")
    except OSError:
        return False


_CPU_RSS = None


def peak_extra_bytes(fn: Callable[[], object], device) -> tuple[int | None, str | None]:
    """Bytes ``fn()`` needs beyond what is allocated when it starts, and the method used."""
    global _CPU_RSS
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base), "cuda_max_memory_allocated"
    if _CPU_RSS is None:
        _CPU_RSS = _cpu_rss_supported()
    if not _CPU_RSS:
        return None, None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _proc_status_bytes("VmRSS")["VmRSS"]
    fn()
    peak = _proc_status_bytes("VmHWM")["VmHWM"]
    return max(0, peak - base), "cpu_rss_hwm_lower_bound"


def tensor_bytes(tensors: Iterable) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            total += tensor_bytes(t.values())
        elif isinstance(t, (list, tuple)):
            total += tensor_bytes(t)
    return total


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(device) -> dict:
    """The fields every result row carries."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        triton_version = None
    try:
        import lomo_kernels

        lk_version = lomo_kernels.__version__
        backends = lomo_kernels.available_backends()
    except Exception as exc:  # noqa: BLE001
        lk_version, backends = None, {"error": repr(exc)}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        name = props.name
        extra = {"gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "gpu_sm_count": props.multi_processor_count}
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} logical cores)"
        extra = {}
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device.type,
        "device_name": name,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "lomo_kernels_version": lk_version,
        "backends_status": "; ".join(f"{k}: {v}" for k, v in backends.items()),
        "git_commit": commit,
        "git_dirty": None if dirty is None or commit is None else bool(dirty),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "hostname_os": f"{platform.system()} {platform.release()}",
        # other processes on a shared machine skew CPU timings: record how busy it was
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        **extra,
    }


def device_slug(env: dict) -> str:
    if env["device"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-") or "cuda"


# ---------------------------------------------------------------------------------------------
# Result rows
# ---------------------------------------------------------------------------------------------

# Names of the references whose time every row of the same (op, dtype, shape) is compared with,
# and the key the ratio gets in the row: speedup_vs_X = time(X) / time(this row).
SPEEDUP_KEYS = {
    "lomo_optim": "speedup_vs_lomo_optim",
    "torch": "speedup_vs_torch_backend",
    "sgd_fused": "speedup_vs_sgd_fused",
    "sgd_foreach": "speedup_vs_sgd_foreach",
    "adafactor_foreach": "speedup_vs_adafactor_foreach",
    "adafactor_single": "speedup_vs_adafactor_single",
}


@dataclasses.dataclass
class Row:
    op: str  # lomo_update | adalomo_update | backward_plain | backward_lomo | backward_adalomo
    backend: str  # native | triton | torch | lomo_optim | sgd_fused | adafactor_... | none
    kind: str  # kernel (this project) | reference | backward
    dtype: str
    shape: str  # "4096x4096", or a model name for whole-model passes
    n_tensors: int
    numel: int
    bytes_min: int | None = None  # SPEC.md's fewest bytes
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    reps: int | None = None
    timer: str | None = None
    gbps: float | None = None
    copy_gbps: float | None = None
    frac_copy: float | None = None
    # the same fraction against a copy moving as many bytes as the op (same cache residency):
    # the fair reference on CPUs whose caches hold a whole tensor
    copy_same_size_gbps: float | None = None
    frac_copy_same_size: float | None = None
    peak_extra_bytes: int | None = None
    peak_method: str | None = None
    state_bytes: int | None = None
    ratio_to_plain_backward: float | None = None
    speedups: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    def set_timing(self, t: Timing, copy_gbps: float | None) -> None:
        self.median_ms, self.p20_ms, self.p80_ms = t.median_ms, t.p20_ms, t.p80_ms
        self.reps, self.timer = t.reps, t.method
        if self.bytes_min is not None and t.median_ms > 0:
            self.gbps = self.bytes_min / (t.median_ms * 1e-3) / 1e9
            if copy_gbps:
                self.copy_gbps = copy_gbps
                self.frac_copy = self.gbps / copy_gbps
            if self.copy_same_size_gbps:
                self.frac_copy_same_size = self.gbps / self.copy_same_size_gbps

    def to_dict(self, env: dict) -> dict:
        d = dataclasses.asdict(self)
        speedups = d.pop("speedups")
        return {**env, **d, **speedups}


def add_speedups(rows: list[Row], references: Sequence[str]) -> None:
    """Fill ``row.speedups`` for every row: time of each reference / time of the row, within the
    same (op, dtype, shape). A reference that did not run gives None under its key."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.dtype, r.shape), []).append(r)
    for group in groups.values():
        times = {r.backend: r.median_ms for r in group if r.median_ms}
        for r in group:
            for ref in references:
                key = SPEEDUP_KEYS.get(ref, f"speedup_vs_{ref}")
                t_ref = times.get(ref)
                r.speedups[key] = (t_ref / r.median_ms) if (t_ref and r.median_ms) else None


# ---------------------------------------------------------------------------------------------
# Output: table, JSON, CSV, PNG
# ---------------------------------------------------------------------------------------------


def _fmt(v, spec="{:.3g}"):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return spec.format(v)
    return str(v)


def format_table(rows: Sequence[Row]) -> str:
    head = ["op", "backend", "dtype", "shape", "median ms", "p20-p80 ms", "GB/s", "copy%",
            "speed-ups", "peak+ MiB", "note"]
    lines = []
    for r in rows:
        sp = ", ".join(
            f"{k.replace('speedup_vs_', '').replace('_backend', '')} {v:.2f}x"
            for k, v in r.speedups.items() if v is not None and r.backend not in k
            and not (r.backend == "torch" and k == "speedup_vs_torch_backend")
        )
        if r.ratio_to_plain_backward is not None:
            sp = (f"{r.ratio_to_plain_backward:.3f}x plain" + (", " + sp if sp else ""))
        lines.append([
            r.op, r.backend, r.dtype, r.shape, _fmt(r.median_ms, "{:.4g}"),
            "-" if r.p20_ms is None else f"{r.p20_ms:.4g}-{r.p80_ms:.4g}",
            _fmt(r.gbps, "{:.1f}"),
            "-" if r.frac_copy is None else f"{100 * r.frac_copy:.0f}%",
            sp or "-",
            "-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:.1f}",
            r.note,
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def row_dicts(rows: Sequence[Row], env: dict) -> list[dict]:
    dicts = [r.to_dict(env) for r in rows]
    keys = []
    for d in dicts:  # every row gets every column (None where it does not apply)
        keys += [k for k in d if k not in keys]
    return [{k: d.get(k) for k in keys} for d in dicts]


def write_json(path: Path, rows: Sequence[Row], env: dict, meta: dict) -> None:
    payload = {"environment": env, "meta": meta, "rows": row_dicts(rows, env)}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def write_csv(path: Path, rows: Sequence[Row], env: dict) -> None:
    dicts = row_dicts(rows, env)
    if not dicts:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dicts[0]))
        w.writeheader()
        for d in dicts:
            w.writerow({k: "" if v is None else v for k, v in d.items()})


_LINESTYLES = {"bf16": "-", "fp16": "--", "fp32": ":"}
_MARKERS = {"bf16": "o", "fp16": "s", "fp32": "^"}


def write_plot(path: Path, rows: Sequence[Row], env: dict, copy_gbps: float | None) -> bool:
    """GB/s against size (elements, log axis) per backend and dtype, one panel per op, with the
    measured copy bandwidth as a horizontal line. False if there was nothing to plot."""
    ops = [op for op in ("lomo_update", "adalomo_update")
           if any(r.op == op and r.gbps for r in rows)]
    if not ops:
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ops), figsize=(7 * len(ops), 5), squeeze=False)
    backends = sorted({r.backend for r in rows if r.op in ops})
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
    for ax, op in zip(axes[0], ops):
        labelled = set()
        for b in backends:
            for dt in ("bf16", "fp16", "fp32"):
                sel = [r for r in rows if r.op == op and r.backend == b and r.dtype == dt and r.gbps]
                # single tensors: a line over sizes; whole models (many tensors): stars
                pts = sorted((r.numel, r.gbps) for r in sel if r.n_tensors == 1)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=_LINESTYLES[dt],
                            marker=_MARKERS[dt], color=colors[b], label=f"{b} {dt}")
                models = [r for r in sel if r.n_tensors > 1]
                if models:
                    ax.scatter([r.numel for r in models], [r.gbps for r in models], marker="*",
                               s=90, color=colors[b], label=None if pts else f"{b} {dt}")
                    for r in models:
                        if r.shape not in labelled:  # name each model once per panel
                            labelled.add(r.shape)
                            ax.annotate(r.shape, (r.numel, r.gbps), fontsize=7,
                                        textcoords="offset points", xytext=(4, 4))
        if copy_gbps:
            ax.axhline(copy_gbps, color="black", linestyle="-.", linewidth=1.2,
                       label=f"device copy {copy_gbps:.0f} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("elements updated (log); stars: whole-model passes")
        ax.set_ylabel("effective GB/s (SPEC.md fewest bytes)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{env['device_name']} | torch {env['torch_version']} | "
                 f"commit {env['git_commit']} | {env['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Running a case: one (op, dtype, parameter list) against every implementation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
    """One implementation to time. ``setup()`` returns ``(fn, state)``: ``fn()`` runs one update
    of every parameter, ``state()`` lists the persistent optimizer state (counted once it exists,
    after warm-up)."""

    backend: str
    kind: str  # "kernel" (this project) | "reference"
    setup: Callable[[], tuple[Callable[[], object], Callable[[], list]]] | None
    note: str = ""


def kernel_backends(device, only: Sequence[str] | None = None) -> list[str]:
    """This project's backends that loaded and can run on ``device`` (Triton: CUDA only here;
    the interpreter is a test vehicle, not something to time)."""
    from lomo_kernels import ops

    device = torch.device(device)
    out = []
    for b in ("native", "triton", "torch"):
        if only and b not in only:
            continue
        if b == "triton" and device.type != "cuda":
            continue
        try:
            ops.resolve_backend(b, device)
        except RuntimeError:
            continue
        out.append(b)
    return out


def free_memory(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_case(op, dtype, shape_name, shapes, candidates: Sequence[Candidate], device, *,
                 timing: dict, copy_gbps: float | None, progress=None,
                 count_bytes: bool = True) -> list[Row]:
    """Time every candidate on the same parameters; one Row each (a failure becomes a note)."""
    rows = []
    bytes_min = fewest_bytes(op, shapes, dtype) if count_bytes else None
    same_size = None
    if bytes_min:  # a copy that reads and writes bytes_min / 2 each moves bytes_min in all
        same_size = copy_bandwidth(device, bytes_min / 2 / 2**20, **timing)["copy_gbps"]
    for c in candidates:
        row = Row(op=op, backend=c.backend, kind=c.kind, dtype=dtype_name(dtype), shape=shape_name,
                  n_tensors=len(shapes), numel=numel_of(shapes), bytes_min=bytes_min, note=c.note,
                  copy_same_size_gbps=same_size)
        if progress is not None:
            progress.set_postfix_str(f"{op} {row.dtype} {shape_name} {c.backend}", refresh=True)
        fn = state = None
        if c.setup is not None:
            try:
                fn, state = c.setup()
                t = time_fn(fn, device, **timing)
                row.set_timing(t, copy_gbps)
                row.peak_extra_bytes, row.peak_method = peak_extra_bytes(fn, device)
                row.state_bytes = tensor_bytes(state())
            except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
                msg = f"failed: {type(exc).__name__}: {exc}".replace("\n", " ")
                row.note = (row.note + "; " if row.note else "") + msg[:300]
            finally:
                fn = state = None
                free_memory(device)
        rows.append(row)
        if progress is not None:
            progress.update(1)
    return rows


def skipped_rows(op, dtype, shape_name, shapes, backends, kinds, note) -> list[Row]:
    return [Row(op=op, backend=b, kind=k, dtype=dtype_name(dtype), shape=shape_name,
                n_tensors=len(shapes), numel=numel_of(shapes),
                bytes_min=fewest_bytes(op, shapes, dtype), note=note)
            for b, k in zip(backends, kinds)]


def timing_defaults(device, sizes: str = "small") -> dict:
    """Timer budgets: do_bench's defaults on CUDA; short, fixed budgets on CPU."""
    if torch.device(device).type == "cuda":
        return dict(warmup_ms=25.0, rep_ms=100.0, min_reps=10)
    if sizes == "tiny":
        return dict(warmup_ms=10.0, rep_ms=40.0, min_reps=3)
    return dict(warmup_ms=100.0, rep_ms=600.0, min_reps=5)


def make_params(shapes, dtype, device, *, p_std=0.02, g_std=1.0, seed=0):
    """Fresh random parameters and gradients (plain leaf tensors), never zeros."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for s in shapes:
        params.append(torch.randn(s, generator=gen, device=device).mul_(p_std).to(dtype))
        grads.append(torch.randn(s, generator=gen, device=device).mul_(g_std).to(dtype))
    return params, grads


def memory_needed(shapes, dtype) -> int:
    """Bytes a case needs before anything runs: parameters + gradients + 1 GiB. An
    implementation that needs more (the references' fp32 temporaries, a foreach optimizer's
    whole-list intermediates) and runs out of memory gets a "failed: OutOfMemoryError" note in
    its row; the others are still measured."""
    es = torch.empty((), dtype=dtype).element_size()
    return 2 * numel_of(shapes) * es + 2**30


def add_common_args(p) -> None:
    """Arguments every benchmark script accepts (run.py adds its own)."""
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to benchmark on (default: cuda if available, else cpu)")
    p.add_argument("--sizes", choices=sorted(SIZE_PRESETS), default=None,
                   help="shape preset: tiny (CI, seconds), small (CPU default), full (GPU "
                        "default: 4096, 4096x4096, 4096x11008, 32000x4096, 128256x4096 and the "
                        "whole Llama-7B / Llama-3-8B parameter lists). Presets: "
                        + "; ".join(f"{k}={','.join(v)}" for k, v in SIZE_PRESETS.items()))
    p.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="explicit shapes, overriding --sizes: e.g. 4096x4096 4096 or "
                        f"comma-separated; whole models: {', '.join(MODEL_CONFIGS)}")
    p.add_argument("--dtypes", nargs="+", default=None, metavar="DTYPE",
                   help="bf16, fp16, fp32 (space- or comma-separated; default: all three, "
                        "bf16 and fp32 for --sizes tiny)")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="only these implementations (default: all that can run): native, "
                        "triton, torch, lomo_optim, sgd_fused, sgd_foreach, adafactor_foreach, "
                        "adafactor_single")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's choice")
    p.add_argument("--warmup-ms", type=float, default=None, help="timer warm-up budget")
    p.add_argument("--rep-ms", type=float, default=None, help="timer measurement budget")
    p.add_argument("--min-reps", type=int, default=None, help="at least this many timed calls")


def resolve_common_args(args) -> dict:
    """Turn parsed common arguments into keyword arguments of the ``run`` functions."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ("full" if device.type == "cuda" else "small")
    tokens = split_list(args.shapes) if args.shapes else SIZE_PRESETS[sizes]
    shapes = [parse_shape(t) for t in tokens]
    if args.dtypes:
        dtypes = [parse_dtype(d) for d in split_list(args.dtypes)]
    elif sizes == "tiny":
        dtypes = [torch.bfloat16, torch.float32]
    else:
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
    timing = timing_defaults(device, sizes)
    for key in ("warmup_ms", "rep_ms", "min_reps"):
        if getattr(args, key, None) is not None:
            timing[key] = getattr(args, key)
    return dict(device=device, dtypes=dtypes, shapes=shapes, timing=timing, sizes=sizes,
                backends=split_list(args.backends) or None)


def copy_mib_default(device, sizes: str) -> int:
    if torch.device(device).type == "cuda":
        return 1024
    return 64 if sizes == "tiny" else 512


def op_script_main(run, doc: str, argv=None) -> None:
    """The command line of a single-op microbenchmark script: common flags, run, print a table."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    kw = resolve_common_args(ap.parse_args(argv))
    env = environment(kw["device"])
    rows = run(**kw)
    print(f"# {env['device_name']} | torch {env['torch_version']} | threads {env['cpu_threads']}")
    print(format_table(rows))
