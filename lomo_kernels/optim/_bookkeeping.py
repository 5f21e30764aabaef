"""Per-step bookkeeping: the gradient norm, the loss scale and the non-finite flags, with ONE host
look per step.

Every update adds its parameter's squared gradient norm to a per-device float32 accumulator
(zeroed when an updating backward starts: ``_start_grad_norm``). After the backward
``_after_update`` computes ``last_grad_norm`` on the device (the square root of the sum over
devices; ``_reduce_grad_sq`` is where a sharded optimizer sums over ranks), turns it into the next
step's ``clip_coef`` with ``clip_mode="previous"`` (_clipping.py), and reads the overflow flags,
the norm and the coefficient the step applied in one transfer (_batch.host_look): the non-finite
warning, the fp16 loss scaler and the clipping safety net (``GradNormSpikeWarning``,
``clip_spikes``) work from those values. The ``grad_norm`` pass (``norm`` mode) records each
gradient's norm instead (``_record_norm``) and ``_finish_norm_pass`` turns them into the
coefficient of the next updating backward.

Attributes owned here: ``last_grad_norm``, ``loss_scaler``, ``_found_inf``, ``_grad_norms``,
``_active_scale``, ``_skip_next``, ``_began``.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch

from .._stack import user_stacklevel
from . import _batch
from ._norm import fp32_norm
from .loss_scaler import DynamicLossScaler


class NonFiniteGradientWarning(RuntimeWarning):
    """A backward produced NaN/Inf gradients; the affected values were left unchanged."""


class BookkeepingMixin:
    """The per-step values of ``InBackwardOptimizer`` (see the module doc)."""

    def _init_bookkeeping(self) -> None:
        self.last_grad_norm: Optional[torch.Tensor] = None  # 0-d device tensor, after a backward
        self.loss_scaler: Optional[DynamicLossScaler] = None  # dynamic scaler (fp16 Lomo)
        self._active_scale = 1.0  # the loss scale of the backward running now
        self._skip_next = False
        self._grad_norms: List[torch.Tensor] = []
        self._found_inf: Dict[torch.device, torch.Tensor] = {}  # device -> 1-element flag
        self._began = False  # an updating backward has started (its accumulators are zeroed)

    # ------------------------------------------------------------------ the kernels' scalars
    def _device_flag(self, device: torch.device) -> torch.Tensor:
        t = self._found_inf.get(device)
        if t is None:
            t = self._found_inf[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return t

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss our backward differentiates; the hooks divide by the same scale. (A plain
        loss.backward() is not scaled, so its hooks divide by nothing.)"""
        s = self._active_scale = self._loss_scale()
        return loss * s if s != 1.0 else loss

    # ------------------------------------------------------------------ the grad_norm pass
    def _record_norm(self, g: torch.Tensor, shard: Optional[object]) -> None:
        """``norm`` mode: keep the unscaled norm of ``g`` (sharded: the local shard's, summed
        across the shard group by ``_finish_norm_pass``)."""
        n = fp32_norm(g)
        s = self._active_scale
        (self._grad_norms if shard is None else self._sharding.norms).append(
            n / s if s != 1.0 else n)

    def _finish_norm_pass(self) -> torch.Tensor:
        """After the ``grad_norm`` backward: the global norm, and the next update's clip
        coefficient (a non-finite norm: the next ``fused_backward`` changes nothing)."""
        norms = self._grad_norms
        self._grad_norms = []
        # summed across the shard group when sharded: every rank gets the same total
        total = self._sharding.total_norm(norms)
        if total is None:
            return torch.zeros((), dtype=torch.float32)
        self.last_grad_norm = total
        # One host look per step, after the backward: an overflow must skip the next update.
        if not bool(torch.isfinite(total)):
            self._skip_next = True
            if self.loss_scaler is not None:
                self.loss_scaler.update_scale(overflow=True)
            else:
                warnings.warn(
                    f"{self._name}: the gradient norm is {float(total)}; the next fused_backward "
                    "will not change any parameter",
                    NonFiniteGradientWarning,
                    stacklevel=user_stacklevel(),
                )
            return total
        self._set_clip_coef(self._clip_coef_from(total), fresh=True)
        return total

    # ------------------------------------------------------------------ after an updating backward
    def _start_grad_norm(self) -> None:
        """A new updating backward (checked): fresh accumulators."""
        self._buffers.zero_grad_sq()
        self._sharding.zero_grad_sq()
        self._began = True
        self._begin_clipping()

    def _main_device(self) -> torch.device:
        return next(iter(self._buffers.grad_sq))

    def _reduce_grad_sq(self, total: torch.Tensor) -> torch.Tensor:
        """The squared norm of the whole step from this process's ``total`` (the parameters it
        updates whole) plus the FSDP2 shards' parts summed across the shard group (one small
        all-reduce; every rank gets the same norm, hence the same next clip coefficient)."""
        if self._sharding.group is None:  # nothing sharded: no collective, no extra kernel
            return total
        return total + self._sharding.reduced_grad_sq(total.device)

    def _finish_grad_norm(self) -> torch.Tensor:
        """``last_grad_norm`` of the backward that just ended: the square root of the sum of the
        accumulators over devices (0 when no parameter got a gradient). No host sync."""
        dev = self._main_device()
        if self._began:
            total = self._buffers.total_grad_sq(dev)
        else:
            total = torch.zeros((), dtype=torch.float32, device=dev)
        self._began = False
        self.last_grad_norm = torch.sqrt(self._reduce_grad_sq(total))
        return self.last_grad_norm

    def _after_update(self, scaled: bool = True) -> bool:
        """After an updating backward: the step's gradient norm (``last_grad_norm``), the next
        clip coefficient (clip_mode "previous") and ONE host look at the overflow flags, the norm
        and the coefficient this step used. True if clean. The loss scaler only learns from the
        backwards it scaled (fused_backward)."""
        clipping = self.clip_grad_norm is not None
        used = self._applied_clip_coef()
        norm = self._finish_grad_norm()
        if clipping and self.clip_mode == "previous":
            self._next_clip_coef(norm)
        flags = list(self._found_inf.values())
        seen = _batch.host_look(flags + [norm] + ([used] if used is not None else []))
        for t in flags:
            t.zero_()
        if seen is None:  # the meta device: no values
            return True
        found = any(v != 0.0 for v in seen[:len(flags)])
        found = self._sharding.any_rank(found)  # every rank of a shard group skips/warns alike
        if not found and clipping and self.clip_mode == "previous":
            self._check_spike(seen[len(flags)], None if used is None else seen[-1])
        scaler = self.loss_scaler if scaled else None
        if found:
            if scaler is not None:
                scaler.update_scale(overflow=True)
            else:
                warnings.warn(
                    f"{self._name}: NaN/Inf gradients in this backward; the affected values were "
                    "left unchanged (see the lomo_kernels README, 'Non-finite gradients')",
                    NonFiniteGradientWarning,
                    stacklevel=user_stacklevel(),
                )
        elif scaler is not None:
            scaler.update_scale(overflow=False)
        return not found
