"""The whole-step benchmark (bench/bench_backward.py --whole-step): every variant runs and really
updates its own copy of the model, the plain step's ratio to itself is 1, and a row carries what
the results need. Its speed is not asserted (a tiny synthetic model stands in for the real one)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/

from bench import bench_backward  # noqa: E402


def test_every_variant_updates_its_own_copy():
    base, ids = bench_backward.build_model("bwd-tiny", torch.float32, "cpu")
    fns = bench_backward.whole_step_fns(base, ids, torch.float32)
    assert list(fns) == [v for v, _, _ in bench_backward.STEP_VARIANTS]
    before = [p.detach().clone() for p in base.parameters()]
    for name, step in fns.items():
        step()
        model = step.__defaults__[0]  # the model copy the step runs on
        changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert changed == (name != "backward_plain"), name
        if name == "backward_plain":
            assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), before))  # base untouched


def test_rows_are_ratios_to_the_plain_step_of_the_same_round():
    base, ids = bench_backward.build_model("bwd-tiny", torch.float32, "cpu")
    rows = bench_backward.whole_step("bwd-tiny", ["fp32"], [1], repeats=1, rounds=2, base=base,
                                     ids=ids)
    assert [r["op"] for r in rows] == [v for v, _, _ in bench_backward.STEP_VARIANTS]
    plain = rows[0]
    assert plain["ratio_to_plain_backward"] == 1.0 and plain["overhead_ms"] == 0.0
    for r in rows:
        assert r["rounds"] == 2 and r["threads"] == 1 and r["dtype"] == "fp32"
        assert r["median_ms"] > 0 and r["ratio_to_plain_backward"] > 0
        assert len(r["load_1min_start_end"]) == 1
    # the bytes the step's update ops must move: the spec's count over the model's own tensors
    # (a 1-d tensor's AdaLomo update moves its factored-less state too)
    shapes = [tuple(p.shape) for p in base.parameters()]
    n = sum(p.numel() for p in base.parameters())
    n1 = sum(p.numel() for p in base.parameters() if p.dim() < 2)
    assert plain["fewest_bytes"] is None
    for r in rows[1:]:
        want = 12 * n if r["optimizer"] == "lomo" else 24 * (n - n1) + (20 + 12) * n1
        assert r["fewest_bytes"] == want, (r["op"], shapes)
    assert "median ms" in bench_backward.format_whole_step(rows)


def test_the_profile_finds_the_updates_inside_the_step():
    # --profile: the time inside this library's ops, per step; the plain step launches none, the
    # optimizer steps one update per parameter tensor (the small ones batched into fewer calls)
    base, ids = bench_backward.build_model("bwd-tiny", torch.float32, "cpu")
    rows = bench_backward.whole_step("bwd-tiny", ["fp32"], [1], repeats=1, rounds=1, base=base,
                                     ids=ids, profile=2)
    n = len(list(base.parameters()))
    for r in rows:
        p = r["profile"]
        assert p["steps"] == 2 and p["step_ms"] > 0
        if r["op"] == "backward_plain":
            assert p["update_ops_ms"] == 0 and p["update_ops_calls"] == 0 and not p["ops_ms"]
        else:
            assert 0 < p["update_ops_ms"] < p["step_ms"]
            assert 1 <= p["update_ops_calls"] <= n
            assert all(k.startswith("lomo_kernels::") for k in p["ops_ms"])
    assert "in ops ms" in bench_backward.format_whole_step(rows)
