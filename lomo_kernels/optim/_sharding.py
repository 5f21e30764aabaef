"""The distributed side of one optimizer (``Sharding``): its parameters' layout across ranks, the
refusal of DistributedDataParallel and the warning on replicated parameters, and the few small
collectives of a step. The layout and collective helpers it builds on are in _distributed.py,
whose docstring describes the whole design."""

from __future__ import annotations

import sys
import warnings
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import ops, reference
from .._stack import user_stacklevel
from ._distributed import (_DOCS, ShardInfo, _dist, _pack_numel, all_reduce_sum_, is_dtensor, local,
                           shard_info, world_size)

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
