"""Peak memory and step time of full-parameter training of a Llama-shaped model, per optimizer.

    # the goal: Llama-3-8B shape, bf16, seq 1024, batch 1, AdaLomo step <= 20 GB
    python bench/bench_memory.py --model-config llama3-8b --seq-len 1024 --batch-size 1 \\
        --gradient-checkpointing --output bench/results/memory_llama3-8b.json
    # the largest shape (width x depth) that trains within a memory cap
    python bench/bench_memory.py --model-config llama3-8b --memory-cap-gb 20 \\
        --gradient-checkpointing
    # CPU: a tiny config, to exercise every code path (RSS-based numbers)
    python bench/bench_memory.py --device cpu

Optimizers (``--optimizers``, comma-separated):
    lk-adalomo, lk-lomo            this project's AdaLomo / Lomo (updates fused into the backward)
    lomo_optim-adalomo,            the lomo-optim 0.1.1 package's AdaLomo / Lomo
    lomo_optim-lomo
    adamw-fused                    torch.optim.AdamW(fused=True) (fused=None where unsupported)

Every case runs in a fresh subprocess by default on CUDA (``--isolation subprocess``: a clean
allocator, and an out-of-memory error, caught and reported as "OOM", cannot poison the next case);
in-process on CPU. A case: build the model on the meta device and materialise it in ``--dtype``
on the device; one warm-up step; ``--steps`` timed steps (forward, loss, backward with the update;
AdamW: backward, step, zero_grad(set_to_none)). Reported:

    net_peak_bytes  what the cap search compares: peak_bytes on CUDA; on CPU
                    peak_bytes - rss_base_bytes.
    peak_bytes      CUDA: torch.cuda.max_memory_allocated over the training steps (parameters,
                    state, activations, gradients; the peak of building the model is
                    init_peak_bytes). CPU: the peak resident set of the process over the steps
                    (VmHWM after resetting it through /proc/self/clear_refs), which includes the
                    ~0.5 GB of libraries: compare with rss_base_bytes.
    step_s          median step time (p20, p80 beside it), tokens_per_s.
    floor_bytes     parameters + the largest gradient: what an in-backward optimizer cannot go
                    below (activations excluded); floor_with_state_bytes adds AdaLomo's fp32
                    factored state.
    param_bytes, state_bytes (optimizer state after the steps), activation_headroom (peak - floor)

``--memory-cap-gb C`` then searches a family of Llama shapes: for each width (``--search-widths``;
heads of 128 dims, 8 KV heads, intermediate 3.5x width, the model's vocabulary) the peak is
measured at two depths, extrapolated linearly to the deepest model under the cap, and that depth
is verified by a real run (one layer less while it does not fit). The largest shape (by parameter
count) that fits is reported.

JSON (``--output``; printed when omitted): {"environment": device, versions, commit, date, ...,
"args": ..., "rows": [...], "floor": ..., "search": ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lomo_kernels import AdaLomo, Lomo, ops  # noqa: E402
from lomo_kernels.finetune import (  # noqa: E402
    DTYPES,
    MODEL_CONFIGS,
    build_config,
    build_model,
    llama_num_params,
)

OPTIMIZERS = ("lk-adalomo", "lk-lomo", "lomo_optim-adalomo", "lomo_optim-lomo", "adamw-fused")
GB = 1e9

# ---------------------------------------------------------------------------------------------
# Environment record (bench/common.py's when it is there)
# ---------------------------------------------------------------------------------------------


def _git(*args):
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(device) -> dict:
    try:
        from bench.common import environment as common_environment

        env = common_environment(device)
    except Exception:  # noqa: BLE001 - bench/common.py missing or failing: a local record
        device = torch.device(device)
        env = {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)",
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "python_version": platform.python_version(),
            "backends_status": "; ".join(f"{k}: {v}" for k, v in ops.available_backends().items()),
            "git_commit": _git("rev-parse", "--short", "HEAD"),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    for mod in ("transformers", "lomo_optim"):
        try:
            env[f"{mod}_version"] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[f"{mod}_version"] = None
    return env


# ---------------------------------------------------------------------------------------------
# Memory probes
# ---------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory from ``reset()`` on: CUDA allocator bytes, or the CPU resident-set peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _reset_rss_peak() and _proc_status("VmHWM") is not None:
            self.kind = "cpu_rss_hwm"
        else:
            self.kind = None

    def current(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status("VmRSS")

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status("VmHWM") if self.kind else None


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    # CUDA: "out of memory"; CPU: "DefaultCPUAllocator: can't allocate memory"
    msg = str(exc).lower()
    return isinstance(exc, oom_types) or "out of memory" in msg or "can't allocate memory" in msg


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


def floor_bytes(model) -> tuple[int, int, int, int]:
    """(parameter bytes, largest gradient bytes, AdaLomo state bytes, parameter count)."""
    params = [p for p in model.parameters()]
    pbytes = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params if p.requires_grad)
    state = 0
    for p in params:
        for shape in ops.adalomo_state_shapes(p.shape).values():
            state += 4 * math.prod(shape)
    return pbytes, largest, state, sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


def make_optimizer(name: str, model, device, *, lr: float, backend: str):
    if name == "lk-adalomo":
        return AdaLomo(model, lr=lr, backend=backend), "fused"
    if name == "lk-lomo":
        return Lomo(model, lr=lr, backend=backend), "fused"
    if name in ("lomo_optim-adalomo", "lomo_optim-lomo"):
        import lomo_optim

        cls = lomo_optim.AdaLomo if name.endswith("adalomo") else lomo_optim.Lomo
        # lomo-optim allocates its state with .cuda(); on CPU that must be the identity
        ctx = (mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self)
               if device.type != "cuda" else contextlib.nullcontext())
        with ctx:
            return cls(model, lr=lr), "fused"
    if name == "adamw-fused":
        try:
            return torch.optim.AdamW(model.parameters(), lr=lr, fused=True), "plain"
        except (RuntimeError, ValueError):  # fused unsupported for this device / dtype
            return torch.optim.AdamW(model.parameters(), lr=lr), "plain"
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _state_bytes(opt) -> int:
    total = 0
    st = getattr(opt, "state", {})
    for s in (st.values() if isinstance(st, dict) else []):
        if isinstance(s, dict):
            total += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    for attr in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):  # lomo-optim keeps dicts
        d = getattr(opt, attr, None)
        if isinstance(d, dict):
            total += sum(v.numel() * v.element_size() for v in d.values() if torch.is_tensor(v))
    return total


def run_case(case: dict) -> dict:
    """Measure one (shape, optimizer) case in this process. ``case`` keys: shape (dict), optimizer,
    device, dtype, seq_len, batch_size, steps, gradient_checkpointing, lr, backend."""
    device = torch.device(case["device"])
    dtype = DTYPES[case["dtype"]]
    probe = MemoryProbe(device)
    row = {"optimizer": case["optimizer"], "shape": case["shape"], "status": "ok"}
    model = opt = batch = None
    try:
        _free(device)
        rss_base = probe.current()
        probe.reset()
        cfg = build_config(dict(case["shape"]), max_position_embeddings=max(4096, case["seq_len"]))
        model = build_model(cfg, dtype=dtype, device=device, meta_init=True,
                            gradient_checkpointing=case["gradient_checkpointing"], seed=0)
        row["init_peak_bytes"] = probe.peak()
        pbytes, largest, adalomo_state, n_params = floor_bytes(model)
        row.update(n_params=n_params, param_bytes=pbytes, largest_grad_bytes=largest,
                   floor_bytes=pbytes + largest,
                   floor_with_state_bytes=pbytes + largest + adalomo_state)
        opt, kind = make_optimizer(case["optimizer"], model, device, lr=case["lr"],
                                   backend=case["backend"])
        if case["optimizer"].startswith("lk-"):
            row["backend"] = ops.resolve_backend(case["backend"], device)
        vocab = cfg.vocab_size
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(0, min(vocab, 256), (case["batch_size"], case["seq_len"]),
                              generator=g)
        batch = batch.to(device)

        def step():
            loss = model(input_ids=batch, labels=batch).loss
            if kind == "fused":
                opt.fused_backward(loss, case["lr"])
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss

        probe.reset()  # the training peak: parameters are resident throughout
        rss_before = probe.current()
        times, losses = [], []
        for i in range(1 + case["steps"]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        peak = probe.peak()
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        row.update(
            peak_bytes=peak,
            peak_kind=probe.kind,
            rss_base_bytes=rss_base if device.type == "cpu" else None,
            rss_before_steps_bytes=rss_before if device.type == "cpu" else None,
            step_s=statistics.median(times) if times else None,
            step_s_p20=q(0.2) if times else None,
            step_s_p80=q(0.8) if times else None,
            tokens_per_s=(case["batch_size"] * case["seq_len"] / statistics.median(times)
                          if times else None),
            state_bytes=_state_bytes(opt),
            losses=losses,
            finite=all(math.isfinite(x) for x in losses),
        )
        # the peak this case adds to the process: CUDA, all of it; CPU, above the libraries' RSS
        row["net_peak_bytes"] = (peak if device.type == "cuda" or peak is None or rss_base is None
                                 else peak - rss_base)
        if device.type == "cuda" and peak is not None:
            row["activation_headroom_bytes"] = peak - row["floor_bytes"]
    except Exception as exc:  # noqa: BLE001 - reported in the row
        if _is_oom(exc):
            row["status"] = "OOM"
            row["peak_bytes"] = "OOM"
            row["step_s"] = "OOM"
        else:
            row["status"] = "error"
            row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if isinstance(opt, (Lomo, AdaLomo)):
            opt.remove_hooks()
        del model, opt, batch
        _free(device)
    return row


def run_case_isolated(case: dict, timeout: float | None = None) -> dict:
    """``run_case`` in a fresh Python process (a clean allocator; a crash is reported)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"optimizer": case["optimizer"], "shape": case["shape"], "status": "timeout"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (r.stderr or "")[-2000:]
    status = "OOM" if "out of memory" in tail.lower() or r.returncode in (-9, 137) else "error"
    return {"optimizer": case["optimizer"], "shape": case["shape"], "status": status,
            "peak_bytes": "OOM" if status == "OOM" else None, "returncode": r.returncode,
            "error": tail}


# ---------------------------------------------------------------------------------------------
# Cap search
# ---------------------------------------------------------------------------------------------


def search_cap(base_case: dict, cap_bytes: float, widths, vocab_size, runner, *,
               probe_depths=(2, 4), max_depth: int = 160, log=print) -> dict:
    """For each width the deepest family shape whose measured peak is <= ``cap_bytes``."""
    results = []
    for width in widths:
        peaks = {}
        for d in probe_depths:
            r = runner({**base_case, "shape": family_shape(width, d, vocab_size)})
            peaks[d] = r.get("net_peak_bytes") if r.get("status") == "ok" else None
        d1, d2 = probe_depths
        entry = {"width": width, "probe_peaks": {str(k): v for k, v in peaks.items()}}
        if peaks[d1] is None or not isinstance(peaks[d1], int) or peaks[d1] > cap_bytes:
            entry.update(depth=0, fits=False, note="the smallest probe depth does not fit")
            results.append(entry)
            log(f"  width {width}: depth {d1} does not fit")
            continue
        if peaks[d2] is None or not isinstance(peaks[d2], int):
            per_layer, depth = None, d1
        else:
            per_layer = max(1, (peaks[d2] - peaks[d1]) / (d2 - d1))
            depth = int(min(max_depth, d1 + (cap_bytes - peaks[d1]) // per_layer))
        verified = None
        tries = 0
        while depth >= d1 and tries < 4:
            r = runner({**base_case, "shape": family_shape(width, depth, vocab_size)})
            tries += 1
            net = r.get("net_peak_bytes") if r.get("status") == "ok" else None
            if isinstance(net, int) and net <= cap_bytes:
                verified = r
                break
            depth -= 1 if per_layer is None else max(1, int(0.02 * depth))
        if verified is None and depth < d1:
            depth, verified = d1, None
        shape = family_shape(width, depth, vocab_size)
        entry.update(
            depth=depth if verified is not None else 0,
            fits=verified is not None,
            per_layer_bytes=per_layer,
            shape=shape,
            n_params=llama_num_params(shape, vocab_size),
            peak_bytes=verified.get("net_peak_bytes") if verified else None,
            step_s=verified.get("step_s") if verified else None,
        )
        results.append(entry)
        log(f"  width {width}: depth {entry['depth']} fits={entry['fits']} "
            f"({entry['n_params'] / 1e9:.2f}B params, peak {_gb(entry['peak_bytes'])})")
    fitting = [e for e in results if e.get("fits")]
    best = max(fitting, key=lambda e: e["n_params"]) if fitting else None
    return {"cap_bytes": cap_bytes, "optimizer": base_case["optimizer"], "widths": results,
            "largest": best}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _gb(x):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x / GB:.2f} GB" if abs(x) >= 1e8 else f"{x / 1e6:.1f} MB"


def format_rows(rows) -> str:
    head = f"{'optimizer':<20} {'status':<7} {'peak':>10} {'floor':>10} {'step s':>9} {'tok/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        st = r.get("step_s")
        tps = r.get("tokens_per_s")
        lines.append(
            f"{r['optimizer']:<20} {r['status']:<7} {_gb(r.get('peak_bytes')):>10} "
            f"{_gb(r.get('floor_bytes')):>10} "
            f"{(f'{st:.4f}' if isinstance(st, float) else str(st)):>9} "
            f"{(f'{tps:,.0f}' if isinstance(tps, float) else 'n/a'):>9}"
            + (f"  {r['error'][:80]}" if r.get("error") else "")
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/bench_memory.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default=None, choices=sorted(MODEL_CONFIGS),
                   help="default: llama3-8b on CUDA, tiny on CPU")
    p.add_argument("--hidden-size", type=int, default=None, help="override the config's width")
    p.add_argument("--num-layers", type=int, default=None, help="override the config's depth")
    p.add_argument("--seq-len", type=int, default=None, help="default: 1024 on CUDA, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated subset of {OPTIMIZERS}")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="lk-* update kernels")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--isolation", choices=("subprocess", "inprocess"), default=None,
                   help="default: subprocess on CUDA, inprocess on CPU")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per isolated case")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="also search the largest Llama-family shape whose peak fits this cap "
                   "(GB = 1e9 B)")
    p.add_argument("--search-widths", default=None,
                   help="comma-separated widths (default: 2048..8192 on CUDA, 64,128 on CPU)")
    p.add_argument("--search-optimizer", default="lk-adalomo", choices=OPTIMIZERS)
    p.add_argument("--output", default=None, help="JSON file (default: print the JSON)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:  # a subprocess case
        row = run_case(json.loads(args.worker))
        print(json.dumps(row, default=str), flush=True)
        return row
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    model_config = args.model_config or ("tiny" if cpu else "llama3-8b")
    seq_len = args.seq_len or (64 if cpu else 1024)
    isolation = args.isolation or ("inprocess" if cpu else "subprocess")
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {o!r}; choose from {OPTIMIZERS}")
    shape = resolve_shape(model_config, {"hidden_size": args.hidden_size,
                                         "num_hidden_layers": args.num_layers})
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    def runner(case):
        if isolation == "subprocess":
            return run_case_isolated(case, timeout=args.timeout)
        return run_case(case)

    base = dict(device=str(device), dtype=args.dtype, seq_len=seq_len, batch_size=args.batch_size,
                steps=args.steps, gradient_checkpointing=args.gradient_checkpointing, lr=args.lr,
                backend=args.backend)
    env = environment(device)
    n_params = llama_num_params(shape)
    log(f"bench_memory: {model_config} ({n_params / 1e9:.3f}B params), {args.dtype}, "
        f"seq {seq_len} x batch {args.batch_size}, {device}, isolation {isolation}")
    rows = []
    for o in optimizers:
        log(f"  {o} ...")
        r = runner({**base, "optimizer": o, "shape": shape})
        r["model_config"] = model_config
        rows.append(r)
    if not args.quiet:
        print(format_rows(rows), file=sys.stderr)
    floor = None
    ok = [r for r in rows if r.get("floor_bytes")]
    if ok:
        keys = ("n_params", "param_bytes", "largest_grad_bytes", "floor_bytes",
                "floor_with_state_bytes")
        floor = {k: ok[0][k] for k in keys}
    search = None
    if args.memory_cap_gb is not None:
        default_widths = "64,128" if cpu else "2048,3072,4096,5120,6144,8192"
        widths = [int(w) for w in (args.search_widths or default_widths).split(",")]
        log(f"searching the largest shape under {args.memory_cap_gb} GB with "
            f"{args.search_optimizer} ...")
        search = search_cap({**base, "optimizer": args.search_optimizer},
                            args.memory_cap_gb * GB, widths, shape.get("vocab_size"), runner,
                            log=log)
        if search["largest"] and not args.quiet:
            b = search["largest"]
            log(f"largest: width {b['width']} depth {b['depth']} = "
                f"{b['n_params'] / 1e9:.2f}B params, "
                f"peak {_gb(b['peak_bytes'])}")
    result = {
        "environment": env,
        "args": {**base, "model_config": model_config, "shape": shape, "isolation": isolation,
                 "optimizers": optimizers, "memory_cap_gb": args.memory_cap_gb},
        "rows": rows,
        "floor": floor,
        "search": search,
    }
    text = json.dumps(result, indent=1, default=str)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
        log(f"wrote {args.output}")
    elif not args.quiet:
        print(text)
    return result


if __name__ == "__main__":
    main()
