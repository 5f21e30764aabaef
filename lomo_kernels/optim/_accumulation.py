"""Gradient accumulation (``accumulation_steps=K > 1``): the hooks add each gradient into a
buffer (``grad_accumulate_``, then free it), and ``step()`` applies the window with the update
kernels reading the buffers as the gradient. docs/design.md ("Gradient accumulation") says why the
update runs in ``step()``.

* **In a backward** (``_accumulate``): the parameter's buffer receives ``g / loss_scale`` (the
  window's first gradient writes it) and its slot the buffer's squared norm; nothing changes a
  parameter. The K-th ``fused_backward`` ends with ``step()``; a (K+1)-th backward without
  ``step()`` is refused before it changes anything (``WindowFullError``).
* **At ``step()``** (``_apply_window``): with exact global-norm clipping the window's norm (the
  slots' sum, across ranks for FSDP2 shards) gives the clip coefficient before the first parameter
  changes (a non-finite norm skips the window, as ``grad_norm`` skips a step); then every
  parameter filled in the window is updated from its buffer (loss scale 1: the buffers hold
  unscaled gradients), in ordinal order, small ones batched, and the step closes as after a
  K=1 backward (``last_grad_norm``, flags, loss scaler). ``step()`` after fewer than K backwards
  applies what was accumulated.
* **Failures**: a backward that fails after it has accumulated anything drops the window (its
  buffers count as empty; the error says so); one that fails before keeps the earlier backwards.
  A failure during the update itself is reported as a K=1 backward's is.

Attributes owned here: ``_window``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch

from .._stack import user_stacklevel
from . import _distributed
from ._bookkeeping import NonFiniteGradientWarning
from ._guards import with_note
from ._window import Window, WindowFullError, add_note

_OP = "grad_accumulate_"


class AccumulationMixin:
    """Gradient accumulation of ``InBackwardOptimizer`` (see the module doc)."""

    def _init_accumulation(self, steps: int, dtype: str) -> None:
        self._window = Window(steps, dtype)

    @property
    def accumulation_steps(self) -> int:
        """K: backwards accumulated per update (1: every backward updates)."""
        return self._window.steps

    # ------------------------------------------------------------------ in a backward
    def _check_window_open(self) -> None:
        """Before an accumulating backward: refused once K backwards wait for ``step()``."""
        w = self._window
        if w.enabled and w.count >= w.steps:
            raise WindowFullError(
                f"{self._name}: accumulation_steps={w.steps} backwards have been accumulated "
                "since the last optimizer.step(); call optimizer.step() to apply them before the "
                "next backward (fused_backward calls it itself after the last micro-batch). "
                "Nothing was changed: the accumulated gradients are kept."
            )

    def _accumulate(self, p: torch.Tensor, g: torch.Tensor, shard: Optional[Any]) -> None:
        """The hook of an accumulating backward: ``g`` (the gradient, or an FSDP2 shard's local
        part) into ``p``'s buffer."""
        w = self._window
        w.in_backward += 1  # from here on a failure leaves this window inconsistent
        with torch.no_grad():
            if self._accumulate_param(p, g, shard):
                w.mark(p)

    def _accumulate_param(self, p: torch.Tensor, g: torch.Tensor, shard: Optional[Any]) -> bool:
        """Extension point: what ``p`` accumulates (default: its gradient, in a buffer of the
        gradient's shape and ``accumulation_dtype``); False when nothing was."""
        buf, slot, first = self._window.buffer(p, tuple(g.shape), self._window.buffer_dtype(p),
                                               g.device)
        self._accumulate_into(p, buf, g, slot, first, sharded=shard is not None)
        return True

    def _accumulate_into(self, p: torch.Tensor, buf: torch.Tensor, g: torch.Tensor,
                         slot: torch.Tensor, first: bool, sharded: bool = False) -> None:
        """One ``grad_accumulate_`` call: ``buf (+)= g / loss_scale``, ``slot = ||buf||^2``."""
        dev = g.device
        rounding, seed, step = self._window.rounding_of(buf, self._param_seed(p))
        # an FSDP2 hook may run on another stream: no shared workspace there
        ws = None if sharded else self._workspace(dev)
        self._accumulate_impl(dev)(buf, g, self._device_flag(dev), float(self._active_scale),
                                   first, rounding, seed, step, slot, ws)

    def _accumulate_impl(self, device: torch.device) -> Callable:
        from .. import ops

        key = (_OP, device)
        impl = self._impls.get(key)
        if impl is None:
            impl = self._impls[key] = ops.get_impl(_OP, self.backend, device)
        return impl

    def _accumulate_workspace_numel(self, device: torch.device, shapes: List[tuple]) -> int:
        from .. import ops

        if not self._window.enabled or not shapes:
            return 0
        return ops.workspace_numel(_OP, shapes, backend=self._backends[device], device=device)

    def _end_accumulating_backward(self) -> None:
        w = self._window
        w.count += 1
        w.in_backward = 0
        w.scaled |= self._in_fused

    # ------------------------------------------------------------------ at step()
    def _apply_window(self) -> None:
        """Apply the window (see the module doc); nothing when nothing was accumulated."""
        w = self._window
        if self._active_tasks and w.in_backward:
            held = w.close()
            raise RuntimeError(
                f"{self._name}: the last backward did not finish (an error outside the "
                "optimizer's hooks, such as out of memory, stopped it after it had accumulated "
                f"gradients); the accumulation window was dropped (its {held} finished "
                "backward(s) and the unfinished one are discarded) and no parameter was changed. "
                "The next backward starts a new window."
            )
        params = w.params(self._where)
        scaled = w.scaled
        if not params and not w.count:
            return  # nothing accumulated since the last step()
        w.close()
        if not params:
            return
        if self.clip_grad_norm is not None and self.clip_mode == "exact":
            if not self._clip_window(params, scaled):
                return
        self._mode = "update"
        self._active_scale = 1.0  # the buffers hold unscaled gradients
        self._n_updated = 0
        self._start_grad_norm()  # (its _begin_clipping: "previous" applies the last coefficient)
        if self.clip_grad_norm is not None and self.clip_mode == "exact":
            self._clip_applies = True  # the window's own coefficient, set by _clip_window
        for i, p in enumerate(params):
            try:
                self._apply_param(p, w.buffers[p], self._sharding.shards.get(p))
            except Exception as exc:
                raise self._apply_failure(exc, p, len(params) - i - 1) from exc
        try:
            self._update_pending()
        except Exception as exc:
            raise with_note(exc, "(in the update of the accumulation window, at step())") from exc
        self._after_update(scaled=scaled)

    def _apply_param(self, p: torch.Tensor, buf: torch.Tensor, shard: Optional[Any]) -> None:
        """Extension point: update ``p`` from its buffer (default: as from a gradient). Every
        backend's update kernels read a float32 buffer of a 16-bit parameter as it is (no
        rounding of the sum, no parameter-sized temporary)."""
        self._route(p, buf, shard)

    def _window_squared_norm(self, params: List[torch.Tensor]) -> torch.Tensor:
        """The accumulated gradient's squared norm (FSDP2 shards' parts summed across ranks)."""
        dev = self._main_device()
        shards = self._sharding.shards
        total = self._window.squared_norm([p for p in params if p not in shards], dev)
        if self._sharding.group is not None:
            comm = self._sharding.comm_device
            part = self._window.squared_norm([p for p in params if p in shards], comm)
            _distributed.all_reduce_sum_(part, self._sharding.group)
            total = total + part.to(dev)
        return total

    def _clip_window(self, params: List[torch.Tensor], scaled: bool) -> bool:
        """Exact clipping: the clip coefficient from the window's norm, before any parameter
        changes. False when the norm is not finite: the window changes nothing (as a step whose
        ``grad_norm`` overflowed; the fp16 loss scaler backs off)."""
        norm = torch.sqrt(self._window_squared_norm(params))
        if norm.device.type != "meta" and not bool(torch.isfinite(norm)):  # one host look
            self.last_grad_norm = norm
            for t in self._found_inf.values():
                t.zero_()
            if self.loss_scaler is not None and scaled:
                self.loss_scaler.update_scale(overflow=True)
            else:
                warnings.warn(
                    f"{self._name}: the accumulated gradient's norm is {float(norm)}; this "
                    "step's update was skipped (no parameter changed)",
                    NonFiniteGradientWarning, stacklevel=user_stacklevel())
            return False
        self._set_clip_coef(self._clip_coef_from(norm))
        return True

    def _apply_failure(self, exc: Exception, p: torch.Tensor, left: int) -> Exception:
        n, waiting = self._n_updated, len(self._pending)
        self._abort_backward()
        also = f" nor were the {waiting} small parameter(s) batched before it," if waiting else ""
        return with_note(exc, (
            f"(in the update of the accumulation window at step(), at parameter "
            f"{self._pname(p)}: {n} parameter(s) had already been updated in place; "
            f"{self._pname(p)} and the {left} parameter(s) after it were not changed,{also} and "
            "the window is consumed)"))

    # ------------------------------------------------------------------ failures
    def _window_note(self, exc: BaseException) -> str:
        """What a failed backward did to the window (and drops it if it had accumulated)."""
        w = self._window
        if isinstance(exc, WindowFullError):
            return ""
        if w.in_backward == 0:
            return (f"(no parameter was changed; the {w.count} earlier backward(s) of this "
                    "accumulation window are kept)")
        held = w.close()
        return (f"(no parameter was changed; the accumulation window was dropped: the gradients "
                f"of this backward and of the {held} earlier backward(s) since the last step() "
                "are discarded, and the next backward starts a new window)")

    def _note_outside_failure(self, exc: BaseException) -> None:
        """An error outside our hooks stopped a ``fused_backward``: drop the window if this
        backward had accumulated, and say so on the error."""
        if self._window.enabled and self._window.in_backward:
            add_note(exc, f"{self._name}: {self._window_note(exc)}")

    # ------------------------------------------------------------------ state_dict
    def _window_state(self) -> Optional[Dict[str, Any]]:
        w = self._window
        if not w.enabled or w.count == 0:
            return None
        if any(p in self._sharding.shards for p in w.params(self._where)):
            raise RuntimeError(
                f"{self._name}: state_dict() between the backwards of an accumulation window "
                "is not supported for parameters sharded by fully_shard (the buffers are local "
                "shards); call it after optimizer.step()")
        ids = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {"steps": w.steps, **w.state(ids)}

    def _check_window_state(self, saved: Optional[Dict[str, Any]]) -> None:
        if saved is not None and saved["steps"] != self._window.steps:
            raise ValueError(
                f"{self._name}: the state_dict was saved inside a window of "
                f"accumulation_steps={saved['steps']}; this optimizer has "
                f"accumulation_steps={self._window.steps}")

    def _load_window_state(self, saved: Optional[Dict[str, Any]]) -> None:
        """Resume the saved window (None: start at a window boundary)."""
        params = dict(enumerate(p for g in self.param_groups for p in g["params"]))
        self._window.load(saved, params)


__all__ = ["AccumulationMixin", "WindowFullError"]
