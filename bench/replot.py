"""Redraw the committed plots from their JSON files, without measuring anything.

    python bench/replot.py                        # bench/results/cpu/
    python bench/replot.py bench/results/runs/cpu-20260101T000000Z

results.png from results.json (run.py), memory.png from memory.json (bench_memory.py). Use it
after changing how bench/report.py draws.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # python bench/replot.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import plot_memory, write_plot  # noqa: E402


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results" / "cpu"
    if (folder / "results.json").exists():
        data = json.loads((folder / "results.json").read_text())
        rows = [SimpleNamespace(**r) for r in data["rows"]]
        if write_plot(folder / "results.png", rows, data["environment"],
                      data["meta"].get("copy_gbps")):
            print(folder / "results.png")
    if (folder / "memory.json").exists():
        data = json.loads((folder / "memory.json").read_text())
        if plot_memory(folder / "memory.png", data["rows"], data["environment"], data["args"]):
            print(folder / "memory.png")


if __name__ == "__main__":
    main()
