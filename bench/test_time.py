"""How long README's test command takes on this machine (wall and CPU time, with the load).

    python bench/test_time.py                     # the default run, into bench/results/cpu/
    python bench/test_time.py -- -m "slow or not slow"   # every case, as CI runs them

Runs ``python -m pytest -q -rs tests`` plus the arguments after ``--`` in a subprocess, and records
its wall time, the CPU time of the processes it ran, the load average before and after, and the
summary line's counts in test_time.json (one row per selection; a new run replaces the row of the
same arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "pytest", "-q", "-rs", "tests"]


def run(extra: list[str], log: Path | None) -> dict:
    cmd = COMMAND + extra
    load_before = list(os.getloadavg())
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.stdout + out.stderr
    if log:
        log.write_text(text)
    summary = next((line for line in reversed(text.splitlines()) if " in " in line
                    and re.search(r"\d+ (passed|failed)", line)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)",
                                               summary)}
    if out.returncode:
        sys.exit(f"the tests failed (exit {out.returncode}): {summary}\n{text[-3000:]}")
    return {"command": "python -m pytest -q -rs tests" + "".join(f" {a!r}" if " " in a else f" {a}"
                                                                  for a in extra),
            "wall_s": round(wall, 1),
            "cpu_s": round((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), 1),
            "load_avg_before": load_before, "load_avg_after": list(os.getloadavg()),
            "counts": counts, "summary": summary.strip("= ")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu")
    ap.add_argument("--log", type=Path, help="write pytest's output here")
    ap.add_argument("extra", nargs="*", help="pytest arguments (after --)")
    a = ap.parse_args(argv)
    env = environment.environment("cpu")
    row = run(a.extra, a.log)
    print(f"{row['command']}: {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU (load "
          f"{row['load_avg_before'][0]} -> {row['load_avg_after'][0]}); {row['summary']}")
    path = a.out / "test_time.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if r["command"] != row["command"]] + [{**row, "environment": env}]
    a.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
