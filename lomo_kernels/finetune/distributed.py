"""``--fsdp`` under torchrun: joining the process group, and reductions of logged values."""

from __future__ import annotations

import os

import torch

from .errors import UsageError


def local(p):
    """The local shard of a sharded (DTensor) parameter, else the parameter."""
    return p.to_local() if hasattr(p, "to_local") else p


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA: one GPU per local
    rank). Returns True when it was initialised here."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError(
            "--fsdp runs under torchrun, which starts one process per rank: "
            "torchrun --nproc-per-node N -m lomo_kernels.finetune --fsdp ..."
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _group_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank_and_world() -> tuple:
    import torch.distributed as dist

    if _group_size() == 1:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def sum_over_ranks(values: list, device) -> list:
    """``values`` (floats) summed over the ranks, in one all-reduce."""
    import torch.distributed as dist

    if _group_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    import torch.distributed as dist

    if _group_size() > 1:
        dist.barrier()


def max_over_ranks(x: int, device) -> int:
    import torch.distributed as dist

    if _group_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)
