"""Hook registration and ownership, and the hook itself.

Attaching (constructor, ``add_param_group``): every parameter is checked before the first hook is
registered or any ownership changes, so a failing call leaves nothing behind. A process-wide weak
map (_ownership.py) says which optimizer updates each parameter: a new optimizer on a parameter a
live one owns detaches the old one from all its parameters (``OptimizerReplacedWarning``), so no
parameter is ever updated twice. The hooks hold the optimizer through a weak reference, and a
finalizer removes them when it is garbage-collected.

The hook: a backward runs in one of three modes: ``update`` (the default: ``fused_backward`` or a
plain ``loss.backward()``), ``norm`` (``grad_norm``: gather the gradient norms, change nothing) and
``skip`` (an overflow was found by ``grad_norm``: drop the gradients, change nothing). The first
hook of a backward (``_begin_task``) runs every check that must pass before anything changes;
in an updating backward each gradient then goes where ``_route`` sends it: the pending batch of
the small parameters (_batch.py) or ``_update_param`` (_kernels.py) at once. ``_end_task`` (the
end of the outermost graph task) updates the batch and closes the step (_bookkeeping.py).

Attributes owned here: ``_hook_handles``, ``_finalizer``, ``_detached``, ``_ready``, ``_selfref``,
``_hook_fn``, ``_mode``, ``_in_fused``, ``_active_tasks``, ``_failed_tasks``, ``_n_updated``,
``_token`` (the step number), ``_stamp`` (param -> token of its last update), ``_where``
(param -> (group index, ordinal)).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._stack import user_stacklevel
from . import _distributed
from . import _ownership as ownership
from ._failures import current_task_id
from ._guards import compiled_autograd_active, compiled_autograd_message
from ._ownership import OptimizerReplacedWarning


class HooksMixin:
    """Hook registration, ownership and the hook of ``InBackwardOptimizer``."""

    def _init_hooks(self) -> None:
        """The first attributes of a constructor (a failing constructor's finalizer needs them)."""
        self._hook_handles: List[Any] = []
        self._finalizer = weakref.finalize(self, ownership.remove_handles, self._hook_handles)
        self._detached: Optional[str] = None
        self._ready = False

    def _init_backward(self) -> None:
        self._mode = "update"
        self._in_fused = False
        self._active_tasks: set = set()  # autograd graph tasks running that our hooks have seen
        self._failed_tasks: set = set()  # graph tasks aborted by an error in one of our hooks
        self._n_updated = 0  # parameters updated by the backward running now
        self._token = 0  # the step number, advanced by step() and fused_backward()
        self._stamp: Dict[torch.Tensor, int] = {}  # param -> token of its last update
        self._where: Dict[torch.Tensor, Tuple[int, int]] = {}  # param -> (group, ordinal)
        self._selfref = weakref.ref(self)
        self._hook_fn = ownership.make_hook(self._selfref)

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
        tid = current_task_id()
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
            self._record_norm(g, shard)
            return
        if not g.is_contiguous():
            g = g.contiguous()
        if self._window.enabled:  # accumulation_steps > 1: into the buffer (_accumulation.py)
            self._accumulate(p, g, shard)
            return
        if self._stamp.get(p) == self._token:
            raise RuntimeError(
                f"{self._name}: parameter {self._pname(p)} received a second gradient before "
                "optimizer.step(). With accumulation_steps=1 (the default) the update happens "
                "inside each backward and frees the gradient: call optimizer.step() (which marks "
                "the step boundary) after every loss.backward(), or use fused_backward(loss, lr). "
                "To accumulate gradients over K micro-batches (e.g. gradient_accumulation_steps="
                "K in transformers), create the optimizer with accumulation_steps=K. (A weight "
                "shared between reentrant checkpoint segments also gets its gradient in pieces: "
                "use torch.utils.checkpoint(..., use_reentrant=False).)"
            )
        self._route(p, g, shard)

    def _route(self, p: torch.Tensor, g: torch.Tensor, shard: Optional[Any]) -> None:
        """Where the gradient ``g`` of ``p`` goes in an updating backward: the batch of the small
        parameters, updated when the backward ends (``p`` counts as updated from now: a second
        gradient is refused as for any parameter), or ``p``'s own update, now."""
        if self.batch_small_params and p in self._small:
            self._pending.add(p, g)
            self._stamp[p] = self._token
            return
        self._update_param(p, g, shard)

    def _begin_task(self, tid: int) -> None:
        """First hook of a graph task (a backward, or one nested in it by reentrant checkpointing):
        the checks that must pass before anything changes, and the end-of-backward callback."""
        if not self._active_tasks:
            self._n_updated = 0
        if self._mode == "update":
            if not self._active_tasks:
                self._check_window_open()
            self._sharding.check_world()
            plain = not self._in_fused
            # (a nested task runs inside a backward already checked; accumulating: the window
            # is clipped in step())
            if not self._active_tasks and not self._window.enabled:
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
                self._start_grad_norm()  # (and the clip coefficient it applies: _clipping.py)
        self._active_tasks.add(tid)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_task(tid))

    def _end_task(self, tid: int) -> None:
        self._active_tasks.discard(tid)
        if self._active_tasks or self._mode != "update":
            return
        if self._window.enabled:
            self._end_accumulating_backward()
            return
        self._update_pending()  # the end of an updating backward: the small parameters
        if not self._in_fused:
            self._after_update(scaled=False)  # the end of a plain loss.backward()

    def _warn_once(self, key: str, msg: str, category: type = UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, category, stacklevel=user_stacklevel())
