"""``Lomo``: fused SGD inside the backward (Lv et al. 2023, "Full Parameter Fine-tuning for Large
Language Models with Limited Resources"), a drop-in replacement for ``lomo_optim.Lomo``."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch

from .._stack import user_stacklevel
from ._base import InBackwardOptimizer, ParamsT
from ._batch import SMALL_NUMEL
from .loss_scaler import DynamicLossScaler


class Lomo(InBackwardOptimizer):
    """LOMO: ``p = p * (1 - lr * weight_decay) - lr * g``, fused into the backward pass
    (the math: docs/spec.md, "LOMO").

    Arguments, defaults and semantics as ``lomo_optim.Lomo`` 0.1.1:

    model: an ``nn.Module`` (its trainable parameters) or an iterable of parameters / param groups.
    lr: learning rate (default 1e-3), a finite number >= 0; read from ``param_groups`` at every
        update, so LR schedulers work; ``fused_backward(loss, lr)`` sets it for every group.
    clip_grad_norm: global L2-norm clipping, two backward passes: ``grad_norm(loss)`` then
        ``fused_backward(loss, lr)`` (each ``grad_norm`` clips the one backward after it; an
        updating backward without one is refused before anything changes). None (off) or > 0.
        With ``clip_mode="previous"``, one backward (docs/clipping.md).
    clip_grad_value: clamp every gradient element to ``[-v, v]``. None or 0: off; else > 0.
    weight_decay: decoupled weight decay (default 0), >= 0.
    loss_scale_args: arguments of the dynamic loss scaler (``DynamicLossScaler``: init_scale,
        scale_factor, scale_window, min_scale, delayed_shift, consecutive_hysteresis,
        raise_error_at_min_scale). The scaler is on when a trainable parameter is float16 (from
        construction) or the loss is float16 (from the first backward, as lomo-optim does); it
        scales the loss of ``fused_backward`` / ``grad_norm``. Its initial scale is 2**16 here
        (lomo-optim: 2**32, which wastes about 16 skipped steps). When it turns on and
        ``clip_grad_norm`` is None, ``clip_grad_norm`` becomes 1.0 (as lomo-optim does): overflow
        is found by the ``grad_norm`` pass, which must then run before every ``fused_backward``.

    Keyword-only (lomo_kernels): ``backend`` (one of ``lomo_kernels.ops.BACKENDS``; "auto"
    picks the fastest that runs on each parameter's device), ``rounding`` of bf16/fp16
    parameters (default None: "stochastic", unbiased, so updates below half an ulp survive in
    expectation, chosen by a fine-tuning study in docs/evidence.md; "nearest": lomo-optim's
    round-to-nearest; float32 parameters are stored exactly either way), ``seed`` (of stochastic rounding), ``clip_mode``
    ("exact": lomo-optim's two passes; "previous": each step clips with the coefficient of the
    previous step's norm, one backward), ``batch_small_params`` (True: parameters of at most
    ``SMALL_NUMEL`` = 65536 elements and 1-d parameters are updated together, one multi-tensor
    call per device and dtype at the end of the backward; results are bitwise the same),
    ``independent_ranks`` (default False: plain parameters while ``torch.distributed`` runs several
    ranks get an ``IndependentRanksWarning``, since nothing averages their gradients before the
    update; True: each rank trains its own parameters on purpose, e.g. a single-process reference
    inside a sharded job, or pipeline stages, and nothing is said).
    ``accumulation_steps`` (K, default 1): with K > 1, each backward adds its gradients into
    per-parameter buffers and ``step()`` (also called by the K-th ``fused_backward``) applies
    one update with their sum; exact ``clip_grad_norm`` then needs no ``grad_norm`` pass
    (docs/accumulation.md). ``accumulation_dtype``: ``"float32"`` (default, exact sums) or
    ``"param"`` (buffers of the parameter's dtype with stochastic rounding: half the memory for
    bf16/fp16 parameters).

    Parameters sharded by FSDP2 (``fully_shard``, applied before the optimizer is created) are
    updated shard by shard after the reduce-scatter, with the result of one process on the global
    batch (README, "Beyond one GPU"); ``DistributedDataParallel`` is refused.
    """

    _name = "Lomo"
    _op = "lomo_update_"
    _multi_op = "lomo_update_multi_"

    def __init__(
        self,
        model: ParamsT,
        lr: float = 1e-3,
        clip_grad_norm: Optional[float] = None,
        clip_grad_value: Optional[float] = None,
        weight_decay: float = 0.0,
        loss_scale_args: Optional[Dict[str, Any]] = None,
        *,
        backend: str = "auto",
        rounding: Optional[str] = None,
        seed: int = 0,
        clip_mode: str = "exact",
        batch_small_params: bool = True,
        independent_ranks: bool = False,
        accumulation_steps: int = 1,
        accumulation_dtype: str = "float32",
    ) -> None:
        if loss_scale_args is not None and not isinstance(loss_scale_args, dict):
            raise TypeError("Lomo: loss_scale_args must be None or a dict of DynamicLossScaler "
                            f"arguments, got {type(loss_scale_args).__name__}")
        self.loss_scale_args = dict(loss_scale_args or {})
        DynamicLossScaler.check_args(self.loss_scale_args, "Lomo: loss_scale_args")
        self._first_backward = True
        self._auto_clip = False  # clip_grad_norm turned on by the loss scaler, not by the user
        defaults = dict(lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value)
        super().__init__(
            model, defaults, clip_grad_norm=clip_grad_norm, backend=backend, rounding=rounding,
            seed=seed, clip_mode=clip_mode, batch_small_params=batch_small_params,
            independent_ranks=independent_ranks, accumulation_steps=accumulation_steps,
            accumulation_dtype=accumulation_dtype,
        )

    def _configure(self) -> None:
        if self._fp16:
            self._engage_loss_scaler("float16 parameters")

    def _engage_loss_scaler(self, why: str) -> None:
        self._first_backward = False
        if self.loss_scaler is not None:
            return
        self.loss_scaler = DynamicLossScaler(**self.loss_scale_args)
        msg = (f"Lomo: {why}: dynamic loss scaling is on for fused_backward / grad_norm "
               f"(initial scale {self.loss_scaler.loss_scale:g})")
        if self.clip_grad_norm is None:
            self.clip_grad_norm = 1.0
            self._auto_clip = True
            msg += ("; clip_grad_norm was None and is now 1.0, as lomo-optim does: call "
                    "optimizer.grad_norm(loss) before every optimizer.fused_backward(loss, lr) "
                    "(that pass finds overflows and skips the step), or pass clip_grad_norm "
                    "yourself to choose the threshold")
        warnings.warn(msg, UserWarning, stacklevel=user_stacklevel())

    def _prepare(self, loss) -> None:
        super()._prepare(loss)
        if self._first_backward:
            self._first_backward = False
            if loss.dtype == torch.float16:
                self._engage_loss_scaler("float16 loss")

    def _loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else self.loss_scaler.loss_scale

    def _repr_extra(self) -> Dict[str, Any]:
        extra = super()._repr_extra()
        if self.loss_scaler is not None:
            extra["loss_scale"] = self.loss_scaler.loss_scale
        return extra

    def _is_small(self, p: torch.Tensor) -> bool:
        return p.dim() <= 1 or p.numel() <= SMALL_NUMEL

    @staticmethod
    def _scalars(group: Dict[str, Any]) -> tuple:
        """(lr, weight_decay, clip_grad_value) of a param group, as the op takes them."""
        cgv = group["clip_grad_value"]
        return (float(group["lr"]), float(group["weight_decay"]),
                float(cgv) if cgv is not None and cgv > 0 else 0.0)

    def _update(self, p, g, group, state, seed) -> None:
        t = state.get("step", 0) + 1
        lr, wd, cgv = self._scalars(group)
        dev = p.device
        self._impl(dev)(
            p, g, self._clip_coef_on(dev), self._device_flag(dev), lr, wd, self._active_scale, cgv,
            self._rounding_for(p.dtype), seed, t, self._grad_sq(p), self._workspace(dev),
        )
        state["step"] = t

    def _update_multi(self, params, grads, groups, states, seeds) -> None:
        steps = [st.get("step", 0) + 1 for st in states]
        lr, wd, cgv = (list(v) for v in zip(*(self._scalars(g) for g in groups)))
        dev = params[0].device
        self._multi_impl(dev)(
            params, grads, self._clip_coef_on(dev), self._device_flag(dev), lr, wd,
            self._active_scale, cgv, self._rounding_for(params[0].dtype), seeds, steps, self._grad_sq(params[0]),
            self._workspace(dev),
        )
        for st, t in zip(states, steps):
            st["step"] = t

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["lomo_kernels"]["first_backward"] = self._first_backward
        sd["lomo_kernels"]["auto_clip"] = self._auto_clip
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # (checks it; works on a copy)
        extra = state_dict.get("lomo_kernels") or {}
        self._first_backward = extra.get("first_backward", self._first_backward)
        self._auto_clip = extra.get("auto_clip", self._auto_clip)
