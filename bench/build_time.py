"""How long `pip install` takes to build the native extension, from a clean copy of this tree.

    python bench/build_time.py                           # both variants, into bench/results/cpu/
    python bench/build_time.py --variants cpu --max-jobs 2

Variants: ``cpu`` (``LOMO_KERNELS_SKIP_CUDA_BUILD=1``: the CPU kernels only, what a CPU-only torch
builds) and ``full`` (CPU kernels, the CUDA kernels for sm_80/sm_90 with nvcc, and the same CUDA
source for the ``cuda_emulated`` test backend: what CI builds). Each runs
``pip install -v --no-build-isolation --no-deps .`` into a throw-away virtual environment that
sees the current one's packages (torch), from a ``git clone`` of HEAD (no earlier build output),
and records the wall time, the load and the build log's size in build_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "cpu": {"LOMO_KERNELS_SKIP_CUDA_BUILD": "1"},
    "full": {"LOMO_KERNELS_FORCE_BUILD": "1", "LOMO_KERNELS_CUDA_EMULATION": "1"},
}


def build(variant: str, max_jobs: int, tmp: Path) -> dict:
    src, venv = tmp / f"src-{variant}", tmp / f"venv-{variant}"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(src)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the new environment's own setuptools would shadow the current one's: the build needs >= 77
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "--upgrade", "setuptools>=77", "wheel"],
                   check=True)
    pth = next(venv.glob("lib/python*/site-packages"))
    (pth / "zz_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {**os.environ, "MAX_JOBS": str(max_jobs), **VARIANTS[variant]}
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-v", "--no-build-isolation",
           "--no-deps", "--disable-pip-version-check", "."]
    load_before = list(os.getloadavg())
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if out.returncode:
        sys.exit(f"{variant}: pip install failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return {"variant": variant, "env": VARIANTS[variant], "max_jobs": max_jobs,
            "command": " ".join(f"{k}={v}" for k, v in VARIANTS[variant].items())
            + f" MAX_JOBS={max_jobs} pip install -v --no-build-isolation .",
            "wall_s": round(wall, 1), "load_avg_before": load_before,
            "load_avg_after": list(os.getloadavg()),
            "log_lines": len((out.stdout + out.stderr).splitlines())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["cpu", "full"], choices=sorted(VARIANTS))
    ap.add_argument("--max-jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu")
    a = ap.parse_args(argv)
    env = environment.environment("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [build(v, a.max_jobs, Path(tmp)) for v in a.variants]
    for r in rows:
        print(f"{r['variant']}: {r['wall_s']:.0f} s (load {r['load_avg_before'][0]} -> "
              f"{r['load_avg_after'][0]})")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "build_time.json").write_text(json.dumps({"environment": env, "rows": rows},
                                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
