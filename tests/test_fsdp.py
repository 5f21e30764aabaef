"""Lomo and AdaLomo on parameters sharded by FSDP2 (fully_shard), on 2 and 3 gloo ranks spawned by
the tests themselves (tests/distributed_harness.py; the cases are in tests/fsdp_cases.py). One job
per world size runs every case on one process group; each test reports its case. 3 ranks make the
shards uneven and leave some ranks with empty shards.

Backends: Lomo's update is elementwise, so every backend's single-tensor kernel runs on shards;
AdaLomo on shards needs the staged op (backends join FSDP_ADALOMO_BACKENDS as they implement it)."""

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_harness import fail_unless_ok, run_jobs

REPO = Path(__file__).resolve().parents[1]

WORLD_SIZES = (2, 3)
JOB_TIMEOUT = 900  # seconds for one job (all cases, one world size); the machine may be loaded
FSDP_LOMO_BACKENDS = ("torch", "native", "cuda_emulated")
FSDP_ADALOMO_BACKENDS = ("torch", "native", "cuda_emulated")

CASES = (
    [f"equivalence:Lomo:{b}" for b in FSDP_LOMO_BACKENDS]
    + [f"equivalence:AdaLomo:{b}" for b in FSDP_ADALOMO_BACKENDS]
    + [f"bf16_step:Lomo:{b}" for b in FSDP_LOMO_BACKENDS]
    + [f"bf16_step:AdaLomo:{b}" for b in FSDP_ADALOMO_BACKENDS]
    + [f"one_backward_clipping:Lomo:{b}" for b in FSDP_LOMO_BACKENDS]
    + [f"one_backward_clipping:AdaLomo:{b}" for b in FSDP_ADALOMO_BACKENDS]
    + [f"accumulation:Lomo:{b}" for b in FSDP_LOMO_BACKENDS]
    + [f"accumulation:AdaLomo:{b}" for b in FSDP_ADALOMO_BACKENDS]
    + ["mixed_precision:Lomo:torch", "mixed_precision:AdaLomo:torch"]
    + ["nonfinite_on_one_rank:Lomo:torch", "loss_scaler_agrees:torch"]
    + [f"nonfinite_on_one_rank:AdaLomo:{b}" for b in FSDP_ADALOMO_BACKENDS]
    + ["dcp_round_trip:Lomo:torch", "dcp_round_trip:AdaLomo:torch"]
    + ["ddp_refused"]
    + [f"{case}:{cls}" for case in ("built_before_fully_shard", "shard_dim_1",
                                   "process_group_mismatch") for cls in ("Lomo", "AdaLomo")]
)


@functools.lru_cache(maxsize=None)
def jobs():
    """Both world sizes' jobs, run at the same time (the first test that needs one starts both)."""
    return run_jobs("fsdp_cases", CASES, WORLD_SIZES, JOB_TIMEOUT)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES)
def test_fsdp(case, world_size):
    fail_unless_ok(jobs()[world_size][case])


@pytest.mark.parametrize("optimizer", [
    [],  # AdaLomo, the default
    # GoLore with SVD projections for the first 2 steps and random ones after (refreshes at
    # steps 0 and 2): both kinds of refresh on shards
    ["--optimizer", "golore", "--rank", "8", "--update-proj-gap", "2", "--svd-steps", "2"],
], ids=["adalomo", "golore"])
def test_torchrun_finetune_fsdp(optimizer):
    """The real launch: torchrun, 2 ranks on CPU (gloo over 127.0.0.1, a port the OS picks)."""
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
           "-m", "lomo_kernels.finetune", "--fsdp", "--steps", "4", "--seq-len", "32",
           "--batch-size", "2", "--eval-batches", "1", "--clip-grad-norm", "1.0", *optimizer]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("== lomo_kernels.finetune summary ==") == 1, r.stdout  # rank 0 only
    assert "x 2 ranks (FSDP2)" in r.stdout, r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("train loss"))
    first, last = float(line.split()[3]), float(line.split()[6])
    assert math.isfinite(first) and math.isfinite(last) and abs(first - 5.55) < 0.3, line
