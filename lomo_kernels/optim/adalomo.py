"""``AdaLomo``: LOMO with Adafactor-style factored second moments and grouped update
normalisation (Lv et al. 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"),
a drop-in replacement for ``lomo_optim.AdaLomo``."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .. import ops
from .._checks import eps_pair, number
from . import _distributed
from ._base import InBackwardOptimizer, ParamsT


class AdaLomo(InBackwardOptimizer):
    """AdaLomo, fused into the backward pass (the math: docs/spec.md, "AdaLomo").

    Arguments, defaults and semantics as ``lomo_optim.AdaLomo`` 0.1.1:

    model: an ``nn.Module`` (its trainable parameters) or an iterable of parameters / param groups.
    lr: learning rate (default 1e-3), relative: scaled by ``max(eps[1], rms(p))``; read from
        ``param_groups`` at every update. A finite number >= 0.
    loss_scale: static loss scale (default 2**10) used by ``fused_backward`` and ``grad_norm``:
        the loss is multiplied by it, the gradient divided. 0 or None: off. Else finite > 0.
    eps: ``(eps1, eps2)`` = (1e-30, 1e-3), finite, >= 0: added to ``g*g``; the floor of the
        parameter RMS.
    clip_threshold: grouped update normalisation threshold on ``rms(u)`` (default 1.0), > 0.
    decay_rate: second-moment decay exponent, ``beta_t = 1 - t ** decay_rate`` (default -0.8),
        <= 0.
    clip_grad_norm: global L2-norm clipping via ``grad_norm(loss)`` before every
        ``fused_backward`` (lomo-optim trains unclipped without it, silently; here an updating
        backward without a ``grad_norm`` before it is refused before anything changes, as
        ``Lomo`` does). None (off) or > 0. With ``clip_mode="previous"``: one backward
        (docs/clipping.md).
    clip_grad_value: clamp every gradient element to ``[-v, v]``. None or 0: off; else > 0.
    weight_decay: decoupled weight decay, scaled by the relative step size (default 0), >= 0.

    Keyword-only (lomo_kernels): ``backend``, ``rounding``, ``seed``, ``clip_mode``,
    ``independent_ranks`` as in ``Lomo``; FSDP2-sharded parameters as in ``Lomo`` (the statistics
    that span shards are all-reduced between the three passes of the update);
    ``batch_small_params`` (True: 0-d and 1-d parameters are updated together, one multi-tensor
    call per device and dtype at the end of the backward; bitwise the same results).
    ``accumulation_steps`` (K, default 1): with K > 1, each backward adds its gradients into
    per-parameter buffers and ``step()`` (also called by the K-th ``fused_backward``) applies
    one update with their sum; exact ``clip_grad_norm`` then needs no ``grad_norm`` pass
    (docs/accumulation.md). ``accumulation_dtype``: ``"float32"`` (default, exact sums) or
    ``"param"`` (buffers of the parameter's dtype with stochastic rounding: half the memory for
    bf16/fp16 parameters).

    State per parameter (``self.state[p]``): ``step`` (t), and float32 ``exp_avg_sq_row`` and
    ``exp_avg_sq_col`` (parameters of 2 or more dimensions, factored over the last two) or
    ``exp_avg_sq`` (0-d and 1-d parameters); DTensors for sharded parameters (from construction).
    """

    _name = "AdaLomo"
    _op = "adalomo_update_"
    _multi_op = "adalomo_update_multi_"

    def _group_rules(self) -> Dict[str, Callable[[Any, str], Any]]:
        return {
            **super()._group_rules(),
            "eps": eps_pair,
            "clip_threshold": lambda v, n: number(v, n, gt=0.0),
            "decay_rate": lambda v, n: number(v, n, le=0.0),
        }

    def __init__(
        self,
        model: ParamsT,
        lr: float = 1e-3,
        loss_scale: Optional[float] = 2**10,
        eps: Tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        clip_grad_norm: Optional[float] = None,
        clip_grad_value: Optional[float] = None,
        weight_decay: float = 0.0,
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
        number(loss_scale, "AdaLomo: loss_scale", ge=0.0, none_ok=True,
               none_means="off; 0 is off too")
        self.loss_scale = loss_scale
        defaults = dict(
            lr=lr, eps=eps_pair(eps, "AdaLomo: eps"), clip_threshold=clip_threshold,
            decay_rate=decay_rate, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
        )
        super().__init__(
            model, defaults, clip_grad_norm=clip_grad_norm, backend=backend, rounding=rounding,
            seed=seed, clip_mode=clip_mode, batch_small_params=batch_small_params,
            independent_ranks=independent_ranks, accumulation_steps=accumulation_steps,
            accumulation_dtype=accumulation_dtype,
        )

    def _repr_extra(self) -> Dict[str, Any]:
        return {"loss_scale": self.loss_scale, **super()._repr_extra()}

    def _loss_scale(self) -> float:
        return float(self.loss_scale) if self.loss_scale else 1.0

    def _is_small(self, p: torch.Tensor) -> bool:
        return p.dim() <= 1  # the multi-tensor op takes unfactored parameters only

    @staticmethod
    def _init_state(p: torch.Tensor, state: Dict[str, Any]) -> None:
        if not state:
            state["step"] = 0
            for name, shape in ops.adalomo_state_shapes(p.shape).items():
                state[name] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _scalars(self, group: Dict[str, Any], t: int) -> tuple:
        """(lr, weight_decay, clip_grad_value, beta, eps1, eps2, clip_threshold) at step t."""
        eps1, eps2 = group["eps"]
        cgv = group["clip_grad_value"]
        return (float(group["lr"]), float(group["weight_decay"]),
                float(cgv) if cgv is not None and cgv > 0 else 0.0,
                self._beta(t, group["decay_rate"]), float(eps1), float(eps2),
                float(group["clip_threshold"]))

    def _op_args(self, p, g, group, state, seed, t) -> tuple:
        """The adalomo_update_ arguments up to ``step``."""
        lr, wd, cgv, beta, eps1, eps2, ct = self._scalars(group, t)
        dev = p.device
        return (
            p, g, state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"),
            state.get("exp_avg_sq"), self._clip_coef_on(dev), self._device_flag(dev), lr, wd,
            self._active_scale, cgv, beta, eps1, eps2, ct, self._rounding_for(p.dtype), seed, t,
        )

    def _update(self, p, g, group, state, seed) -> None:
        self._init_state(p, state)
        t = state["step"] + 1
        self._impl(p.device)(*self._op_args(p, g, group, state, seed, t), self._grad_sq(p),
                             self._workspace(p.device))
        state["step"] = t

    def _update_multi(self, params, grads, groups, states, seeds) -> None:
        for p, st in zip(params, states):
            self._init_state(p, st)
        steps = [st["step"] + 1 for st in states]
        lr, wd, cgv, beta, eps1, eps2, ct = (
            list(v) for v in zip(*(self._scalars(g, t) for g, t in zip(groups, steps))))
        dev = params[0].device
        self._multi_impl(dev)(
            params, grads, [st["exp_avg_sq"] for st in states], self._clip_coef_on(dev),
            self._device_flag(dev), lr, wd, self._active_scale, cgv, beta, eps1, eps2, ct,
            self._rounding_for(params[0].dtype), seeds, steps, self._grad_sq(params[0]), self._workspace(dev),
        )
        for st, t in zip(states, steps):
            st["step"] = t

    def _update_sharded(self, p, g, group, state, seed, shard) -> None:
        # The staged op with the workspace header all-reduced between the stages; the state
        # holds DTensors, the op their local shards (_distributed.py). The shard's gradient norm
        # is added by the base class (summed across ranks there).
        t = state["step"] + 1
        ws, pack = self._sharding.workspace(p.device)
        _distributed.adalomo_staged(
            self._staged_impl(p.device),
            self._op_args(p, g, group, _distributed.locals_of(state), seed, t), shard, ws, pack)
        state["step"] = t

    def _staged_impl(self, device):
        """The backend's staged op; with backend="auto", the reference when the backend has no
        stages (yet), said once. Checked at the first sharded update, before anything changes."""
        impl = self._staged_impls.get(device)
        if impl is None:
            impl = self._impl(device)
            backend = self._resolve_backend(device, "?")
            why = _distributed.staged_support(impl, backend, device)
            if why is not None:
                if self.backend != "auto":
                    raise RuntimeError(
                        f"AdaLomo: backend {self.backend!r} cannot update parameters sharded by "
                        f"fully_shard on {device} ({why}); use backend='auto' or 'torch'")
                self._warn_once(
                    f"staged-{device}",
                    f"AdaLomo: the {backend} backend has no staged update (sharded parameters) "
                    f"on {device} yet ({why}); sharded parameters use the pure-PyTorch reference",
                    ops.BackendFallbackWarning)
                impl = ops.get_impl(self._op, "torch", device)
            self._staged_impls[device] = impl
        return impl

    def _configure(self) -> None:
        self._staged_impls: Dict[torch.device, Callable] = {}  # device -> staged op (sharded)

    def _sharded_state(self, shard) -> Dict[str, Any]:
        return _distributed.adalomo_state(shard)
