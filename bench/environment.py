"""The environment record every result carries (device, versions, commit, date, machine load),
and where a run writes its results."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from bench.memprobe import proc_meminfo_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_gib(key: str) -> float | None:
    n = proc_meminfo_bytes(key)
    return None if n is None else round(n / 2**30, 1)


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
        "load_avg_1_5_15min": ([round(x, 2) for x in os.getloadavg()]
                               if hasattr(os, "getloadavg") else None),
        "cpu_count": os.cpu_count(),
        "memory_total_gib": _meminfo_gib("MemTotal"),
        "memory_available_gib": _meminfo_gib("MemAvailable"),
        **extra,
    }


def device_slug(env: dict) -> str:
    if env["device"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-") or "cuda"



def script_parser(prog: str, doc: str):
    """An argument parser whose description is the first paragraph of ``doc`` and whose epilog
    is the rest, formatted as written."""
    import argparse

    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_args(p, what: str) -> None:
    """``--out`` / ``--update-committed``: where a script writes ``what``."""
    p.add_argument("--out", type=Path, default=None,
                   help=f"directory for {what} (default: bench/results/runs/<device>-<date>/, "
                        "not tracked by git)")
    p.add_argument("--update-committed", action="store_true",
                   help=f"write {what} to bench/results/<device>/, the results committed to the "
                        "repository (what README.md quotes)")


def output_dir(args, env: dict) -> Path:
    """``--out``, else the committed directory with ``--update-committed``, else a fresh directory
    named by the device and the UTC date and time of the run (so that a benchmark never
    overwrites the committed results by accident)."""
    if getattr(args, "out", None):
        out = Path(args.out)
    elif getattr(args, "update_committed", False):
        out = RESULTS / device_slug(env)
    else:
        stamp = _dt.datetime.fromisoformat(env["date"]).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS / "runs" / f"{device_slug(env)}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    return out
