"""CI smoke run of bench/bench_convergence.py (``--smoke``: a 0.1M-parameter model, 24 steps,
in one process): every optimizer trains on the same tokens from the same initialisation, the
results and plots are written, the printed tables fit 100 columns."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bench import bench_convergence as bc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_convergence.py"),
                           "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_outputs(smoke):
    out, stdout = smoke
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert max(len(line) for line in stdout.splitlines()) <= 100
    data = json.loads((out / "convergence.json").read_text())
    assert data["corpus"]["held_out_tokens"] > 0 and data["corpus"]["train_tokens"] > 0
    assert "load_avg_1_5_15min" in data["environment"] and data["load_avg_end"]
    runs = {r["optimizer"]: r for r in data["runs"]}
    assert list(runs) == list(bc.DEFAULT_OPTIMIZERS)
    for r in runs.values():
        assert "error" not in r, r.get("error")
        assert r["finite"] and r["tokens_per_s"] > 0 and r["state_bytes"] >= 0
        assert [c["step"] for c in r["curve"]] == [0, 12, 24]
        assert r["curve"][-1]["train_s"] > 0
        assert r["final_eval_loss"] == r["curve"][-1]["eval_loss"]


def test_same_tokens_same_start(smoke):
    """One initialisation and one batch order: the first training loss (before any update) and
    the first evaluation are identical for every optimizer."""
    runs = json.loads((smoke[0] / "convergence.json").read_text())["runs"]
    assert len({r["train_losses"][0] for r in runs}) == 1
    assert len({r["curve"][0]["eval_loss"] for r in runs}) == 1


def test_training_helps_and_lomo_optim_matches(smoke):
    runs = {r["optimizer"]: r for r in
            json.loads((smoke[0] / "convergence.json").read_text())["runs"]}
    for name in ("lk-adalomo", "adamw"):
        c = runs[name]["curve"]
        assert c[-1]["eval_loss"] < c[0]["eval_loss"] - 0.2, (name, c)
    # lomo-optim's AdaLomo computes the same update: the same curve
    ours, theirs = runs["lk-adalomo"], runs["lomo_optim-adalomo"]
    assert ours["train_losses"] == pytest.approx(theirs["train_losses"], rel=1e-3)
    assert ours["state_bytes"] == theirs["state_bytes"]
    assert runs["adamw"]["state_bytes"] >= 2 * runs["adamw"]["param_bytes"]
    assert ours["state_bytes"] < runs["adamw"]["state_bytes"] / 10


def test_held_out_files_are_never_trained_on():
    files = bc.stdlib_files(max_files=120)
    train, held, info = bc.token_streams(files)
    assert info["held_out_files"] == sum(bc.is_held_out(r) for r, _ in files) > 0
    held_docs = [d for r, d in files if bc.is_held_out(r)]
    # each held-out file's bytes are in the held-out stream, and not in the training stream
    as_bytes = lambda t: t[t < 256].to(torch.uint8).numpy().tobytes()  # noqa: E731
    train_bytes, held_bytes = as_bytes(train), as_bytes(held)
    for d in held_docs:
        assert d in held_bytes and d not in train_bytes
