"""Smoke test of bench/bench_clip_modes.py: every variant runs and the row fields are sane (the
times themselves are printed by the benchmark, never asserted)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/

from bench import bench_clip_modes  # noqa: E402


def test_every_clipping_mode_runs_side_by_side():
    result = bench_clip_modes.run("cpu", "bwd-tiny", "bf16",
                                  timing=dict(warmup_ms=0.0, rep_ms=1.0, min_reps=2))
    rows = result["rows"]
    assert [(r["optimizer"], r["mode"]) for r in rows] == [("none", "plain backward")] + [
        (o, m) for o in ("lomo", "adalomo")
        for m in ("unclipped", "exact", "previous", "window1", "acc4")]
    for r in rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["reps"] >= 2
        assert (r["ratio_to_unclipped"] is None) == (r["optimizer"] == "none")
    assert len(result["environment"]["load_avg_before"]) == 3
    assert "plain backward" in bench_clip_modes.format_table(result)
