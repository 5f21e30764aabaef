"""GoLore and GaLore on parameters sharded by FSDP2 (fully_shard), on 2 and 3 gloo ranks spawned by
the tests themselves (tests/distributed_harness.py; the cases are in tests/golore_fsdp_cases.py).
One job per world size runs every case on one process group; each test reports its case. 3 ranks
make the shards uneven and leave some ranks with empty shards. The real launch (torchrun, the
fine-tuning demo with GoLore) is in test_fsdp.py.

The inner update is element-wise, so every backend's kernel runs on shards unchanged; the
projections (the part that is new on shards) are torch code, the same for every backend."""

import functools

import pytest

from distributed_harness import fail_unless_ok, run_jobs
from test_fsdp import JOB_TIMEOUT, WORLD_SIZES

CASES = (
    [f"equivalence:random:{side}:torch" for side in ("auto", "right", "left")]
    + [f"equivalence:random:auto:{b}" for b in ("native", "cuda_emulated")]
    + [f"equivalence:svd:{side}:torch" for side in ("auto", "right")]
    + [f"one_backward_clipping:{p}" for p in ("random", "svd")]
    + ["accumulation:random"]
    + [f"nonfinite_on_one_rank:{p}" for p in ("random", "svd")]
    + [f"dcp_round_trip:{p}" for p in ("random", "svd")]
    + ["refusals", "bf16_smoke:random", "bf16_smoke:svd"]
)


@functools.lru_cache(maxsize=None)
def jobs():
    """Both world sizes' jobs, run at the same time (the first test that needs one starts both)."""
    return run_jobs("golore_fsdp_cases", CASES, WORLD_SIZES, JOB_TIMEOUT)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES)
def test_golore_fsdp(case, world_size):
    fail_unless_ok(jobs()[world_size][case])
