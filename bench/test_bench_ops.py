"""pytest-benchmark suite over the same update implementations as bench_lomo_update.py and
bench_adalomo_update.py, at small sizes:

    pytest bench/ --benchmark-only                     # CPU (or CUDA when there is a GPU)
    LOMO_BENCH_DEVICE=cpu pytest bench/ --benchmark-only --benchmark-group-by=group
    pytest bench/ --benchmark-only --benchmark-json=out.json

Not part of the test suite: ``pytest tests/`` never looks here, and a bare ``pytest`` from the
repository root skips this folder (bench/conftest.py) unless ``--benchmark-only`` is given or
bench/ is named on the command line. Implementations that cannot run here are skipped.
Each benchmark's ``extra_info`` holds the fewest bytes (docs/spec.md) and the effective GB/s of
its mean.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import bench_adalomo_update, bench_lomo_update, shapes
from bench.environment import environment
from bench.timing import synchronize

MODULES = {"lomo_update": bench_lomo_update, "adalomo_update": bench_adalomo_update}
IMPLS = {
    "lomo_update": ["native", "triton", "torch", "lomo_optim", "sgd"],
    "adalomo_update": ["native", "triton", "torch", "lomo_optim", "adafactor_foreach",
                       "adafactor_single"],
}
SHAPES = ["4096", "1024x1024", "2048x2048"]
DTYPES = ["bf16", "fp16", "fp32"]


def _device() -> torch.device:
    name = os.environ.get("LOMO_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CASES = [(op, impl) for op, impls in IMPLS.items() for impl in impls]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,impl", CASES, ids=[f"{o}-{i}" for o, i in CASES])
def test_update(benchmark, op, impl, dtype, shape):
    device = _device()
    mod = MODULES[op]
    dt = shapes.parse_dtype(dtype)
    shape_name, shape_list = shapes.parse_shape(shape)
    params, grads = shapes.make_params(shape_list, dt, device)
    found = [c for c in mod.candidates(device, dt, params, grads, [impl])
             if c.backend == impl or (impl == "sgd" and c.backend.startswith("sgd"))]
    if not found:
        pytest.skip(f"{impl} cannot run on {device} "
                    f"({environment(device)['backends_status']})")
    cand = found[0]
    if cand.setup is None:
        pytest.skip(cand.note)
    fn, _ = cand.setup()

    def call():
        fn()
        synchronize(device)

    benchmark.group = f"{op} {dtype} {shape_name} ({device.type})"
    benchmark.extra_info["backend"] = cand.backend
    benchmark.extra_info["bytes_min"] = shapes.fewest_bytes(op, shape_list, dt)
    benchmark.pedantic(call, warmup_rounds=3, rounds=30 if device.type == "cpu" else 200,
                       iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["gbps"] = benchmark.extra_info["bytes_min"] / mean / 1e9
    assert all(torch.isfinite(p).all() for p in params)
