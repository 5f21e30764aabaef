"""CI smoke test of the benchmarks: ``python bench/run.py --device cpu --sizes tiny`` runs once
(so the scripts cannot rot) and its JSON / CSV carry every field docs/design.md asks of a benchmark
row, with sane values, and the printed tables fit 100 columns. Takes ~15-30 s on a 2-core
CPU."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import same_bytes  # noqa: E402

ENV_FIELDS = ("device", "device_name", "torch_version", "triton_version", "cuda_version",
              "git_commit", "git_dirty", "date", "cpu_threads", "backends_status")
ROW_FIELDS = ("op", "backend", "kind", "dtype", "shape", "n_tensors", "numel", "bytes_min",
              "median_ms", "p20_ms", "p80_ms", "gbps", "same_bytes_ms", "same_bytes_gbps",
              "frac_same_bytes", "frac_same_bytes_p20", "frac_same_bytes_p80", "same_bytes_impl",
              "peak_extra_bytes", "peak_method", "state_bytes", "ratio_to_plain_backward", "note")
SPEEDUPS = {
    "lomo_update": ("speedup_vs_lomo_optim", "speedup_vs_torch_backend"),
    "adalomo_update": ("speedup_vs_lomo_optim", "speedup_vs_torch_backend",
                       "speedup_vs_adafactor_foreach", "speedup_vs_adafactor_single"),
}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: on a shared CI machine two OpenMP threads competing with other processes spin
    # and can make the run several times slower; this test checks the output, not the speed.
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cpu", "--sizes", "tiny",
           "--threads", "1", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"bench/run.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def test_outputs_written(bench_run):
    out, stdout = bench_run
    assert (out / "results.json").stat().st_size > 0
    assert (out / "results.csv").stat().st_size > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "of same-bytes" in stdout and "lomo_update" in stdout
    assert max(len(line) for line in stdout.splitlines()) <= 100


def test_results_go_to_a_directory_per_run(tmp_path, monkeypatch):
    """Without --out, a run never writes over the committed results."""
    import argparse

    from bench import environment

    monkeypatch.setattr(environment, "RESULTS", tmp_path)
    env = {"device": "cpu", "device_name": "x", "date": "2026-01-02T03:04:05+00:00"}
    ns = argparse.Namespace(out=None, update_committed=False)
    assert environment.output_dir(ns, env) == tmp_path / "runs" / "cpu-20260102T030405Z"
    ns.update_committed = True
    assert environment.output_dir(ns, env) == tmp_path / "cpu"
    ns.out = tmp_path / "elsewhere"
    assert environment.output_dir(ns, env) == tmp_path / "elsewhere"


def test_json_rows(bench_run):
    out, _ = bench_run
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert rows
    ops = {r["op"] for r in rows}
    assert {"lomo_update", "adalomo_update", "backward_plain", "backward_lomo",
            "backward_adalomo"} <= ops

    for r in rows:
        for f in ENV_FIELDS + ROW_FIELDS:
            assert f in r, f"row {r.get('op')}/{r.get('backend')} lacks {f}"
        assert r["device"] == "cpu"
        assert r["torch_version"] == torch.__version__
        assert r["device_name"]
        assert r["cpu_threads"] >= 1
        datetime.datetime.fromisoformat(r["date"])
        assert r["git_commit"] is None or r["git_commit"].isalnum()
        assert "failed" not in r["note"], r["note"]
        # sane timings everywhere
        assert _positive(r["median_ms"]), r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_extra_bytes"] is None or r["peak_extra_bytes"] >= 0
        assert r["dtype"] in ("bf16", "fp16", "fp32") and r["numel"] > 0 and r["shape"]

    micro = [r for r in rows if r["op"] in SPEEDUPS]
    assert {r["dtype"] for r in micro} == {"bf16", "fp32"}
    for r in micro:
        # the fraction of the same-bytes stream, timed interleaved with the row's update
        assert _positive(r["gbps"]) and _positive(r["same_bytes_gbps"])
        assert r["frac_same_bytes_p20"] <= r["frac_same_bytes"] <= r["frac_same_bytes_p80"]
        assert _positive(r["frac_same_bytes_p20"])
        assert math.isclose(r["same_bytes_gbps"], r["bytes_min"] / r["same_bytes_ms"] / 1e6,
                            rel_tol=1e-9)
        assert r["bytes_min"] > 0
        for key in SPEEDUPS[r["op"]]:
            assert _positive(r[key]), (r["op"], r["backend"], key, r[key])
        assert _positive(r.get("speedup_vs_sgd_fused") or r.get("speedup_vs_sgd_foreach")) \
            if r["op"] == "lomo_update" else True
        if r["backend"] == "torch":
            assert r["speedup_vs_torch_backend"] == pytest.approx(1.0)

    backends = {(r["op"], r["backend"]) for r in micro}
    for op in SPEEDUPS:
        assert (op, "torch") in backends and (op, "lomo_optim") in backends
    assert ("adalomo_update", "adafactor_foreach") in backends
    import lomo_kernels

    if lomo_kernels.available_backends()["native"].startswith("loaded"):
        assert ("lomo_update", "native") in backends and ("adalomo_update", "native") in backends
        assert {r["same_bytes_impl"] for r in micro} == {same_bytes.NATIVE_IMPL}

    # LOMO moves 3 elements' worth of bytes per element, AdaLomo (2-d) 6
    r = next(r for r in micro if r["op"] == "lomo_update" and r["shape"] == "512x1024"
             and r["dtype"] == "bf16")
    assert r["bytes_min"] == 6 * 512 * 1024
    r = next(r for r in micro if r["op"] == "adalomo_update" and r["shape"] == "512x1024"
             and r["dtype"] == "bf16")
    assert r["bytes_min"] == 12 * 512 * 1024

    bwd = [r for r in rows if r["op"].startswith("backward_")]
    for r in bwd:
        assert _positive(r["ratio_to_plain_backward"])
    assert {r["backend"] for r in bwd if r["op"] == "backward_adalomo"} >= {"torch", "lomo_optim"}


def test_csv_matches_json(bench_run):
    out, _ = bench_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert set(table[0]) == set(rows[0])
    for f in ("device", "torch_version", "git_commit", "date", "median_ms", "gbps"):
        assert f in table[0]
