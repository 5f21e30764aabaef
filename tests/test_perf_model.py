"""bench/perf_model.py: the byte and launch counts it predicts from, and one tiny measured run
(so the script cannot rot). Timings are printed, never asserted."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import microbench, perf_model  # noqa: E402


def test_bytes_follow_the_spec():
    n = 4096 * 4096
    assert perf_model.model_bytes("lomo_update", [(4096, 4096)]) == 6 * n
    # AdaLomo: 12 B per bf16 element, plus the fp32 r and c read and written once
    assert perf_model.model_bytes("adalomo_update", [(4096, 4096)]) == 12 * n + 2 * 4 * 8192
    # a 1-d parameter: 5 x 2 B + 12 B per element (its fp32 v is in the fewest bytes)
    assert perf_model.model_bytes("adalomo_update", [(4096,)]) == 22 * 4096


def test_launch_counts_of_a_whole_model():
    shapes = perf_model.shape_list("llama3-8b")
    n2 = sum(len(s) == 2 for s in shapes)
    n1 = len(shapes) - n2
    assert (n2, n1) == (226, 65)
    table = perf_model.LAUNCHES
    for backend in table:
        per_2d, per_1d, multi = table[backend]["today"]["adalomo"]
        assert perf_model.launches("adalomo_update", shapes, backend, "today") == (
            n2 * per_2d + (multi if multi else n1 * per_1d))
        per_2d, _, multi = table[backend]["target"]["adalomo"]
        assert perf_model.launches("adalomo_update", shapes, backend, "target") == (
            n2 * per_2d + multi)


def test_prediction_is_bytes_over_bandwidth_plus_launches():
    row = perf_model.predict("adalomo_update", [(4096, 4096)], launch_us=4.0)
    for gpu, bw in perf_model.GPUS.items():
        want = row["bytes"] / bw * 1e6 + 4.0 * row["launches_cuda_target"]
        assert math.isclose(row[f"pred_us_{gpu}_cuda_target"], want)


@pytest.mark.skipif(not microbench.kernel_backends("cpu", ["native"]), reason="no native backend")
def test_a_tiny_measured_run_writes_its_results(tmp_path, capsys):
    perf_model.main(["--measure", "--threads", "1", "--shapes", "64x96", "--repeats", "1",
                     "--rep-ms", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "PREDICTIONS" in out and "64x96" in out
    rows = json.loads((tmp_path / "perf_model.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["lomo_update", "adalomo_update"]
    for r in rows:
        assert r["cpu_ms"] > 0 and r["same_bytes_gbps"] > 0 and r["load_1min_max"] >= 0
    assert (tmp_path / "perf_model.md").read_text().count("64x96") == 2
