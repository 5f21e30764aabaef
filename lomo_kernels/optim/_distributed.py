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
import warnings
import zlib
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

from .. import ops, reference
from .._stack import user_stacklevel

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


# ---------------------------------------------------------------------------------------------
# The distributed side of one optimizer
# ---------------------------------------------------------------------------------------------


def _ddp_message(name: str) -> str:
    return (
        f"{name}: the model is wrapped in DistributedDataParallel, which cannot work with "
        "in-backward updates: each parameter is updated inside its gradient hook, which runs "
        "before DDP's reducer averages the gradient, so every rank would apply its own local "
        "gradient and the replicas would silently drift apart (DDP would then all-reduce "
        "gradient-sized buckets of zeros and leave a zero .grad on every parameter, the memory "
        "in-backward updates exist to save). Shard the model with "
        "torch.distributed.fsdp.fully_shard instead (each block, then the root) and create the "
        f"optimizer from the sharded model: the gradients are averaged before the hooks run ({_DOCS})"
    )


class IndependentRanksWarning(RuntimeWarning):
    """Plain (unsharded) parameters while torch.distributed runs several ranks: each rank updates
    its own copy from its own gradient."""


def _replicated_message(name: str, pname: str, world: int) -> str:
    return (
        f"{name}: parameter {pname} is a plain (unsharded) tensor while torch.distributed runs "
        f"{world} ranks: each rank updates its own copy from its own gradient (nothing averages "
        "gradients across ranks before an in-backward update, and DistributedDataParallel cannot: "
        "its reducer runs after the update), so copies trained on different data drift apart. "
        "For data parallelism apply torch.distributed.fsdp.fully_shard to the model (each block, "
        "then the root) and create the optimizer after it (an optimizer created before "
        f"fully_shard holds the replaced tensors) ({_DOCS}). If each rank trains its own "
        "parameters on purpose (a single-process reference run, pipeline stages, separate runs), "
        "pass independent_ranks=True, which also silences this warning."
    )


class Sharding:
    """The distributed layout of one optimizer's parameters and the collectives it needs."""

    def __init__(self, name: str, independent_ranks: bool) -> None:
        self.name = name
        self.independent_ranks = independent_ranks
        self.shards: Dict[torch.Tensor, ShardInfo] = {}  # sharded parameter -> its layout
        self._names: Dict[torch.Tensor, str] = {}  # sharded parameter -> name
        self.plain: Dict[torch.Tensor, str] = {}  # trainable plain parameter -> name
        self.group: Any = None  # the shard group of every sharded parameter
        self.comm_device: Optional[torch.device] = None  # where its small collectives run
        self.norms: List[torch.Tensor] = []  # grad_norm(): local norms of the sharded gradients
        self._ws_numel: Dict[torch.device, Tuple[int, int]] = {}  # device -> (workspace, pack)
        self._ws: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._grad_sq: Dict[torch.device, torch.Tensor] = {}  # device -> sharded norm^2 (1 elem)
        self._model_checked = False
        self._warned_plain = False
        #: the optimizer keys per-parameter randomness by the parameter's ordinal (GoLore's
        #: projections): the ranks must also agree on the sharded parameters' positions
        self.keyed = False

    # -------------------------------------------------------------- parameters
    def check_model(self, model: Any) -> None:
        """Refuse a model wrapped in DistributedDataParallel or in the original FSDP (flat
        parameters that each rank would update on its own)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(_ddp_message(self.name))
        fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
        if isinstance(model, torch.nn.Module) and fsdp1 is not None and any(
                isinstance(m, fsdp1) for m in model.modules()):
            raise TypeError(
                f"{self.name}: the model is wrapped in FullyShardedDataParallel (the original "
                "FSDP, whose flat parameters in-backward updates cannot take); use FSDP2, "
                f"torch.distributed.fsdp.fully_shard ({_DOCS})"
            )

    def inspect(self, params: List[Tuple[torch.Tensor, str]], backend: str) -> tuple:
        """Check ``params`` ((parameter, name) pairs about to be hooked): placements, one process
        group, the same layout on every rank, no plain parameter under several ranks. Raises
        before anything changes; ``adopt`` the result once nothing else can fail."""
        name = self.name
        sharded = [(p, pname, shard_info(p, pname, name)) for p, pname in params]
        plain = {p: pname for p, pname, s in sharded if s is None}
        sharded = [item for item in sharded if item[2] is not None]
        known = self._first_shard() + [(pname, s) for _, pname, s in sharded]
        for pname, s in known[1:]:
            if s.ranks != known[0][1].ranks:
                raise ValueError(
                    f"{name}: process group mismatch: parameter {known[0][0]} is sharded over "
                    f"ranks {list(known[0][1].ranks)} but {pname} over ranks {list(s.ranks)}; "
                    "every sharded parameter of one optimizer must share one process group (the "
                    "gradient norm and the overflow decision are agreed over it); use one "
                    "optimizer per group"
                )
        self._warn_plain(plain)
        if sharded:
            where = ""
            if self.keyed:
                ids = {id(p) for p, _, _ in sharded}
                where = f"|{len(params)}:{[i for i, (p, _) in enumerate(params) if id(p) in ids]}"
            self._agree_on_layout(name, sharded, where)
        return sharded, plain, backend

    def adopt(self, inspected: tuple) -> List[torch.Tensor]:
        """Record what ``inspect`` returned; returns the newly sharded parameters."""
        sharded, plain, backend = inspected
        for p, pname, s in sharded:
            self.shards[p] = s
            self._names[p] = pname
            self.group = s.group if self.group is None else self.group
            self.comm_device = self.comm_device or s.device
            ws_need, pack_need = self._ws_numel.get(s.device, (0, 1))
            need = ops.workspace_numel("adalomo_update_", [list(s.local_shape),
                                                           list(s.global_shape)],
                                       backend=backend, device=s.device)
            self._ws_numel[s.device] = (max(ws_need, need),
                                        max(pack_need, _pack_numel(tuple(s.global_shape))))
            self._ws.pop(s.device, None)  # re-allocated at its next use, large enough
        self.plain.update(plain)
        return [p for p, _, _ in sharded]

    def _first_shard(self) -> List[Tuple[str, ShardInfo]]:
        for p, s in self.shards.items():
            return [(self._names[p], s)]
        return []

    def _agree_on_layout(self, name: str, sharded: list, where: str = "") -> None:
        """One small all-reduce: every rank of the group must hook the same sharded parameters,
        else the per-parameter collectives of the first backward would pair up wrongly and hang."""
        group = sharded[0][2].group
        dist = _dist()
        if dist.get_world_size(group) == 1:
            return
        desc = ";".join(f"{tuple(s.global_shape)}" for _, _, s in sharded) + where
        mine = [len(sharded), sum(s.numel for _, _, s in sharded) % (1 << 40),
                zlib.crc32(desc.encode())]
        t = torch.tensor(mine + [-v for v in mine], dtype=torch.int64,
                         device=sharded[0][2].device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        hi, lo = t[:3].tolist(), [-v for v in t[3:].tolist()]
        if hi != lo:
            raise RuntimeError(
                f"{name}: process group mismatch: the ranks of the shard group disagree on the "
                f"sharded parameters (this rank: {mine[0]} parameters, {mine[1]} elements; "
                f"across ranks: {lo[0]}..{hi[0]} parameters, {lo[1]}..{hi[1]} elements). Create "
                "the optimizer on every rank of the group, with the same parameters in the same "
                "order"
            )

    def check_world(self) -> None:
        """Before an update: plain parameters while torch.distributed runs several ranks (it may
        have been initialised after the optimizer was created) are said once."""
        self._warn_plain(self.plain)

    def _warn_plain(self, plain: Dict[torch.Tensor, str]) -> None:
        # A warning, not an error: a rank may train its own copy on purpose, e.g. the
        # single-process reference of a sharded run computed inside the same job; what must not
        # happen is that replicas drift apart silently.
        if not plain or self.independent_ranks or self._warned_plain:
            return
        world = world_size()
        if world > 1:
            self._warned_plain = True
            warnings.warn(_replicated_message(self.name, next(iter(plain.values())), world),
                          IndependentRanksWarning, stacklevel=user_stacklevel())

    def check_not_resharded(self, model: Any, known: Dict[torch.Tensor, Any]) -> None:
        """Once, at the first use: a model sharded by fully_shard after the optimizer was created
        has new parameter tensors that no hook of ours sees; nothing would be trained."""
        if self._model_checked or not isinstance(model, torch.nn.Module):
            return
        for pname, p in model.named_parameters():
            if p.requires_grad and p not in known and is_dtensor(p):
                raise RuntimeError(
                    f"{self.name}: parameter {pname} of the model is a sharded DTensor this "
                    "optimizer does not know: fully_shard was applied after the optimizer was "
                    "created, so its hooks sit on the replaced tensors and nothing would be "
                    "trained. Create the optimizer after fully_shard."
                )
        self._model_checked = True

    # -------------------------------------------------------------- per-step collectives
    def workspace(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(workspace, pack buffer) of the staged AdaLomo op on ``device``: allocated once, zeroed,
        sized for every sharded parameter there (its local and global shapes)."""
        got = self._ws.get(device)
        if got is None:
            ws_numel, pack_numel = self._ws_numel[device]
            got = self._ws[device] = (torch.zeros(ws_numel, device=device),
                                      torch.zeros(pack_numel, device=device))
        return got

    def grad_sq(self, device: torch.device) -> torch.Tensor:
        """The 1-element float32 accumulator of the sharded gradients' squared norms on
        ``device`` (this rank's shards; created once)."""
        acc = self._grad_sq.get(device)
        if acc is None:
            acc = self._grad_sq[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return acc

    def zero_grad_sq(self) -> None:
        for acc in self._grad_sq.values():
            acc.zero_()

    def reduced_grad_sq(self, device: torch.device) -> torch.Tensor:
        """The shards' squared gradient norm summed across the shard group (0 when nothing is
        sharded), a 0-d tensor on ``device``. No host sync; one all-reduce of one element."""
        if self.group is None:
            return torch.zeros((), dtype=torch.float32, device=device)
        sq = torch.zeros((), dtype=torch.float32, device=self.comm_device)
        for acc in self._grad_sq.values():  # in the order the devices were first used
            sq = sq + acc.to(self.comm_device)[0]
        all_reduce_sum_(sq, self.group)
        return sq.to(device)

    def total_norm(self, plain_norms: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """The L2 norm of all gradients: the local norms of plain parameters, and those of the
        sharded ones summed (squared) across the shard group. None when there is nothing."""
        sharded, self.norms = self.norms, []
        if self.group is None:
            if not plain_norms:
                return None
            dev = plain_norms[0].device
            return torch.linalg.vector_norm(torch.stack([n.to(dev) for n in plain_norms]))
        dev = self.comm_device
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        if sharded:
            sq = torch.stack([n.to(dev) for n in sharded]).double().square().sum()
        all_reduce_sum_(sq, self.group)
        if plain_norms:
            sq = sq + torch.stack([n.to(dev) for n in plain_norms]).double().square().sum()
        return sq.sqrt().float()

    def any_rank(self, found: bool) -> bool:
        """``found`` agreed across the shard group (True if any rank found it)."""
        if self.group is None:
            return found
        dist = _dist()
        t = torch.tensor([1.0 if found else 0.0], device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())
