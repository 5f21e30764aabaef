"""Beyond one process: parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), and
the refusal of replicated parameters that nothing keeps in step.

FSDP2 runs each sharded parameter's post-accumulate-grad hooks right after the reduce-scatter,
with the parameter (a DTensor placed ``Shard(0)`` on a 1-D device mesh) whose ``.grad`` is the
already averaged gradient of the local shard. The in-backward update therefore carries over: the
hook updates the local shard in place. Shards are ``torch.chunk``-like on dim 0 (the last ranks may
hold fewer rows, or none); a rank whose shard is empty still takes part in every collective.

What spans shards is all-reduced, a few small tensors per parameter, never one that is
parameter-sized:

* AdaLomo runs the staged op (docs/spec.md, "Sharded parameters"): stage 1, the header regions
  ``reference.adalomo_workspace_regions(global_shape)[0]`` summed across the shard group (packed
  into one all-reduce), stage 2, the regions ``[1]``, stage 3. Means and RMS divide by the global
  sizes; FSDP's padding never enters (the local shard excludes it).
* ``grad_norm()``: the squared norms of the local shards, summed across the group.
* The one look at the overflow flags after an updating backward: agreed across the group, so that
  every rank warns, skips and moves the fp16 loss scale alike.

AdaLomo's state is kept as DTensors for ``torch.distributed.checkpoint``: ``exp_avg_sq_row`` and
``exp_avg_sq`` ``Shard(0)`` (like the parameter's rows / elements), ``exp_avg_sq_col``
``Replicate()`` for 2-D parameters (every rank holds the same columns) and ``Shard(0)`` for
parameters of 3 or more dimensions (whole slices are split); it exists from construction, so that a
freshly built optimizer is a template DCP can load into. ``step`` is a plain int.

Replicated (plain) parameters while ``torch.distributed`` runs several ranks are said out loud
(``IndependentRanksWarning``, at construction or before the first update once the process group
exists): nothing averages their gradients before the hook applies them, so replicas trained on
different data drift apart; a rank may also train its own copy on purpose (a single-process
reference inside a sharded job), so this is a warning, which ``independent_ranks=True`` silences.
A model wrapped in ``DistributedDataParallel`` is refused (its reducer hooks the gradients after
ours, then averages zeros into ``.grad``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .. import ops, reference

_DOCS = "see the lomo_kernels README, 'Beyond one GPU'"


# ---------------------------------------------------------------------------------------------
# What torch.distributed offers, looked up without importing it when the program does not use it
# ---------------------------------------------------------------------------------------------


def _dist():
    """``torch.distributed`` when it is available, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def world_size() -> int:
    """Ranks of the default process group (1 when none is initialised)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _dtensor_cls():
    """The DTensor class, or None when ``torch.distributed.tensor`` was never imported (then no
    tensor can be a DTensor)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor (the tensor itself otherwise); a view, never a copy."""
    if t is None or not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def local_grad(p: torch.Tensor, g: torch.Tensor, pname: str, name: str) -> torch.Tensor:
    """The local shard of a sharded parameter's gradient, checked to be placed like ``p``."""
    if not is_dtensor(g) or tuple(g.placements) != tuple(p.placements):
        got = f"a DTensor placed {tuple(g.placements)}" if is_dtensor(g) else "a plain tensor"
        raise RuntimeError(
            f"{name}: parameter {pname} is sharded {tuple(p.placements)} but its gradient is "
            f"{got}; only gradients reduce-scattered by fully_shard can be applied to the local "
            "shard"
        )
    return local(g)


def locals_of(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` with every DTensor replaced by its local shard."""
    return {k: local(v) if torch.is_tensor(v) else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# One sharded parameter
# ---------------------------------------------------------------------------------------------


class ShardInfo(NamedTuple):
    """A parameter sharded ``Shard(0)`` over a 1-D device mesh."""

    mesh: Any  # DeviceMesh
    group: Any  # its ProcessGroup
    ranks: Tuple[int, ...]  # global ranks of the group
    rank: int  # this rank's index in the group
    global_shape: torch.Size
    local_shape: torch.Size
    rows: int  # AdaLomo's global_rows: shape[-2] for >= 2-D parameters, else 0
    numel: int  # global number of elements
    device: torch.device  # of the local shard


def _placement_error(name: str, pname: str, p: Any) -> ValueError:
    return ValueError(
        f"{name}: parameter {pname} is a DTensor placed {tuple(p.placements)} on a "
        f"{p.device_mesh.ndim}-d device mesh; in-backward updates support parameters sharded on "
        "dim 0 over a 1-d mesh (torch.distributed.fsdp.fully_shard's default placement, "
        "Shard(0)) only: not a shard_placement_fn that picks another dim, not HSDP (a 2-d mesh), "
        f"not replicated or tensor-parallel placements ({_DOCS})"
    )


def shard_info(p: torch.Tensor, pname: str, name: str) -> Optional[ShardInfo]:
    """None for a plain tensor; the layout of a DTensor parameter sharded ``Shard(0)`` over a 1-d
    mesh; a ValueError naming the parameter for any other DTensor."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    if mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise _placement_error(name, pname, p)
    loc = local(p)
    if not loc.is_contiguous():
        raise ValueError(f"{name}: parameter {pname}: its local shard is not contiguous")
    dist = _dist()
    group = mesh.get_group()
    if loc.device.type == "cpu" and dist.get_backend(group) == "nccl":
        raise ValueError(
            f"{name}: parameter {pname} lives on the CPU (FSDP2 CPU offload) but its process group "
            "uses NCCL, which cannot reduce the CPU tensors of in-backward updates; keep the "
            "parameters on the GPU (no offload_policy)"
        )
    shape = p.shape
    return ShardInfo(
        mesh=mesh, group=group, ranks=tuple(dist.get_process_group_ranks(group)),
        rank=mesh.get_local_rank(), global_shape=shape, local_shape=loc.shape,
        rows=shape[-2] if len(shape) >= 2 else 0, numel=p.numel(), device=loc.device,
    )


def shard_seed(seed: int, shard: ShardInfo) -> int:
    """The stochastic-rounding seed of one shard: the hash runs over local element indices, so each
    rank gets its own stream (rank 0 keeps the single-process seed)."""
    return (seed ^ reference.mix32(shard.rank)) & 0xFFFFFFFF


def unshard_seed(seed: int, shard: ShardInfo) -> int:
    """The single-process seed of a parameter from its shard's (``shard_seed`` undone): what keys
    GoLore's projections, identical on every rank."""
    return (seed ^ reference.mix32(shard.rank)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


def all_reduce_sum_(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``t`` in place across ``group`` (a no-op without one). For a gradient-norm accumulator
    (``grad_sq``) of sharded parameters: call it once after the backward, before the square root."""
    if group is not None:
        _dist().all_reduce(t, group=group)
    return t


def all_reduce_regions(ws: torch.Tensor, regions: List[Tuple[int, int]], group: Any,
                       pack: torch.Tensor) -> None:
    """Sum the ``regions`` of the workspace header across ``group`` in one all-reduce (several
    regions are packed into ``pack`` and back: no allocation)."""
    dist = _dist()
    if len(regions) == 1:
        a, b = regions[0]
        dist.all_reduce(ws[a:b], group=group)
        return
    views = [ws[a:b] for a, b in regions]
    n = sum(v.numel() for v in views)
    buf = pack[:n]
    torch.cat(views, out=buf)
    dist.all_reduce(buf, group=group)
    off = 0
    for v in views:
        v.copy_(buf[off:off + v.numel()])
        off += v.numel()


def _pack_numel(shape: Tuple[int, ...]) -> int:
    return sum(b - a for regions in reference.adalomo_workspace_regions(shape)
               for a, b in regions)


def adalomo_staged(impl: Callable, args: tuple, shard: ShardInfo, ws: torch.Tensor,
                   pack: torch.Tensor, **kwargs: Any) -> None:
    """The AdaLomo update of one local shard: ``impl`` (a backend's adalomo_update_) in stages 1, 2,
    3 with the header all-reduced in between. ``args``: the op's arguments up to ``step``;
    ``kwargs``: e.g. ``grad_sq``. Parameter and state are written in stage 3 only, and not at all
    when the (reduced) header says some rank's gradient was non-finite."""
    after1, after2 = reference.adalomo_workspace_regions(tuple(shard.global_shape))
    for stage, regions in ((1, after1), (2, after2), (3, ())):
        impl(*args, workspace=ws, stage=stage, global_rows=shard.rows,
             global_numel=shard.numel, **kwargs)
        if regions:
            all_reduce_regions(ws, regions, shard.group, pack)


def staged_support(impl: Callable, backend: str, device: torch.device) -> Optional[str]:
    """None when ``impl`` (``backend``'s adalomo_update_) runs the staged op on ``device``, else its
    error (a backend that has not implemented stages yet). A local call on a 1 x 1 tensor."""
    z = lambda *shape: torch.zeros(shape, device=device)  # noqa: E731
    ws = z(ops.workspace_numel("adalomo_update_", [[1, 1]], backend=backend, device=device))
    try:
        impl(z(1, 1), z(1, 1), z(1), z(1), None, None, None, 0.0, 0.0, 1.0, 0.0, 0.5, 1e-30,
             1e-3, 1.0, "nearest", 0, 1, workspace=ws, stage=1, global_rows=1, global_numel=1)
    except (RuntimeError, NotImplementedError) as exc:
        return str(exc)
    return None


def adalomo_state(shard: ShardInfo) -> Dict[str, Any]:
    """Fresh AdaLomo state of a sharded parameter, as DTensors (see the module docstring)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    state: Dict[str, Any] = {"step": 0}
    global_shapes = ops.adalomo_state_shapes(shard.global_shape)
    for key, shape in ops.adalomo_state_shapes(shard.local_shape).items():
        replicated = key == "exp_avg_sq_col" and len(shard.global_shape) == 2
        full = torch.Size(global_shapes[key])
        state[key] = DTensor.from_local(
            torch.zeros(shape, dtype=torch.float32, device=shard.device), shard.mesh,
            [Replicate() if replicated else Shard(0)], run_check=False, shape=full,
            stride=_contiguous_strides(full),
        )
    return state


def _contiguous_strides(shape: torch.Size) -> Tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))
