"""GoLore / GaLore on FSDP2 shards (docs/spec.md, "Sharded GoLore / GaLore"; docs/golore.md).

A weight W (m x n, rows split ``Shard(0)`` in the ``torch.chunk`` layout) is updated from its
gradient's rows G_s on every rank, with the projected side of one process (GaLore's rule, or the
``side`` option), so that a sharded run is the single-process run on the global batch:

* right (P n x r): R_s = G_s P is this rank's rows of R; the inner update and the
  back-projection W_s -= lr * scale * N_s P^T are local; the moments are sharded by rows. One
  1-element all-reduce agrees on a non-finite gradient (the whole weight is skipped on every rank,
  as on one process).
* left (P m x r): R = sum over ranks of P_s^T G_s (an all-reduce of r x n; a non-finite value
  reaches every rank through it); every rank runs the inner update on the same R with the same
  replicated moments, then W_s -= lr * scale * P_s N.

Projectors are replicated: a random one is drawn identically on every rank (the key is the
single-process one: seed, parameter ordinal, refresh index), an SVD one comes from
``projector.svd_projector_sharded`` (collectives of (n or m) x k at refresh steps only).
Full-rank parameters run the element-wise inner update on the local shard, after the same
1-element agreement. The state is DTensors from construction (a template for
``torch.distributed.checkpoint``): projector ``Replicate()``, moments ``Shard(0)`` (right side,
full rank) or ``Replicate()`` (left side); ``step``, ``refreshes`` and ``next_refresh`` ints.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch

from . import _distributed
from . import projector as proj

_MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


class Rows:
    """The rows of one sharded parameter on this rank and the collectives over its shard group
    that the sharded update needs (``projector.svd_projector_sharded``'s ``rows``)."""

    def __init__(self, shard: _distributed.ShardInfo, pname: str, name: str) -> None:
        m = shard.global_shape[0] if len(shard.global_shape) else 1
        self.world = len(shard.ranks)
        self.chunk = -(-m // self.world)
        self.total, self.start = m, min(m, self.chunk * shard.rank)
        self.count = shard.local_shape[0] if len(shard.local_shape) else 1
        self.group = shard.group
        if self.count != min(m, self.start + self.chunk) - self.start:
            raise ValueError(
                f"{name}: parameter {pname}: rank {shard.rank} holds {self.count} of its {m} "
                f"rows, not the torch.chunk layout of fully_shard ({self.chunk} rows per rank); "
                "the sharded projection needs to know which rows each rank holds")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        _distributed.all_reduce_sum_(t, self.group)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The ``total`` x k matrix whose rows ``start:start + count`` are this rank's ``t``."""
        buf = t.new_zeros(self.chunk, t.shape[1])
        buf[:self.count] = t
        return self.stack(buf)[:self.total]

    def stack(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (one shape on every rank), stacked on dim 0 in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        _distributed._dist().all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def nonfinite(self, t: torch.Tensor) -> torch.Tensor:
        """A 1-element float32 flag, 1 on every rank when any rank's ``t`` holds a NaN/Inf (a
        reduction of ``t``: no temporary of its size)."""
        flag = torch.zeros(1, dtype=torch.float32, device=t.device)
        if t.numel():
            lo, hi = torch.aminmax(t)
            flag = (~(torch.isfinite(lo) & torch.isfinite(hi))).float().reshape(1)
        dist = _distributed._dist()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag

    def spoil_if_any_nonfinite_(self, t: torch.Tensor, value: float) -> None:
        """Write ``value`` (NaN/Inf) into the first element of ``t`` when any rank's ``t`` is not
        finite, so that the fused update, which skips a tensor with a non-finite element, skips
        the whole parameter on every rank (as one process does). No host synchronisation."""
        flag = self.nonfinite(t)
        if t.numel():
            t.view(-1)[:1].masked_fill_(flag.bool(), value)


def _layout(shard: _distributed.ShardInfo, group: Dict[str, Any], names) -> Dict[str, Tuple]:
    """name -> (global shape, local shape, replicated) of each state tensor."""
    gshape, lshape = tuple(shard.global_shape), tuple(shard.local_shape)
    mn = proj.matrix_shape(gshape, group["rank"], group["low_rank"])
    if mn is None:
        return {name: (gshape, lshape, False) for name in names}
    (m, n), r = mn, group["rank"]
    rows = lshape[0]
    if proj.side_of(m, n, group["side"]) == "right":
        out = {"projector": ((n, r), (n, r), True)}
        out.update({name: ((m, r), (rows, r), False) for name in names})
    else:
        out = {"projector": ((m, r), (m, r), True)}
        out.update({name: ((r, n), (r, n), True) for name in names})
    return out


def fresh_state(shard: _distributed.ShardInfo, group: Dict[str, Any], names) -> Dict[str, Any]:
    """The state of a sharded parameter before its first update, as DTensors (module docstring;
    the projector is zeros until the first refresh: ``refreshes == 0``)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    state: Dict[str, Any] = {"step": 0}
    layout = _layout(shard, group, names)
    if "projector" in layout:
        state["refreshes"] = state["next_refresh"] = 0
    for name, (gshape, lshape, replicated) in layout.items():
        full = torch.Size(gshape)
        state[name] = DTensor.from_local(
            torch.zeros(lshape, dtype=torch.float32, device=shard.device), shard.mesh,
            [Replicate() if replicated else Shard(0)], run_check=False, shape=full,
            stride=_distributed._contiguous_strides(full))
    return state


def _matches(state: Dict[str, Any], shard, group, names) -> bool:
    layout = _layout(shard, group, names)
    have = {k for k in state if k in _MOMENTS or k == "projector"}
    return have == set(layout) and all(
        tuple(state[k].shape) == gshape for k, (gshape, _, _) in layout.items())


def _rewrap(state: Dict[str, Any], local: Dict[str, Any]) -> None:
    """Store the local tensors a refresh made (new projector, transferred moments) back into
    ``state`` as DTensors placed like the ones they replace (out of place: a failing update
    restores the old entries)."""
    from torch.distributed.tensor import DTensor

    for k in ("projector",) + _MOMENTS:
        if k in state and local.get(k) is not None:
            like = state[k]
            state[k] = DTensor.from_local(local[k], like.device_mesh, like.placements,
                                          run_check=False, shape=like.shape, stride=like.stride())
    state["refreshes"], state["next_refresh"] = local["refreshes"], local["next_refresh"]


def update(opt, p: torch.Tensor, g: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any],
           seed: int, shard: _distributed.ShardInfo, pname: str) -> None:
    """The GoLore / GaLore update of the local shard ``p`` (gradient shard ``g``) of a parameter
    sharded ``Shard(0)``; ``seed`` is the shard's stochastic-rounding seed, ``opt`` the GoLore
    optimizer (its inner update, refresh and back-projection, shared with one process)."""
    names = opt._state_names(group)
    if state["step"] == 0 and not _matches(state, shard, group, names):
        state.clear()  # options changed between construction and the first update
        state.update(fresh_state(shard, group, names))
    rows = Rows(shard, pname, opt._name)
    local = _distributed.locals_of(state)
    state["step"] = local["step"] = state["step"] + 1
    found = opt._device_flag(p.device)
    mn = proj.matrix_shape(tuple(shard.global_shape), group["rank"], group["low_rank"])
    if mn is None:  # full rank: element-wise on the local shard, skipped whole on every rank
        rows.spoil_if_any_nonfinite_(g, math.nan)  # (the norm was taken before)
        opt._inner(g, p, group, local, found, seed, float(group["lr"]),
                   float(group["weight_decay"]))
        return
    p2, g2 = p.view(rows.count, mn[1]), g.view(rows.count, mn[1])
    side = proj.side_of(*mn, group["side"])
    if local["refreshes"] == 0:
        local["projector"] = None
    if local["step"] - 1 >= local["next_refresh"]:
        # the projection key is the single-process one: the seed before the rank was mixed in
        done = opt._refresh(g2, group, local, side, _distributed.unshard_seed(seed, shard), mn,
                            rows)
        if done:
            _rewrap(state, local)
        elif local["projector"] is None:  # no subspace yet and a non-finite gradient
            found.fill_(1.0)
            return
    pmat = local["projector"]
    if side == "right":
        r = proj.project(g2, pmat, "right")
        rows.spoil_if_any_nonfinite_(r, math.nan)
    else:
        pmat = pmat[rows.start:rows.start + rows.count]
        r = rows.sum_(proj.project(g2, pmat, "left"))
    opt._inner(r, None, group, local, found, seed, 0.0, 0.0)
    opt._apply(p2, g2, r, pmat, side, group, local, seed, found)
