"""lomo-optim's API: the backward passes the optimizer drives (``fused_backward``, ``grad_norm``) and
``step()``, the step boundary.

``fused_backward(loss, lr)`` checks everything before its backward starts, runs it with the
update fused into it (the hooks, _hooks.py) and closes the step (_bookkeeping.py). ``grad_norm``
runs the first of lomo-optim's two passes of exact global-norm clipping. ``step()`` is a no-op for
the parameters (they were updated inside the backward) that marks the step boundary; at an
optimizer's first ``step()`` the callbacks registered with ``at_first_step`` run (the Hugging
Face helper, lomo_kernels/hf.py, registers the one that finds a ``transformers.Trainer`` calling
the optimizer): the optimizer itself knows nothing of them.

With ``accumulation_steps=K > 1`` (_accumulation.py) a ``fused_backward`` accumulates, the K-th
one ends with ``step()``, and ``step()`` applies the window.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any, Callable, List, Optional

import torch

from .._checks import number

#: Called as ``callback(optimizer, frame)`` at each optimizer's first ``step()``, ``frame`` being
#: that ``step`` call's (its callers are ``frame.f_back``, ...).
FirstStepCallback = Callable[[Any, FrameType], None]
_FIRST_STEP: List[FirstStepCallback] = []


def at_first_step(callback: FirstStepCallback) -> FirstStepCallback:
    """Register ``callback`` to run at the first ``step()`` of every in-backward optimizer (once;
    usable as a decorator)."""
    if callback not in _FIRST_STEP:
        _FIRST_STEP.append(callback)
    return callback


class BackwardMixin:
    """``fused_backward``, ``grad_norm`` and ``step`` of ``InBackwardOptimizer``."""

    def fused_backward(self, loss: torch.Tensor, lr: Optional[float] = None) -> None:
        """Backward with the update fused into it. ``lr`` (if given) sets every group's lr.

        Everything is checked before the backward starts (the loss, ``lr``, every param group,
        the clipping set-up): an error there changes nothing."""
        self._require_attached()
        if lr is not None:
            number(lr, f"{self._name}: fused_backward lr", ge=0.0)
        self._prepare(loss)
        accumulating = self._window.enabled
        skip, self._skip_next = self._skip_next, False
        try:
            if accumulating:
                self._check_window_open()
            if not skip and not accumulating:
                self._check_clip(plain=False)
            if not skip:
                self._check_groups(lr)
        except BaseException:
            self._skip_next = skip
            raise
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = lr
        if not accumulating:
            self._token += 1
        self._mode = "skip" if skip else "update"
        self._in_fused = True
        self._n_updated = 0
        try:
            self._scaled(loss).backward()
        except BaseException as exc:
            self._drop_pending()  # (an error outside our hooks: they did not clean up)
            self._note_outside_failure(exc)
            raise
        finally:
            self._in_fused = False
            self._mode = "update"
            self._active_scale = 1.0
            self._active_tasks.clear()
        if accumulating:
            if self._window.count >= self._window.steps:
                self.step()  # the window's last micro-batch: apply it
            return
        if not skip:
            self._after_update()
        self.step()  # marks the step boundary (and tells LR schedulers a step was taken)

    def grad_norm(self, loss: torch.Tensor) -> torch.Tensor:
        """First of the two backward passes of global-norm clipping (lomo-optim's scheme).

        Computes the L2 norm of all (unscaled) gradients without changing any parameter, sets
        ``clip_coef = min(1, clip_grad_norm / (norm + 1e-6))`` for the following
        ``fused_backward`` and returns the norm (a 0-d tensor). If the norm is not finite the
        following ``fused_backward`` changes nothing (fp16: the loss scale is reduced).
        """
        self._prepare(loss)
        if self.clip_grad_norm is None:
            raise ValueError(f"{self._name}: grad_norm() needs clip_grad_norm to be set")
        if self._window.enabled:
            raise ValueError(
                f"{self._name}: grad_norm() is not needed with accumulation_steps="
                f"{self._window.steps}: step() clips the window exactly with the norm of the "
                "accumulated gradient (one backward per micro-batch)")
        self._check_groups()
        self._mode = "norm"
        self._grad_norms = []
        self._sharding.norms = []
        try:
            self._scaled(loss).backward(retain_graph=True)
        finally:
            self._mode = "update"
            self._active_scale = 1.0
            self._active_tasks.clear()
        return self._finish_norm_pass()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Marks the step boundary (the update happened inside backward); with
        ``accumulation_steps > 1``, applies the gradients accumulated since the last step."""
        self._require_attached()
        if closure is not None and not callable(closure):
            raise TypeError(f"{self._name}: step(closure): closure must be None or a callable "
                            f"that returns the loss, got {type(closure).__name__}")
        self._sharding.check_not_resharded(self.model, self._where)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "first-step" not in self._warned:
            self._warned.add("first-step")
            frame = sys._getframe()
            for callback in list(_FIRST_STEP):
                callback(self, frame)
        self._drop_pending()  # (only after a backward that failed outside our hooks)
        try:
            if self._window.enabled:
                self._apply_window()
        finally:
            self._began = False
            self._token += 1
            self._active_tasks.clear()  # step() runs outside any backward
            self._failed_tasks.clear()
        return loss
