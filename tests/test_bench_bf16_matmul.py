"""bench/bf16_matmul.py: bf16 linear layers computed in float32 tiles agree with float64 to bf16
rounding (output and both gradients, over several tiles and odd sizes), and bench_memory.py's
``--bf16-matmul float32-tiles`` routes the model's layers through them and then restores
``F.linear``."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ (pytest -P too)

from bench import bf16_matmul  # noqa: E402

BF16_ULP = 2.0 ** -8


@pytest.mark.parametrize("shape", [(3, 37, 300), (1, 5, 7)])
@pytest.mark.parametrize("out_features", [1000, 129])
def test_tiled_linear_matches_float64(monkeypatch, shape, out_features):
    # a tile of 7 weight rows: several tiles and a short last one
    monkeypatch.setattr(bf16_matmul, "TILE_BYTES", 4 * shape[-1] * 7)
    gen = torch.Generator().manual_seed(out_features + shape[-1])
    x = torch.randn(shape, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(out_features, shape[-1], generator=gen).bfloat16().requires_grad_()
    b = torch.randn(out_features, generator=gen).bfloat16().requires_grad_()
    y = bf16_matmul.tiled_linear(x, w, b)
    g = torch.randn(y.shape, generator=gen).bfloat16()
    y.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.linear(x64, w64, b64)
    y64.backward(g.double())
    # each result is a float32 sum rounded to bf16 (y: then the bias added, rounded again): within
    # two bf16 ulps of the sum of the terms' magnitudes (the standard bound; cancellation makes a
    # bound relative to the result itself meaningless)
    ax, aw, ab, ag = (t.detach().double().abs() for t in (x, w, b, g))
    ag2, ax2 = ag.reshape(-1, out_features), ax.reshape(-1, shape[-1])
    scales = (F.linear(ax, aw, ab), ag @ aw, ag2.t() @ ax2, ag2.sum(0))
    for got, want, scale in zip((y, x.grad, w.grad, b.grad), (y64, x64.grad, w64.grad, b64.grad),
                                scales):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert ((got.double() - want).abs() <= 2 * BF16_ULP * scale).all()


def test_patch_routes_bf16_cpu_only_and_undoes(monkeypatch):
    original = F.linear
    calls = []
    monkeypatch.setattr(bf16_matmul, "tiled_linear",
                        lambda *a: calls.append(a) or original(*a))
    undo = bf16_matmul.patch()
    try:
        lin = torch.nn.Linear(8, 4, bias=False)
        lin(torch.randn(2, 8))  # float32: the original
        assert calls == []
        lin.bfloat16()(torch.randn(2, 8).bfloat16())
        assert len(calls) == 1
    finally:
        undo()
    assert F.linear is original


def test_bench_memory_case_with_tiles_restores_linear(tmp_path):
    pytest.importorskip("transformers")
    from bench import bench_memory as bm
    original = F.linear
    res = bm.main(["--device", "cpu", "--seq-len", "16", "--isolation", "inprocess",
                   "--optimizers", "lk-adalomo", "--bf16-matmul", "float32-tiles",
                   "--steps", "0", "--no-allocator-trace", "--quiet", "--out", str(tmp_path)])
    assert F.linear is original
    (row,) = res["rows"]
    assert row["status"] == "ok" and row["finite"], row
    assert row["bf16_matmul"] == "float32-tiles" and row["step_is_first"] and row["step_s"] > 0
