"""Global-norm clipping: which coefficient each updating backward applies, the refusal of a
clipping set-up that would silently not clip, and the safety net of ``clip_mode="previous"``.

``clip_mode="exact"`` (lomo-optim's two passes): ``grad_norm(loss)`` measures the norm and sets
``clip_coef``; the NEXT updating backward (``fused_backward`` or a plain ``loss.backward()``)
applies it, and only that one (a coefficient is never reused for another batch). An updating
backward without a fresh coefficient is refused before anything changes (``_check_clip``), for
every optimizer and both backward paths, with a message that names the ways to clip: two passes,
``clip_mode="previous"``, gradient accumulation. (Exception: the norm clipping that Lomo's float16
loss scaler turns on by itself, as lomo-optim does, does not apply to a plain backward, which is
not scaled.) An optimizer that holds the whole gradient before its update (gradient
accumulation) clips exactly without ``grad_norm``: it overrides ``_clips_held_gradient``.

``clip_mode="previous"`` (one backward): each step applies the coefficient computed from the
previous step's norm (_bookkeeping.py computes it on the device after the backward). The first
step has none and is not clipped (unless ``grad_norm`` ran before it). The safety net flags a step
whose applied update norm, ``norm_t * clip_coef_t``, exceeds ``clip_spike_factor`` (default 10)
times ``clip_grad_norm``: a ``GradNormSpikeWarning`` and ``clip_spikes += 1``. Equivalently
``norm_t / max(norm_{t-1}, clip_grad_norm) > clip_spike_factor``: the gradient jumped more than
that factor above both the norm its coefficient came from and the threshold. Healthy runs stay far
below it (bench/spike_warning.py measures them, docs/clipping.md has the numbers); the first step
is never flagged (there is nothing to compare it with).

Attributes owned here: ``clip_coef``, ``clip_spikes``, ``clip_spike_factor`` (checked when set),
``_clip_coefs``, ``_clip_fresh``, ``_clip_applies``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .._checks import number
from .._stack import user_stacklevel


class GradNormSpikeWarning(RuntimeWarning):
    """``clip_mode="previous"``: a step's gradient, clipped with the previous step's coefficient,
    had a norm above ``clip_spike_factor * clip_grad_norm`` (counted in ``clip_spikes``)."""


#: The ways to clip with the global gradient norm, named by every clipping message.
ALTERNATIVES = (
    "optimizer.grad_norm(loss) then optimizer.fused_backward(loss, lr) every step (exact, two "
    "backward passes); clip_mode='previous' (one backward, also a plain loss.backward() as in "
    "transformers.Trainer: each step is clipped with the previous step's gradient norm); "
    "gradient accumulation with accumulation_steps=K > 1 (exact, no grad_norm call: the "
    "optimizer holds the whole accumulated gradient before the update)"
)


def exact_clip_message(name: str, clip: float, plain: bool, auto: bool = False) -> str:
    """The refusal of an updating backward that ``clip_mode="exact"`` cannot clip."""
    why = (" (turned on at 1.0 by the float16 loss scaler, as lomo-optim does: its grad_norm pass "
           "also finds overflows)" if auto else "")
    if plain:
        what = ("a plain loss.backward() cannot do global-norm clipping: the update happens "
                "inside the backward, before the norm of the whole gradient is known, and no "
                "optimizer.grad_norm(loss) ran before it")
    else:
        what = ("clip_coef is None for this step: no optimizer.grad_norm(loss) ran since the last "
                "update (each grad_norm call clips the one backward that follows it); please call "
                "optimizer.grad_norm(loss) before optimizer.fused_backward(loss, lr)")
    return (f"{name}: clip_grad_norm={clip:g}{why} with clip_mode='exact', but {what}. This "
            f"backward would train unclipped, so it was refused before any parameter changed. "
            f"Ways to clip: {ALTERNATIVES}. Or use clip_grad_value (element-wise), or "
            "clip_grad_norm=None (no clipping).")


class ClippingMixin:
    """The clip coefficient of each updating backward of ``InBackwardOptimizer`` (module doc)."""

    #: The default of ``clip_spike_factor`` (bench/spike_warning.py measured the margins).
    CLIP_SPIKE_FACTOR = 10.0

    @property
    def clip_spike_factor(self) -> float:
        """clip_mode="previous": a step whose applied update norm exceeds this many times
        clip_grad_norm is flagged (GradNormSpikeWarning, clip_spikes). May be set any time to a
        finite number >= 1 (1: every step clipped less than exact clipping would is flagged)."""
        return self.__dict__.get("_clip_spike_factor", self.CLIP_SPIKE_FACTOR)

    @clip_spike_factor.setter
    def clip_spike_factor(self, value: float) -> None:
        self._clip_spike_factor = number(value, f"{self._name}: clip_spike_factor", ge=1.0)

    def _init_clipping(self) -> None:
        self.clip_coef: Optional[torch.Tensor] = None  # 0-d float32 device tensor, once computed
        self.clip_spikes = 0  # steps flagged by the clip_mode="previous" safety net
        self._clip_coefs: dict = {}  # device -> clip_coef there
        self._clip_fresh = False  # exact: grad_norm() set clip_coef for the next updating backward
        self._clip_applies = False  # the updating backward running now applies clip_coef

    # ------------------------------------------------------------------ extension point
    def _clips_held_gradient(self) -> bool:
        """True when this optimizer clips exactly without ``grad_norm``: it holds the whole
        gradient of the step before it updates (gradient accumulation overrides this)."""
        return False

    # ------------------------------------------------------------------ before a backward
    def _check_clip(self, plain: bool) -> None:
        """Before an updating backward (``plain``: a loss.backward() we did not start): refuse a
        clipping set-up that cannot clip this step (module doc). Nothing has changed yet."""
        if (self.clip_grad_norm is None or self.clip_mode != "exact" or self._clip_fresh
                or self._clips_held_gradient()):
            return
        auto = getattr(self, "_auto_clip", False)  # Lomo's float16 loss scaler turned it on
        if plain and auto:
            return  # a plain backward is not scaled: the scaler's own clipping does not apply
        raise ValueError(exact_clip_message(self._name, self.clip_grad_norm, plain, auto))

    def _begin_clipping(self) -> None:
        """An updating backward starts (checked): exact mode uses up grad_norm's coefficient."""
        if self.clip_mode == "exact":
            self._clip_applies, self._clip_fresh = self._clip_fresh, False
        else:
            self._clip_applies = self.clip_coef is not None

    def _clip_coef_on(self, device: torch.device) -> Optional[torch.Tensor]:
        """The coefficient this backward applies, on ``device`` (None: no clipping)."""
        if not self._clip_applies or self.clip_coef is None or self.clip_grad_norm is None:
            return None
        t = self._clip_coefs.get(device)
        if t is None:
            t = self._clip_coefs[device] = self.clip_coef.to(device)
        return t

    def _applied_clip_coef(self) -> Optional[torch.Tensor]:
        """The coefficient the updating backward that just ended applied (None: none)."""
        if self.clip_grad_norm is None or not self._clip_applies or not self._began:
            return None  # (not _began: no gradient reached our hooks, nothing was updated)
        return self.clip_coef

    # ------------------------------------------------------------------ coefficients
    def _clip_coef_from(self, norm: torch.Tensor) -> torch.Tensor:
        """lomo-optim's coefficient: ``min(1, clip_grad_norm / (norm + 1e-6))``, on the device."""
        return torch.clamp(float(self.clip_grad_norm) / (norm + 1e-6), max=1.0)

    def _set_clip_coef(self, coef: torch.Tensor, fresh: bool = False) -> None:
        """``fresh``: from a grad_norm pass, for the next updating backward (exact mode)."""
        self.clip_coef = coef
        self._clip_coefs = {coef.device: coef}
        self._clip_fresh = fresh

    def _next_clip_coef(self, norm: torch.Tensor) -> None:
        """clip_mode="previous", after an updating backward: the next step's coefficient from this
        step's norm, on the device (a non-finite norm keeps the last finite coefficient)."""
        keep = self.clip_coef.to(norm.device) if self.clip_coef is not None else 1.0
        self._set_clip_coef(torch.where(torch.isfinite(norm), self._clip_coef_from(norm), keep))

    # ------------------------------------------------------------------ the safety net
    def _check_spike(self, norm: float, coef: Optional[float]) -> None:
        """clip_mode="previous", from values the host look already has: ``norm`` of this step's
        gradient, ``coef`` the coefficient it applied (None: none yet, the first step)."""
        if coef is None:
            return  # the first step: nothing to compare with (docs/clipping.md)
        applied = norm * coef
        clip = float(self.clip_grad_norm)
        if not (math.isfinite(applied) and applied > self.clip_spike_factor * clip):
            return
        self.clip_spikes += 1
        warnings.warn(
            f"{self._name}: clip_mode='previous': this step's gradient norm was {norm:.4g}; "
            f"clipped with the previous step's coefficient ({coef:.4g}) the update applied had "
            f"norm {applied:.4g}, {applied / clip:.1f}x clip_grad_norm={clip:g} (flagged above "
            f"clip_spike_factor={self.clip_spike_factor:g}; {self.clip_spikes} step(s) so far: "
            "optimizer.clip_spikes; the next step is clipped with this step's norm). Where such a "
            "step matters, clip exactly: optimizer.grad_norm(loss) then "
            "optimizer.fused_backward(loss, lr) (two backward passes), or gradient accumulation "
            "with accumulation_steps=K > 1 (no grad_norm call).",
            GradNormSpikeWarning,
            stacklevel=user_stacklevel(),
        )
