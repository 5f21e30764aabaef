"""``Lomo``: fused SGD inside the backward (Lv et al. 2023, "Full Parameter Fine-tuning for Large
Language Models with Limited Resources"), a drop-in replacement for ``lomo_optim.Lomo``."""

from __future__ import annotations

import logging

import torch

from ._base import InBackwardOptimizer
from .loss_scaler import DynamicLossScaler

logger = logging.getLogger("lomo_kernels")


class Lomo(InBackwardOptimizer):
    """LOMO: ``p = p * (1 - lr * weight_decay) - lr * g``, fused into the backward pass.

    Arguments, defaults and semantics as ``lomo_optim.Lomo`` 0.1.1:

    model: an ``nn.Module`` (its trainable parameters) or an iterable of parameters / param groups.
    lr: learning rate (default 1e-3); read from ``param_groups`` at every update, so LR schedulers
        work; ``fused_backward(loss, lr)`` sets it for every group.
    clip_grad_norm: global L2-norm clipping, two backward passes: ``grad_norm(loss)`` then
        ``fused_backward(loss, lr)``. Must be positive. None: off.
    clip_grad_value: clamp every gradient element to ``[-v, v]``. None or <= 0: off.
    weight_decay: decoupled weight decay (default 0).
    loss_scale_args: arguments of the dynamic loss scaler, created when the loss is fp16 (which
        also turns ``clip_grad_norm`` on at 1.0 when it is None, as lomo-optim does).

    Keyword-only (lomo_kernels): ``backend`` ("auto" | "native" | "triton" | "torch"),
    ``rounding`` ("nearest" | "stochastic" for bf16/fp16 parameters), ``seed`` (of stochastic
    rounding).
    """

    _name = "Lomo"
    _op = "lomo_update_"

    def __init__(
        self,
        model,
        lr=1e-3,
        clip_grad_norm=None,
        clip_grad_value=None,
        weight_decay=0.0,
        loss_scale_args=None,
        *,
        backend="auto",
        rounding="nearest",
        seed=0,
    ):
        self.loss_scale_args = dict(loss_scale_args or {})
        self._first_backward = True
        defaults = dict(lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value)
        super().__init__(
            model, defaults, clip_grad_norm=clip_grad_norm, backend=backend, rounding=rounding,
            seed=seed,
        )

    def _prepare(self, loss) -> None:
        super()._prepare(loss)
        if self._first_backward:
            self._first_backward = False
            if loss.dtype == torch.float16:
                self.loss_scaler = DynamicLossScaler(**self.loss_scale_args)
                if self.clip_grad_norm is None:
                    self.clip_grad_norm = 1.0
                    logger.warning(
                        "Loss scale is recommended to be used with grad norm to get better "
                        "performance. Set grad norm to 1.0."
                    )

    def _loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else self.loss_scaler.loss_scale

    def _check_clip(self, plain: bool) -> None:
        if self.clip_grad_norm is not None and self.clip_coef is None:
            if plain:
                raise ValueError(
                    "Lomo: clip_grad_norm is set, but a plain loss.backward() cannot do global-norm "
                    "clipping (it needs two backward passes: optimizer.grad_norm(loss), then "
                    "optimizer.fused_backward(loss, lr)). Use clip_grad_value, or drop "
                    "clip_grad_norm, when the training loop (e.g. transformers.Trainer) calls "
                    "backward itself."
                )
            raise ValueError(
                "clip_grad_norm is not None, but clip_coef is None. "
                "Please call optimizer.grad_norm() before optimizer.fused_backward()."
            )

    def _update(self, p, g, group, state, seed) -> None:
        state["step"] = state.get("step", 0) + 1
        cgv = group["clip_grad_value"]
        self._impl(p.device)(
            p, g, self._clip_coef_on(p.device), self._device_flag(p.device), float(group["lr"]),
            float(group["weight_decay"]), self._active_scale,
            float(cgv) if cgv is not None and cgv > 0 else 0.0, self.rounding, seed, state["step"],
        )

    def state_dict(self):
        sd = super().state_dict()
        sd["lomo_kernels"]["first_backward"] = self._first_backward
        return sd

    def load_state_dict(self, state_dict):
        extra = state_dict.get("lomo_kernels") or {}
        self._first_backward = extra.get("first_backward", self._first_backward)
        super().load_state_dict(state_dict)
