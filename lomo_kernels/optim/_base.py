"""The machinery Lomo and AdaLomo (and any other in-backward optimizer) share: in-backward updates
from post-accumulate-grad hooks, with one owner per parameter and failures that leave nothing
behind. The contract is written out in docs/design.md ("In-backward optimizers").

One ``register_post_accumulate_grad_hook`` per trainable parameter. The hook fires once, after
every contribution to the parameter's gradient has been summed (so tied weights see their full
gradient), runs the fused update op in place and frees the gradient (``p.grad = None``). A hook
does O(1) work and never synchronises with the host: per-step scalars (clip coefficient, overflow
flag) are device tensors.

A backward runs in one of three modes: ``update`` (the default: ``fused_backward`` or a plain
``loss.backward()``), ``norm`` (``grad_norm``: gather the gradient norms, change nothing) and
``skip`` (an overflow was found by ``grad_norm``: drop the gradients, change nothing).

Ownership (_ownership.py): a process-wide weak map says which optimizer updates each parameter.
A new optimizer on a parameter that a live one owns detaches the old one (with a warning), so no
parameter is ever updated twice. The hooks hold the optimizer through a weak reference, and a
finalizer removes them when the optimizer is garbage-collected.

Failures: everything that can be checked before the first parameter changes (mode, clipping
set-up, every param group's values) is checked when the first gradient of a backward arrives; an
error there changes nothing. An error at a later parameter (a second gradient, a kernel error)
leaves the parameters already updated by this backward updated, changes nothing else, restores
that parameter's state entries and frees its gradient. Either way no ``.grad`` survives and the
error names the parameter.

Per step (_batch.py): every update adds its parameter's squared gradient norm to a per-device
float32 accumulator (the ops' ``grad_sq``, zeroed when an updating backward starts) and uses the
optimizer's per-device workspace (the ops' ``workspace``, allocated once). After the backward,
``last_grad_norm`` is the square root of the sum over devices; ``clip_mode="previous"`` turns it
into the next step's ``clip_coef``. Small parameters (``_is_small``) are, with
``batch_small_params`` on, not updated in their hook: their gradients are kept and each
(device, dtype) batch is updated by ONE multi-tensor call (``_multi_op``) at the end of the
backward; a backward that fails drops them unchanged.

Subclasses set ``_name`` and ``_op``, implement ``_update(p, g, group, state, seed)`` (passing
``self._grad_sq(p)`` and ``self._workspace(p.device)`` to their kernel) and may extend
``_group_rules`` (per-group value checks) and ``_repr_extra``. A subclass with a multi-tensor op
also sets ``_multi_op`` and implements ``_is_small(p)`` and
``_update_multi(params, grads, groups, states, seeds)``. A subclass whose kernel cannot add the
squared norm (``_kernel_adds_grad_sq`` False, the default for ops other than LOMO's and
AdaLomo's) has it added by the base with one torch reduction of ``g``.
"""

from __future__ import annotations

import gc
import math
import sys
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch.optim import Optimizer

from .. import ops
from .._checks import choice, integer, number
from .._stack import user_stacklevel
from . import _distributed
from . import _batch
from . import _ownership as ownership
from ._guards import (
    calling_trainer,
    compiled_autograd_active,
    compiled_autograd_configured,
    compiled_autograd_message,
    with_note,
)
from ._norm import fp32_norm
from ._ownership import OptimizerReplacedWarning
from .loss_scaler import DynamicLossScaler

_GOLDEN32 = 0x9E3779B9
_LOW_PRECISION = (torch.float16, torch.bfloat16)
CLIP_MODES = ("exact", "previous")
#: What an optimizer accepts as ``model``.
ParamsT = Union[
    torch.nn.Module,
    Iterable[torch.Tensor],
    Iterable[Dict[str, Any]],
    Iterable[Tuple[str, torch.Tensor]],
]

class NonFiniteGradientWarning(RuntimeWarning):
    """A backward produced NaN/Inf gradients; the affected values were left unchanged."""


class GradNormSpikeWarning(RuntimeWarning):
    """``clip_mode="previous"``: a step's gradient, clipped with the previous step's coefficient,
    had a norm above ``clip_spike_factor * clip_grad_norm`` (counted in ``clip_spikes``)."""


def _current_task_id() -> int:
    return torch._C._current_graph_task_id()


class InBackwardOptimizer(Optimizer):
    """Base class of the in-backward optimizers (see the module docstring)."""

    _name = "InBackwardOptimizer"
    _op = ""
    _shardable = True  # its update works on FSDP2 shards (_update_sharded)
    _multi_op = ""  # the multi-tensor op of the small parameters ("": none, no batching)
    #: clip_mode="previous": a step whose clipped norm exceeds this many times clip_grad_norm is
    #: flagged (GradNormSpikeWarning, clip_spikes). An attribute, may be changed at any time.
    clip_spike_factor = 2.0

    def _group_rules(self) -> Dict[str, Callable[[Any, str], Any]]:
        """Checks of the per-group values: key -> check(value, name). Subclasses extend it."""
        return {
            "lr": lambda v, n: number(v, n, ge=0.0),
            "weight_decay": lambda v, n: number(v, n, ge=0.0),
            "clip_grad_value": lambda v, n: number(v, n, ge=0.0, none_ok=True,
                                                   none_means="off; 0 is off too"),
        }

    def __init__(self, model: ParamsT, defaults: Dict[str, Any], *, clip_grad_norm: Optional[float],
                 backend: str, rounding: str, seed: int, clip_mode: str = "exact",
                 batch_small_params: bool = True, independent_ranks: bool = False) -> None:
        name = self._name
        if not isinstance(independent_ranks, bool):
            raise TypeError(f"{name}: independent_ranks must be True or False, got "
                            f"{independent_ranks!r}")
        # FSDP2-sharded parameters and the refusal of unsynchronised replicas (_distributed.py)
        self._sharding = _distributed.Sharding(name, independent_ranks)
        self._hook_handles: List[Any] = []
        self._finalizer = weakref.finalize(self, ownership.remove_handles, self._hook_handles)
        self._detached: Optional[str] = None
        self._ready = False
        self.backend = choice(backend, f"{name}: backend", ops.BACKENDS)
        self.rounding = choice(rounding, f"{name}: rounding", ops.ROUNDINGS)
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
        self._check_group(defaults, "")
        if compiled_autograd_active() or compiled_autograd_configured():
            raise RuntimeError(compiled_autograd_message(name))
        self._sharding.check_model(model)
        params, self._names = self._collect(model)
        self.model = model if isinstance(model, torch.nn.Module) else None  # as lomo-optim
        self.clip_coef = None  # 0-d float32 device tensor after grad_norm() (or a "previous" step)
        self.last_grad_norm: Optional[torch.Tensor] = None  # 0-d device tensor, after a backward
        self.clip_spikes = 0  # steps flagged by the clip_mode="previous" safety net
        self.loss_scaler: Optional[DynamicLossScaler] = None  # dynamic scaler (fp16 Lomo)
        self._mode = "update"
        self._in_fused = False
        self._active_scale = 1.0  # the loss scale of the backward running now
        self._skip_next = False
        self._active_tasks: set = set()  # autograd graph tasks running that our hooks have seen
        self._failed_tasks: set = set()  # graph tasks aborted by an error in one of our hooks
        self._n_updated = 0  # parameters updated by the backward running now
        self._token = 0  # the step number, advanced by step() and fused_backward()
        self._stamp: Dict[torch.Tensor, int] = {}  # param -> token of its last update
        self._grad_norms: List[torch.Tensor] = []
        self._found_inf: Dict[torch.device, torch.Tensor] = {}  # device -> 1-element flag
        self._clip_coefs: Dict[torch.device, torch.Tensor] = {}  # device -> clip_coef there
        self._backends: Dict[torch.device, str] = {}  # device -> resolved backend name
        self._impls: Dict[torch.device, Callable] = {}  # device -> op implementation
        self._multi_impls: Dict[torch.device, Callable] = {}  # device -> multi-tensor op
        self._buffers = _batch.DeviceBuffers()  # device -> workspace, grad_sq accumulator
        self._pending = _batch.Pending()  # small parameters waiting for the end of the backward
        self._small: set = set()  # the parameters _is_small() says are small
        self._sq_in_kernel: Dict[torch.device, bool] = {}  # device -> the kernel adds grad_sq
        self._updating_shard = False  # inside _update_sharded (its norm is added by the base)
        self._began = False  # an updating backward has started (its accumulators are zeroed)
        self._where: Dict[torch.Tensor, Tuple[int, int]] = {}  # param -> (group, ordinal)
        self._warned: set = set()  # once-per-optimizer warnings already given
        self._selfref = weakref.ref(self)
        self._hook_fn = ownership.make_hook(self._selfref)
        super().__init__(params, defaults)  # add_param_group checks every group and parameter
        trainable = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]
                     if p.requires_grad]
        if not trainable:
            raise ValueError(f"{name}: no trainable parameters (all have requires_grad=False)")
        if rounding == "stochastic" and not any(p.dtype in _LOW_PRECISION for _, p in trainable):
            raise ValueError(
                f"{name}: rounding='stochastic' applies to float16/bfloat16 parameters, and every "
                "trainable parameter here is float32 (stored exactly, nothing to round); use "
                "rounding='nearest'"
            )
        self._fp16 = any(p.dtype == torch.float16 for _, p in trainable)
        self._configure()
        self._attach(trainable)
        self._ready = True

    def _configure(self) -> None:
        """Subclass hook: runs once every group is checked, before any hook is registered."""

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

    def _resolve_backend(self, device: torch.device, pname: str) -> str:
        b = self._backends.get(device)
        if b is None:
            try:
                b = ops.resolve_backend(self.backend, device)
            except RuntimeError as exc:
                msg = str(exc).removeprefix("lomo_kernels: ")
                raise RuntimeError(f"{self._name}: parameter {pname}: {msg}") from None
            self._backends[device] = b
        return b

    def _check_param(self, p: torch.Tensor, pname: str) -> None:
        if p.dtype not in ops.SUPPORTED_DTYPES:
            raise TypeError(f"{self._name}: parameter {pname} has dtype {p.dtype}; only float32, "
                            "float16 and bfloat16 parameters are supported")
        if not p.is_contiguous():
            raise ValueError(f"{self._name}: parameter {pname} is not contiguous "
                             "(call .contiguous() on its data before creating the optimizer)")
        self._resolve_backend(p.device, pname)

    # ------------------------------------------------------------------ parameters and hooks
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (checked whole before anything is registered)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"{self._name}: a param group must be a dict with a 'params' entry, "
                            f"got {type(param_group).__name__}")
        gi = len(self.param_groups)
        known = dict(self._names)
        super().add_param_group(param_group)
        try:
            group = self.param_groups[gi]
            self._check_group(group, f"param_groups[{gi}]")
            self._names.update(zip(group["params"], group.get("param_names", ())))
            seen, trainable = set(), []
            for i, p in enumerate(group["params"]):
                self._names.setdefault(p, f"param_groups[{gi}]['params'][{i}]")
                if not p.requires_grad:
                    continue  # frozen: ignored
                if id(p) in seen:
                    raise ValueError(f"{self._name}: parameter {self._pname(p)} appears twice in "
                                     f"param_groups[{gi}] (it would be updated twice)")
                seen.add(id(p))
                self._check_param(p, self._pname(p))
                trainable.append((gi, p))
            if self._ready:
                self._attach(trainable)
        except BaseException:
            del self.param_groups[gi:]
            self._names = known
            raise

    def _attach(self, trainable: List[Tuple[int, torch.Tensor]]) -> None:
        """Take ownership of ``trainable`` ((group index, parameter) pairs) and hook them."""
        params = [p for _, p in trainable]
        inspected = self._sharding.inspect([(p, self._pname(p)) for p in params], self.backend)
        if inspected[0] and not self._shardable:
            raise ValueError(
                f"{self._name}: parameter {inspected[0][0][1]} is sharded by fully_shard (FSDP2), "
                f"which {self._name} does not support (its projections span the shards); use "
                "AdaLomo or Lomo on a sharded model"
            )
        sharded = {p for p, _, _ in inspected[0]}  # FSDP2 shards are updated in their hooks
        small = {p for p in params
                 if self._multi_op and p not in sharded and self._is_small(p)}
        self._prepare_devices(list(self._where) + params, self._small | small)  # may raise
        if ownership.other_owners(self, params):
            gc.collect()  # an old optimizer may be garbage in a reference cycle: collect it first
        others = ownership.other_owners(self, params)
        for old, shared in others:  # warn first: a warning turned into an error changes nothing
            names = ", ".join(self._pname(p) for p in shared[:3])
            warnings.warn(
                f"{self._name}: {len(shared)} of these parameters ({names}"
                f"{', ...' if len(shared) > 3 else ''}) were updated by another {old._name} "
                "optimizer that is still alive; it has been detached from all its parameters "
                "(as by its remove_hooks()), so that no parameter is updated twice. Call "
                "remove_hooks() on the old optimizer (or drop every reference to it) before "
                "creating a new one to avoid this warning.",
                OptimizerReplacedWarning,
                stacklevel=user_stacklevel(),
            )
        for old, _ in others:
            old._detach(f"a newer {self._name} optimizer took over its parameters")
        self._fp16 = self._fp16 or any(p.dtype == torch.float16 for p in params)
        for p in self._sharding.adopt(inspected):
            # sharded state exists from the start: a fresh optimizer is a template DCP loads into
            self.state[p].update(self._sharded_state(self._sharding.shards[p]))
        for gi, p in trainable:
            self._where[p] = (gi, len(self._where))
            ownership.claim(self._selfref, p)
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._hook_fn))
        self._small |= small

    def _prepare_devices(self, params: List[torch.Tensor], small: set) -> None:
        """Per device of ``params`` (every parameter this optimizer will update; ``small``: those
        batched): the gradient-norm accumulator, and one workspace large enough for every update
        there (grown when parameters are added, never per call); and, once, whether the device's
        kernel adds the squared gradient norm itself."""
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for dev, params in by_device.items():
            batches: Dict[torch.dtype, list] = {}
            for p in params:
                if p in small:
                    batches.setdefault(p.dtype, []).append(tuple(p.shape))
            self._buffers.ensure(dev, self._workspace_numel(dev, params, list(batches.values())))
            if dev not in self._sq_in_kernel:
                self._sq_in_kernel[dev] = self._kernel_adds_grad_sq(dev)

    def _workspace_numel(self, device: torch.device, params: List[torch.Tensor],
                         batches: List[list]) -> int:
        """float32 elements of ``device``'s workspace (subclasses with other ops override)."""
        return _batch.workspace_numel(self._op, self._multi_op, self._backends[device], device,
                                      [tuple(p.shape) for p in params], batches)

    def _kernel_adds_grad_sq(self, device: torch.device) -> bool:
        """Whether ``_update``'s kernel on ``device`` adds ``grad_sq`` itself; when not, the base
        adds it after ``_update`` with one torch reduction of the gradient."""
        if self._op not in ops.SINGLE_OF.values():
            return False
        return _batch.kernel_adds_grad_sq(self._op, self._backends[device], self._impl(device),
                                          device)

    def _is_small(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is updated with the other small parameters by ``_multi_op``."""
        return False

    def remove_hooks(self) -> None:
        """Detach the optimizer from its parameters: gradients then accumulate as usual and this
        optimizer updates nothing any more (its ``fused_backward``, ``grad_norm`` and ``step``
        raise). Also happens when the optimizer is garbage-collected."""
        ownership.remove_handles(self._hook_handles)
        ownership.release(self, (p for g in getattr(self, "param_groups", ()) for p in g["params"]))
        if self._detached is None:
            self._detached = "remove_hooks() was called"

    def _detach(self, reason: str) -> None:
        self._detached = reason
        self.remove_hooks()

    def _require_attached(self) -> None:
        if self._detached is not None:
            raise RuntimeError(
                f"{self._name}: this optimizer no longer updates its parameters ({self._detached}); "
                "use the optimizer that now owns them, or create a new one"
            )

    def _impl(self, device: torch.device) -> Callable:
        impl = self._impls.get(device)
        if impl is None:
            impl = self._impls[device] = ops.get_impl(self._op, self.backend, device)
            if self._multi_op:  # resolved together: a failed first-use self-check of the single
                self._multi_impl(device)  # kernel must not make the later resolution refuse
        return impl

    def _multi_impl(self, device: torch.device) -> Callable:
        impl = self._multi_impls.get(device)
        if impl is None:
            impl = self._multi_impls[device] = ops.get_impl(self._multi_op, self.backend, device)
        return impl

    def _accumulator(self, p: torch.Tensor) -> torch.Tensor:
        """The 1-element float32 slot ``p``'s squared gradient norm is added to (``p`` or its
        ``.data``: the slot depends on device, dtype and size only)."""
        small = self._multi_op != "" and self._is_small(p)
        return self._buffers.accumulator(p.device, _batch.slot_of(p, small))

    def _grad_sq(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """``grad_sq`` for the kernel updating ``p``: its accumulator slot, or None when that
        kernel cannot add it (the base then does)."""
        if self._updating_shard:
            return None
        return self._accumulator(p) if self._sq_in_kernel[p.device] else None

    def _workspace(self, device: torch.device) -> Optional[torch.Tensor]:
        """The workspace every update on ``device`` uses (None when the ops need none)."""
        return self._buffers.workspace.get(device)

    def _device_flag(self, device: torch.device) -> torch.Tensor:
        t = self._found_inf.get(device)
        if t is None:
            t = self._found_inf[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return t

    def _clip_coef_on(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.clip_coef is None or self.clip_grad_norm is None:
            return None
        t = self._clip_coefs.get(device)
        if t is None:
            t = self._clip_coefs[device] = self.clip_coef.to(device)
        return t

    def _param_seed(self, p: torch.Tensor) -> int:
        return (self.seed + _GOLDEN32 * self._where[p][1]) & 0xFFFFFFFF

    def _warn_once(self, key: str, msg: str, category: type = UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, category, stacklevel=user_stacklevel())

    # ------------------------------------------------------------------ the hook
    def _hook(self, p: torch.Tensor) -> None:
        try:
            self._hook_update(p)
        except Exception as exc:
            p.grad = None
            raise self._failure(exc, p) from exc
        except BaseException:  # KeyboardInterrupt: clean up, re-raise as it is
            p.grad = None
            self._abort_backward()
            raise

    def _hook_update(self, p: torch.Tensor) -> None:
        if compiled_autograd_active():
            raise RuntimeError(compiled_autograd_message(self._name))
        tid = _current_task_id()
        if tid in self._failed_tasks:  # another device thread, after this backward failed
            p.grad = None
            return
        if tid not in self._active_tasks:
            self._begin_task(tid)
        g = p.grad
        p.grad = None
        shard = self._sharding.shards.get(p)  # FSDP2: the hook gets a DTensor, updates its shard
        if shard is not None and g is not None:
            g = _distributed.local_grad(p, g, self._pname(p), self._name)
        if g is None or self._mode == "skip" or p.numel() == 0:
            return
        if self._mode == "norm":
            n = fp32_norm(g)
            s = self._active_scale
            # sharded: local norms, summed across the shard group by grad_norm()
            (self._grad_norms if shard is None else self._sharding.norms).append(
                n / s if s != 1.0 else n)
            return
        if self._stamp.get(p) == self._token:
            raise RuntimeError(
                f"{self._name}: parameter {self._pname(p)} received a second gradient before "
                "optimizer.step(). The update happens inside backward and frees each gradient, so "
                "gradient accumulation cannot work (set gradient_accumulation_steps=1): call "
                "optimizer.step() (a no-op that marks the step boundary) after every "
                "loss.backward(), or use fused_backward(loss, lr). (A weight shared between "
                "reentrant checkpoint segments also gets its gradient in pieces: use "
                "torch.utils.checkpoint(..., use_reentrant=False).)"
            )
        if not g.is_contiguous():
            g = g.contiguous()
        if self.batch_small_params and p in self._small:
            self._pending.add(p, g)  # updated with the other small ones when the backward ends
            self._stamp[p] = self._token
            return
        group = self.param_groups[self._where[p][0]]
        had_state = p in self.state
        state = self.state[p]
        saved = dict(state)
        try:
            with torch.no_grad():
                if shard is None:
                    self._update(p.data, g, group, state, self._param_seed(p))
                    if not self._sq_in_kernel[p.device]:
                        _batch.add_grad_sq(self._accumulator(p), g, self._active_scale)
                else:
                    # the kernels add no grad_sq here (_grad_sq is None): the local shard's part
                    # of the norm goes to the sharded accumulator, summed across ranks by
                    # _reduce_grad_sq (one torch reduction of the shard), before the update
                    # (GoLore's may reuse the gradient's buffer)
                    _batch.add_grad_sq(self._sharding.grad_sq(g.device), g, self._active_scale)
                    self._updating_shard = True
                    try:
                        self._update_sharded(_distributed.local(p), g, group, state,
                                             _distributed.shard_seed(self._param_seed(p), shard),
                                             shard)
                    finally:
                        self._updating_shard = False
        except BaseException:
            state.clear()
            state.update(saved)
            if not had_state:
                del self.state[p]
            raise
        self._stamp[p] = self._token
        self._n_updated += 1

    def _failure(self, exc: Exception, p: torch.Tensor) -> Exception:
        """Reset the per-backward bookkeeping and say what the failed backward changed."""
        n = self._n_updated
        waiting = len(self._pending)
        self._abort_backward()
        pname = self._pname(p)
        at = "" if f"parameter {pname} " in str(exc) else f"at parameter {pname}; "
        if n == 0:
            note = f"({at}no parameter was changed by this backward and no gradient was kept)"
        else:
            also = (f", nor were the {waiting} small parameter(s) batched for the end of the "
                    "backward" if waiting else "")
            note = (f"({at}{n} parameter(s) had already been updated in place by this backward; "
                    f"{pname} and the parameters not yet reached were not changed{also}, and no "
                    "gradient was kept; call optimizer.step() before the next backward)")
        return with_note(exc, note)

    def _abort_backward(self) -> None:
        try:
            self._failed_tasks.add(_current_task_id())
        except Exception:
            pass
        self._failed_tasks.update(self._active_tasks)
        self._active_tasks.clear()
        for t in self._found_inf.values():
            t.zero_()
        self._n_updated = 0
        self._began = False
        self._drop_pending()

    def _drop_pending(self) -> None:
        """Forget the small parameters waiting for the end of a backward that failed: they are
        not updated (nor marked as updated) and their gradients are freed."""
        for p in self._pending.params():
            if self._stamp.get(p) == self._token:
                del self._stamp[p]
        self._pending.take()

    def _update_pending(self) -> None:
        """The end of an updating backward: each (device, dtype) batch of small parameters in one
        multi-tensor call, in the order their hooks fired. A failure restores the batch's state
        entries, leaves the batches after it unchanged and frees every gradient."""
        batches = self._pending.take()
        for i, (dev, params, grads) in enumerate(batches):
            had = [p in self.state for p in params]
            states = [self.state[p] for p in params]
            saved = [dict(st) for st in states]
            try:
                with torch.no_grad():
                    self._update_multi(
                        [p.data for p in params], grads,
                        [self.param_groups[self._where[p][0]] for p in params], states,
                        [self._param_seed(p) for p in params])
                    if not self._sq_in_kernel[dev]:
                        acc = self._accumulator(params[0])
                        for g in grads:
                            _batch.add_grad_sq(acc, g, self._active_scale)
            except BaseException as exc:
                for p, st, old, kept in zip(params, states, saved, had):
                    st.clear()
                    st.update(old)
                    if not kept:
                        del self.state[p]
                for _, later, _ in batches[i:]:  # not updated: not marked as updated
                    for p in later:
                        if self._stamp.get(p) == self._token:
                            del self._stamp[p]
                n = self._n_updated
                self._abort_backward()
                if not isinstance(exc, Exception):
                    raise
                names = ", ".join(self._pname(p) for p in params[:3])
                raise with_note(exc, (
                    f"(in the batched update of {len(params)} small {params[0].dtype} "
                    f"parameter(s) ({names}{', ...' if len(params) > 3 else ''}) at the end of "
                    f"the backward; their state entries were restored; {n} parameter(s) had "
                    "already been updated in place by this backward; no gradient was kept; call "
                    "optimizer.step() before the next backward)")) from exc
            self._n_updated += len(params)

    def _update_multi(self, params: List[torch.Tensor], grads: List[torch.Tensor],
                      groups: List[Dict[str, Any]], states: List[Dict[str, Any]],
                      seeds: List[int]) -> None:
        """Update the small ``params`` (one device and dtype) with ONE call of ``_multi_op``,
        each exactly as ``_update`` would. Entries of ``states`` are restored if this raises."""
        raise NotImplementedError

    def _begin_task(self, tid: int) -> None:
        """First hook of a graph task (a backward, or one nested in it by reentrant checkpointing):
        the checks that must pass before anything changes, and the end-of-backward callback."""
        if not self._active_tasks:
            self._n_updated = 0
        if self._mode == "update":
            self._sharding.check_world()
            plain = not self._in_fused
            self._check_clip(plain=plain)
            self._check_groups()
            if plain and self._fp16:
                self._warn_once(
                    "plain-fp16",
                    f"{self._name}: float16 parameters with a plain loss.backward(): the loss is "
                    "not scaled, so small gradients may underflow to zero in float16. "
                    "fused_backward(loss, lr) scales the loss; bfloat16 parameters need no "
                    "scaling.",
                )
            if not self._active_tasks:  # a new updating backward (checked): fresh accumulators
                self._drop_pending()  # left by a backward that failed outside our hooks
                self._buffers.zero_grad_sq()
                self._sharding.zero_grad_sq()
                self._began = True
        self._active_tasks.add(tid)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_task(tid))

    def _end_task(self, tid: int) -> None:
        self._active_tasks.discard(tid)
        if self._active_tasks or self._mode != "update":
            return
        self._update_pending()  # the end of an updating backward: the small parameters
        if not self._in_fused:
            self._after_update(scaled=False)  # the end of a plain loss.backward()

    def _main_device(self) -> torch.device:
        return next(iter(self._buffers.grad_sq))

    def _clip_coef_from(self, norm: torch.Tensor) -> torch.Tensor:
        """lomo-optim's coefficient: ``min(1, clip_grad_norm / (norm + 1e-6))``, on the device."""
        return torch.clamp(float(self.clip_grad_norm) / (norm + 1e-6), max=1.0)

    def _set_clip_coef(self, coef: torch.Tensor) -> None:
        self.clip_coef = coef
        self._clip_coefs = {coef.device: coef}

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
        used = self.clip_coef if clipping else None
        norm = self._finish_grad_norm()
        if clipping and self.clip_mode == "previous":
            keep = self.clip_coef.to(norm.device) if self.clip_coef is not None else 1.0
            coef = self._clip_coef_from(norm)
            self._set_clip_coef(torch.where(torch.isfinite(norm), coef, keep))
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

    def _check_spike(self, norm: float, coef: Optional[float]) -> None:
        """The clip_mode="previous" safety net, from values the host look already has (``coef``:
        the coefficient this step used; None: none yet, the step was not clipped)."""
        applied = norm * (1.0 if coef is None else coef)
        limit = self.clip_spike_factor * float(self.clip_grad_norm)
        if math.isfinite(applied) and applied > limit:
            self.clip_spikes += 1
            how = ("was not clipped (the first step has no previous norm; call grad_norm(loss) "
                   "before it to clip it exactly)" if coef is None else
                   f"was clipped with the previous step's coefficient ({coef:.4g})")
            warnings.warn(
                f"{self._name}: clip_mode='previous': this step {how}; its gradient norm was "
                f"{norm:.4g}, so the applied norm {applied:.4g} is "
                f"{applied / float(self.clip_grad_norm):.1f}x clip_grad_norm="
                f"{self.clip_grad_norm:g} (flagged above clip_spike_factor="
                f"{self.clip_spike_factor:g}; {self.clip_spikes} step(s) so far: "
                "optimizer.clip_spikes). Use clip_mode='exact' where such steps matter.",
                GradNormSpikeWarning,
                stacklevel=user_stacklevel(),
            )

    # ------------------------------------------------------------------ lomo-optim's API
    def _loss_scale(self) -> float:
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

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss our backward differentiates; the hooks divide by the same scale. (A plain
        loss.backward() is not scaled, so its hooks divide by nothing.)"""
        s = self._active_scale = self._loss_scale()
        return loss * s if s != 1.0 else loss

    def fused_backward(self, loss: torch.Tensor, lr: Optional[float] = None) -> None:
        """Backward with the update fused into it. ``lr`` (if given) sets every group's lr.

        Everything is checked before the backward starts (the loss, ``lr``, every param group,
        the clipping set-up): an error there changes nothing."""
        self._require_attached()
        if lr is not None:
            number(lr, f"{self._name}: fused_backward lr", ge=0.0)
        self._prepare(loss)
        skip, self._skip_next = self._skip_next, False
        try:
            if not skip:
                self._check_clip(plain=False)
                self._check_groups(lr)
        except BaseException:
            self._skip_next = skip
            raise
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = lr
        self._token += 1
        self._mode = "skip" if skip else "update"
        self._in_fused = True
        self._n_updated = 0
        try:
            self._scaled(loss).backward()
        except BaseException:
            self._drop_pending()  # (an error outside our hooks: they did not clean up)
            raise
        finally:
            self._in_fused = False
            self._mode = "update"
            self._active_scale = 1.0
            self._active_tasks.clear()
        if not skip:
            self._after_update()
        self.step()  # marks the step boundary (and tells LR schedulers a step was taken)

    def _check_clip(self, plain: bool) -> None:
        """Lomo requires grad_norm() before an update when clip_grad_norm is set."""

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
        norms = self._grad_norms
        self._grad_norms = []
        # summed across the shard group when sharded: every rank gets the same total
        total = self._sharding.total_norm(norms)
        if total is None:
            return torch.zeros((), dtype=torch.float32)
        dev = total.device
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
        self._set_clip_coef(self._clip_coef_from(total))
        return total

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """A no-op: the update happened inside backward. Marks the step boundary."""
        self._require_attached()
        self._sharding.check_not_resharded(self.model, self._where)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "trainer" not in self._warned:
            self._warned.add("trainer")
            self._check_trainer()
        self._drop_pending()  # (only after a backward that failed outside our hooks)
        self._began = False
        self._token += 1
        self._active_tasks.clear()  # step() runs outside any backward
        self._failed_tasks.clear()
        return loss

    def _check_trainer(self) -> None:
        """Called once, at the first step(): a transformers Trainer that calls us logs our
        ``last_grad_norm`` as its grad_norm (lomo_kernels.hf); one that clips gradients after
        backward clips nothing (they are applied and freed): say so."""
        trainer = calling_trainer(sys._getframe(1))
        if trainer is None:
            return
        from .. import hf

        hf.report_grad_norm(trainer, self)
        mgn = getattr(getattr(trainer, "args", None), "max_grad_norm", 0) or 0
        if mgn > 0 and not getattr(self, "_trainer_args_checked", False):
            warnings.warn(
                f"{self._name}: the transformers Trainer driving this optimizer has "
                f"max_grad_norm={mgn}, but it clips after backward, when {self._name} has "
                "already applied and freed every gradient: nothing is clipped (the logged "
                "grad_norm is the optimizer's last_grad_norm). Set max_grad_norm=0 in "
                "TrainingArguments and clip in the optimizer: clip_grad_norm=..., "
                "clip_mode='previous' (one backward), or clip_grad_value (see lomo_kernels.hf).",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    # ------------------------------------------------------------------ repr and state
    def _repr_extra(self) -> Dict[str, Any]:
        extra: Dict[str, Any] = {"clip_grad_norm": self.clip_grad_norm}
        if self.clip_mode != "exact":
            extra["clip_mode"] = self.clip_mode
        if not self.batch_small_params:
            extra["batch_small_params"] = False
        return extra

    def __repr__(self) -> str:
        backend = repr(self.backend)
        if self._backends:
            backend += " (" + ", ".join(f"{d}: {b}" for d, b in self._backends.items()) + ")"
        parts = [f"backend={backend}", f"rounding={self.rounding!r}"]
        groups = getattr(self, "param_groups", [])
        for key in self.defaults:
            values = [g.get(key) for g in groups]
            shown = values[0] if values and all(v == values[0] for v in values) else values
            parts.append(f"{key}={shown!r}")
        parts += [f"{k}={v!r}" for k, v in self._repr_extra().items()]
        if self.seed:
            parts.append(f"seed={self.seed}")
        parts.append(f"parameters={len(self._where)}")
        if len(groups) > 1:
            parts.append(f"param_groups={len(groups)}")
        if self._detached is not None:
            parts.append(f"detached={self._detached!r}")
        return f"{self._name}({', '.join(parts)})"

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["lomo_kernels"] = {
            "seed": self.seed,
            "clip_grad_norm": self.clip_grad_norm,
            "clip_coef": None if self.clip_coef is None else self.clip_coef.detach().cpu().clone(),
            "skip_next": self._skip_next,
            "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        for i, group in enumerate(state_dict.get("param_groups", ())):
            self._check_group(group, f"state_dict param_groups[{i}]")  # before anything changes
        extra = state_dict.pop("lomo_kernels", None)
        # torch casts floating state to the parameter dtype; AdaLomo's factors must stay fp32,
        # so the tensors are restored here, as they were saved.
        tensors = {}
        plain = {}
        for pid, s in state_dict["state"].items():
            tensors[pid] = {k: v for k, v in s.items() if torch.is_tensor(v)}
            plain[pid] = {k: v for k, v in s.items() if not torch.is_tensor(v)}
        super().load_state_dict({**state_dict, "state": plain})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for pid, ts in tensors.items():
            p = id_to_param[pid]
            for k, v in ts.items():
                self.state[p][k] = v.detach().to(p.device, copy=True)
        if extra is not None:
            self.seed = extra["seed"]
            self.clip_grad_norm = extra["clip_grad_norm"]
            cc = extra["clip_coef"]
            self.clip_coef = None if cc is None else cc.clone()
            self._clip_coefs = {}
            self._skip_next = extra["skip_next"]
            if extra["loss_scaler"] is not None:
                self.loss_scaler = DynamicLossScaler()
                self.loss_scaler.load_state_dict(extra["loss_scaler"])

    # ------------------------------------------------------------------ helpers for subclasses
    def _update(self, p: torch.Tensor, g: torch.Tensor, group: Dict[str, Any],
                state: Dict[str, Any], seed: int) -> None:
        """Update ``p`` in place from ``g``. Entries of ``state`` are restored if this raises."""
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

    @staticmethod
    def _beta(step: int, decay_rate: float) -> float:
        # lomo-optim: "To avoid math errors for edge cases"
        decay = -decay_rate if (step == 0 and decay_rate < 0) else decay_rate
        return 1.0 - math.pow(step, decay)
