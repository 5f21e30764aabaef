"""The launch count of a whole step (bench/launch_count.py), counted on the meta device: the
optimizer's real hooks and end-of-backward batching decide the op calls."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/

from bench import launch_count as lc  # noqa: E402


@pytest.mark.parametrize("optimizer", ["lomo", "adalomo"])
def test_op_calls_of_a_small_meta_model(optimizer):
    shapes = [(300, 16), (300,), (70000,), (240, 300), (240,), (4, 240), ()]
    params = [torch.nn.Parameter(torch.empty(s, device="meta", dtype=torch.bfloat16))
              for s in shapes]
    off = lc.count_op_calls(params, optimizer, batch_small_params=False)
    assert sorted(s for _, (s,) in off["calls"]) == sorted(shapes)
    assert off["kept_grad_bytes"] == 0
    on = lc.count_op_calls(params, optimizer)
    single = [s[0] for op, s in on["calls"] if not op.endswith("multi_")]
    multi = [s for op, s in on["calls"] if op.endswith("multi_")]
    # Lomo batches 1-d/0-d parameters and those of at most 65536 elements; AdaLomo 1-d/0-d
    small = {(300,), (70000,), (240,), ()} | ({(300, 16), (4, 240)} if optimizer == "lomo"
                                                else set())
    assert len(multi) == 1 and sorted(multi[0]) == sorted(small)
    assert sorted(single) == sorted(set(shapes) - small)
    assert on["kept_grad_bytes"] == 2 * sum(torch.Size(s).numel() for s in small)
    launches = {"lomo_update_": 1, "adalomo_update_/factored": 3,
                "adalomo_update_/unfactored": 5, f"{optimizer}_update_multi_": None}
    per_small = 1 if optimizer == "lomo" else 5
    assert lc.launches_of(on["calls"], launches) == lc.launches_of(off["calls"], launches)
    launches[f"{optimizer}_update_multi_"] = 1
    assert (lc.launches_of(off["calls"], launches) - lc.launches_of(on["calls"], launches)
            == per_small * len(small) - 1)


def test_llama3_8b_step():
    """291 parameters, 65 of them 1-d norm weights (520 KiB of bf16 gradients kept)."""
    params = lc.meta_params("llama3-8b", torch.bfloat16)
    table = lc.launch_table()
    for optimizer in ("lomo", "adalomo"):
        off = lc.count_op_calls(params, optimizer, batch_small_params=False)
        on = lc.count_op_calls(params, optimizer)
        assert len(off["calls"]) == 291 and len(on["calls"]) == 227
        assert on["kept_grad_bytes"] == 65 * 4096 * 2 and off["kept_grad_bytes"] == 0
        for kernels in table.values():
            for launches in kernels.values():
                multi = launches[f"{optimizer}_update_multi_"]
                if optimizer == "lomo":
                    single = small = launches["lomo_update_"]
                else:
                    single = launches["adalomo_update_/factored"]
                    small = launches["adalomo_update_/unfactored"]
                assert lc.launches_of(off["calls"], launches) == 226 * single + 65 * small
                assert lc.launches_of(on["calls"], launches) == 226 * single + (
                    65 * small if multi is None else multi)
