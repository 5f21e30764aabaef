"""GoLore / GaLore gradient accumulation in the subspace (``accumulation_steps > 1``).

The projection is linear, so the sum of a window's projected gradients R = P^T G_i (or G_i P) is
the projection of the summed gradient: a low-rank weight accumulates R (float32, the size of one
moment) with the same kernel as a full buffer, and its weight-sized gradient is freed in every
hook. The projector is the one due at the window's update, drawn at the window's first gradient
(before the first projection; GaLore's SVD: from that micro-batch's gradient, since the summed
gradient does not exist yet). ``step()`` then runs the inner update on R and the back-projection
once (projected mode of ``golore_update_``, then ``GoLore._apply``).

Exact global-norm clipping needs the norm of the whole accumulated gradient, which R does not
give (the part of G outside the subspace is lost): with ``clip_grad_norm`` in the exact mode every
weight keeps a full buffer instead (the update then projects the sum, exactly as K=1 would). In
the other modes ``last_grad_norm`` of a low-rank weight is the norm of its accumulated R. An FSDP2
shard's hook sees only its rows of the gradient: sharded weights keep a full buffer of the local
shard, and ``step()`` runs the sharded update on it as on a gradient.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import _batch
from . import projector as proj
from ._failures import state_restored_on_error


class SubspaceAccumulationMixin:
    """``_accumulate_param`` and ``_apply_param`` of GoLore (see the module doc)."""

    def _in_subspace(self, p: torch.Tensor) -> Optional[tuple]:
        """(m, n) when ``p`` accumulates its projected gradient, else None (a full buffer: exact
        clipping, or an FSDP2 shard, whose hook sees only its rows of the gradient)."""
        if self.clip_grad_norm is not None and self.clip_mode == "exact":
            return None
        if p in self._sharding.shards:
            return None
        return self._matrix_shape(p, self.param_groups[self._where[p][0]])

    def _accumulate_param(self, p: torch.Tensor, g: torch.Tensor, shard: Optional[Any]) -> bool:
        mn = self._in_subspace(p)
        if mn is None:
            return super()._accumulate_param(p, g, shard)
        group = self.param_groups[self._where[p][0]]
        state = self.state[p]
        if not state:
            self._init_state(p, group, state, mn)
        g2 = g.view(mn) if g.dim() != 2 else g
        side = proj.side_of(*mn, group["side"])
        w = self._window
        buf, slot, first = w.buffer(p, proj.projected_shape(*mn, group["rank"], group["side"]),
                                    torch.float32, g.device)
        if first and state["step"] >= state["next_refresh"]:  # due at this window's update
            self._refresh(g2, group, state, side, self._param_seed(p), mn, t0=state["step"])
        if state["projector"] is None:
            # the first SVD needs a finite gradient: this micro-batch adds nothing (a later one of
            # the window may start the subspace)
            self._device_flag(g.device).fill_(1.0)
            return False
        r = proj.project(g2, state["projector"], side)
        self._accumulate_into(p, buf, r, slot, first)
        return True

    def _apply_param(self, p: torch.Tensor, buf: torch.Tensor, shard: Optional[Any]) -> None:
        mn = self._in_subspace(p)
        if mn is None or tuple(buf.shape) == tuple(p.shape):
            return super()._apply_param(p, buf, shard)
        group = self.param_groups[self._where[p][0]]
        seed = self._param_seed(p)
        found = self._device_flag(p.device)
        with state_restored_on_error(self.state, [p]) as (state,), torch.no_grad():
            state["step"] += 1
            w = p.data if p.dim() == 2 else p.data.view(mn)
            _batch.add_grad_sq(self._accumulator(p), buf, 1.0)  # the norm of R
            self._inner(buf, None, group, state, found, seed, 0.0, 0.0)  # N written into buf
            self._apply(w, None, buf, state["projector"], proj.side_of(*mn, group["side"]), group,
                        state, seed, found)
        self._stamp[p] = self._token
        self._n_updated += 1
