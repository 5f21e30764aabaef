"""``InBackwardOptimizer``: the base of Lomo, AdaLomo and GoLore/GaLore (and of any other
in-backward optimizer). The contract is written out in docs/design.md ("In-backward optimizers").

One ``register_post_accumulate_grad_hook`` per trainable parameter. The hook fires once, after
every contribution to the parameter's gradient has been summed (so tied weights see their full
gradient), runs the fused update op in place and frees the gradient (``p.grad = None``). A hook
does O(1) work and never synchronises with the host: per-step scalars (clip coefficient, overflow
flag) are device tensors.

The class is assembled from one module per concern (each a mixin that documents the attributes it
owns; they share the optimizer's ``self``, so a subclass overrides one method and every concern
sees it):

    _base.py         this class: the constructor's checks and the subclasses' extension points
    _hooks.py        hook registration and ownership; the hook itself, which routes a gradient
    _kernels.py      per-device kernels, workspace and norm accumulator; one parameter's update
    _batch.py        the small parameters updated together at the end of the backward
    _bookkeeping.py  per step: gradient norm, loss scale, non-finite flags (one host look)
    _clipping.py     global-norm clipping: the coefficient each backward applies, the refusal of
                     a set-up that would not clip, the clip_mode="previous" safety net
    _failures.py     what a failed backward leaves behind (nothing but the updated parameters)
    _backward.py     lomo-optim's API: fused_backward, grad_norm, step (and first-step callbacks)
    _accumulation.py accumulation_steps > 1: gradients into buffers, the window applied in step()
                     (_window.py: the buffers and the window's position)
    _state.py        repr, state_dict, load_state_dict

Extension points (a subclass sets ``_name`` and ``_op`` and implements ``_update``; the rest have
defaults here): ``_update(p, g, group, state, seed)`` (passing ``self._grad_sq(p)`` and
``self._workspace(p.device)`` to its kernel), ``_update_multi(params, grads, groups, states,
seeds)`` with ``_multi_op`` and ``_is_small(p)`` (small-parameter batching),
``_update_sharded(p, g, group, state, seed, shard)`` and ``_sharded_state(shard)`` (FSDP2 shards;
``_shardable = False`` refuses them), ``_group_rules()`` (per-group value checks),
``_configure()`` (after the checks, before any hook), ``_clips_held_gradient()`` (exact clipping
without ``grad_norm``: gradient accumulation), ``_loss_scale()``, ``_prepare(loss)`` (before a
backward of ours) and ``_repr_extra()``. A subclass whose kernel
cannot add the squared norm (``_kernel_adds_grad_sq`` False, the default for ops other than LOMO's
and AdaLomo's) has it added by the base with one torch reduction of ``g``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch.optim import Optimizer

from .. import ops
from .._checks import choice, integer, number
from . import _distributed, _sharding
from ._accumulation import AccumulationMixin
from ._backward import BackwardMixin
from ._batch import BatchingMixin
from ._bookkeeping import BookkeepingMixin, NonFiniteGradientWarning
from ._clipping import ClippingMixin, GradNormSpikeWarning
from ._failures import FailuresMixin
from ._guards import compiled_autograd_active, compiled_autograd_configured, compiled_autograd_message
from ._hooks import HooksMixin
from ._kernels import KernelsMixin
from ._state import StateMixin
from ._window import check_accumulation_dtype

__all__ = ["InBackwardOptimizer", "ParamsT", "NonFiniteGradientWarning", "GradNormSpikeWarning",
           "CLIP_MODES"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
CLIP_MODES = ("exact", "previous")
#: What an optimizer accepts as ``model``.
ParamsT = Union[
    torch.nn.Module,
    Iterable[torch.Tensor],
    Iterable[Dict[str, Any]],
    Iterable[Tuple[str, torch.Tensor]],
]


class InBackwardOptimizer(BackwardMixin, HooksMixin, KernelsMixin, BatchingMixin,
                          BookkeepingMixin, ClippingMixin, FailuresMixin, AccumulationMixin,
                          StateMixin, Optimizer):
    """Base class of the in-backward optimizers (see the module docstring)."""

    _name = "InBackwardOptimizer"
    _op = ""
    _shardable = True  # its update works on FSDP2 shards (_update_sharded)
    _multi_op = ""  # the multi-tensor op of the small parameters ("": none, no batching)

    def __init__(self, model: ParamsT, defaults: Dict[str, Any], *, clip_grad_norm: Optional[float],
                 backend: str, rounding: Optional[str], seed: int, clip_mode: str = "exact",
                 batch_small_params: bool = True, independent_ranks: bool = False,
                 accumulation_steps: int = 1,
                 accumulation_dtype: Union[str, torch.dtype] = "float32") -> None:
        name = self._name
        if not isinstance(independent_ranks, bool):
            raise TypeError(f"{name}: independent_ranks must be True or False, got "
                            f"{independent_ranks!r}")
        # FSDP2-sharded parameters and the refusal of unsynchronised replicas (_sharding.py)
        self._sharding = _sharding.Sharding(name, independent_ranks)
        self._init_hooks()
        self.backend = choice(backend, f"{name}: backend", ops.BACKENDS)
        # None (the default): stochastic, which only 16-bit parameters use (_rounding_for)
        self.rounding = choice("stochastic" if rounding is None else rounding,
                               f"{name}: rounding", ops.ROUNDINGS)
        self.seed = integer(seed, f"{name}: seed")
        self.clip_grad_norm = number(clip_grad_norm, f"{name}: clip_grad_norm", gt=0.0,
                                     none_ok=True)
        self.clip_mode = choice(clip_mode, f"{name}: clip_mode", CLIP_MODES)
        if clip_mode == "previous" and clip_grad_norm is None:
            raise ValueError(f"{name}: clip_mode='previous' clips with clip_grad_norm, which is "
                             "None; pass clip_grad_norm (e.g. 1.0)")
        if not isinstance(batch_small_params, bool):
            raise TypeError(f"{name}: batch_small_params must be True or False, got "
                            f"{batch_small_params!r}")
        self.batch_small_params = batch_small_params
        self._init_accumulation(integer(accumulation_steps, f"{name}: accumulation_steps", ge=1),
                                check_accumulation_dtype(accumulation_dtype,
                                                   f"{name}: accumulation_dtype"))
        self._check_group(defaults, "")
        if compiled_autograd_active() or compiled_autograd_configured():
            raise RuntimeError(compiled_autograd_message(name))
        self._sharding.check_model(model)
        params, self._names = self._collect(model)
        self.model = model if isinstance(model, torch.nn.Module) else None  # as lomo-optim
        self._init_bookkeeping()
        self._init_clipping()
        self._init_backward()
        self._init_kernels()
        self._init_batching()
        self._warned: set = set()  # once-per-optimizer warnings already given
        super().__init__(params, defaults)  # add_param_group checks every group and parameter
        trainable = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]
                     if p.requires_grad]
        if not trainable:
            raise ValueError(f"{name}: no trainable parameters (all have requires_grad=False)")
        if rounding == "stochastic" and not any(p.dtype in _LOW_PRECISION for _, p in trainable):
            raise ValueError(
                f"{name}: rounding='stochastic' applies to float16/bfloat16 parameters, and every "
                "trainable parameter here is float32 (stored exactly, nothing to round); leave "
                "rounding at its default (None)"
            )
        self._fp16 = any(p.dtype == torch.float16 for _, p in trainable)
        self._configure()
        self._attach(trainable)
        self._ready = True

    def _rounding_for(self, dtype: torch.dtype) -> str:
        """The rounding of an update of a ``dtype`` tensor: ``self.rounding`` for 16-bit
        tensors; float32 results are stored exactly ("nearest" keeps the kernels' fast path)."""
        return self.rounding if dtype in _LOW_PRECISION else "nearest"

    # ------------------------------------------------------------------ arguments
    def _collect(self, model: Any) -> Tuple[list, Dict[torch.Tensor, str]]:
        """The parameters (or groups) to pass to ``Optimizer`` and the names we know."""
        accepts = ("model must be an nn.Module, an iterable of parameters or an iterable of "
                   "param-group dicts")
        if isinstance(model, torch.nn.Module):
            named = list(model.named_parameters())
            params = [p for _, p in named if p.requires_grad]
            if not params:
                raise ValueError(f"{self._name}: no trainable parameters in the "
                                 f"{type(model).__name__} (all have requires_grad=False)")
            return params, {p: n for n, p in named}
        if isinstance(model, torch.Tensor):
            raise TypeError(f"{self._name}: {accepts}, got a single tensor (pass [tensor])")
        if isinstance(model, (str, bytes, dict)) or not isinstance(model, Iterable):
            raise TypeError(f"{self._name}: {accepts}, got {type(model).__name__}")
        items = list(model)
        if not items:
            raise ValueError(f"{self._name}: {accepts}, got an empty iterable")
        for item in items:
            ok = isinstance(item, (torch.Tensor, dict)) or (
                isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor))
            if not ok:
                raise TypeError(f"{self._name}: {accepts}; one element is a "
                                f"{type(item).__name__}")
        return items, {}

    def _check_group(self, group: Dict[str, Any], where: str) -> None:
        """Check every known value of a param group (``where``: "" for the constructor's
        arguments, else ``param_groups[i]``)."""
        prefix = f"{self._name}: {where}" if where else f"{self._name}: "
        for key, check in self._group_rules().items():
            if key in group:
                check(group[key], f"{prefix}['{key}']" if where else f"{prefix}{key}")

    def _check_groups(self, lr: Any = None) -> None:
        """Check every param group as the next update will see it (with ``lr`` if given)."""
        for i, group in enumerate(self.param_groups):
            self._check_group(group if lr is None else {**group, "lr": lr}, f"param_groups[{i}]")

    def _pname(self, p: torch.Tensor) -> str:
        return self._names.get(p, "?")

    # ------------------------------------------------------------------ extension points
    def _group_rules(self) -> Dict[str, Callable[[Any, str], Any]]:
        """Checks of the per-group values: key -> check(value, name). Subclasses extend it."""
        return {
            "lr": lambda v, n: number(v, n, ge=0.0),
            "weight_decay": lambda v, n: number(v, n, ge=0.0),
            "clip_grad_value": lambda v, n: number(v, n, ge=0.0, none_ok=True,
                                                   none_means="off; 0 is off too"),
        }

    def _configure(self) -> None:
        """Runs once every group is checked, before any hook is registered."""

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: Dict[str, Any],
                state: Dict[str, Any], seed: int) -> None:
        """Update ``p`` in place from ``g``. Entries of ``state`` are restored if this raises."""
        raise NotImplementedError

    def _is_small(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is updated with the other small parameters by ``_multi_op``."""
        return False

    def _update_multi(self, params: List[torch.Tensor], grads: List[torch.Tensor],
                      groups: List[Dict[str, Any]], states: List[Dict[str, Any]],
                      seeds: List[int]) -> None:
        """Update the small ``params`` (one device and dtype) with ONE call of ``_multi_op``,
        each exactly as ``_update`` would. Entries of ``states`` are restored if this raises."""
        raise NotImplementedError

    def _update_sharded(self, p: torch.Tensor, g: torch.Tensor, group: Dict[str, Any],
                        state: Dict[str, Any], seed: int, shard: "_distributed.ShardInfo") -> None:
        """Update the local shard ``p`` of a parameter sharded on dim 0 (FSDP2) from its gradient
        shard ``g``. An elementwise update (LOMO) runs on the shard unchanged; an optimizer with
        statistics over the whole parameter overrides this."""
        self._update(p, g, group, state, seed)

    def _sharded_state(self, shard: "_distributed.ShardInfo") -> Dict[str, Any]:
        """The state of a sharded parameter before its first update (DTensors where it holds
        tensors, for torch.distributed.checkpoint)."""
        return {"step": 0}

    def _loss_scale(self) -> float:
        """The loss scale of the next backward of ours (fused_backward, grad_norm)."""
        return 1.0

    def _prepare(self, loss: torch.Tensor) -> None:
        """Checks before a backward of ours (subclasses add fp16 handling)."""
        self._require_attached()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{self._name}: loss must be a tensor, got {type(loss).__name__}")
        if not loss.is_floating_point():
            raise TypeError(f"{self._name}: loss must be a floating-point tensor, got {loss.dtype}")
        if loss.numel() != 1:
            raise ValueError(f"{self._name}: loss must be a scalar, got shape {tuple(loss.shape)}")
        if compiled_autograd_active():
            raise RuntimeError(compiled_autograd_message(self._name))
        self._sharding.check_not_resharded(self.model, self._where)
        self._sharding.check_world()

    def _repr_extra(self) -> Dict[str, Any]:
        """Values shown by ``repr`` after the param-group defaults (subclasses extend it)."""
        extra: Dict[str, Any] = {"clip_grad_norm": self.clip_grad_norm}
        if self.clip_mode != "exact":
            extra["clip_mode"] = self.clip_mode
        if not self.batch_small_params:
            extra["batch_small_params"] = False
        if self._window.enabled:
            extra["accumulation_steps"] = self._window.steps
            if self._window.dtype != "float32":
                extra["accumulation_dtype"] = self._window.dtype
        return extra

    @staticmethod
    def _beta(step: int, decay_rate: float) -> float:
        # lomo-optim: "To avoid math errors for edge cases"
        decay = -decay_rate if (step == 0 and decay_rate < 0) else decay_rate
        return 1.0 - math.pow(step, decay)

