"""Using ``Lomo`` / ``AdaLomo`` / ``GoLore`` / ``GaLore`` with the Hugging Face
``transformers.Trainer``.

The optimizers update every parameter inside ``loss.backward()`` (post-accumulate-grad hooks) and
free each gradient at once; ``optimizer.step()`` is a no-op that marks the step boundary and the
learning rate is read from ``param_groups`` at every update. That is exactly the interface the
``Trainer`` drives, so an instance passed through ``optimizers=`` just works::

    from transformers import Trainer, TrainingArguments
    from lomo_kernels.hf import make_trainer_optimizers

    args = TrainingArguments(
        output_dir="out", learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=100,
        max_steps=1000, per_device_train_batch_size=8,
        gradient_accumulation_steps=4,   # passed on: the optimizer's accumulation_steps
        max_grad_norm=0.0,               # Trainer's clipping sees no gradients (they are freed)
        bf16=True,                       # or bf16/fp16 *parameters*; never fp16=True (GradScaler)
    )
    optimizer, scheduler = make_trainer_optimizers(model, args, "adalomo", clip_grad_value=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, scheduler))
    trainer.train()

or, without the helper, ``optimizers=(AdaLomo(model, lr=args.learning_rate,
accumulation_steps=args.gradient_accumulation_steps), None)``: the Trainer then builds its usual
scheduler (``lr_scheduler_type``, warm-up) on our optimizer, and that scheduler drives the lr of
the in-backward updates.

Gradient accumulation (``gradient_accumulation_steps = K > 1``): the optimizer needs
``accumulation_steps=K`` (the helper passes it on): each micro-batch's backward adds its
gradients into the optimizer's buffers (the Trainer scales the loss as usual) and the Trainer's
``optimizer.step()`` at the end of the window applies one update with their sum, also for the
shorter last window of an epoch (docs/accumulation.md). Exact global-norm clipping then works
with the Trainer's single backward per micro-batch: ``clip_grad_norm=...`` (the default
``clip_mode="exact"``).

The logged ``grad_norm`` is the optimizer's ``last_grad_norm`` (the global L2 norm of the step's
unscaled gradients, summed by the update kernels as they read them): at its first ``step()`` the
optimizer finds the Trainer calling it and adds a ``GradNormCallback`` in front of the Trainer's
callbacks (``report_grad_norm(trainer, optimizer)`` does it explicitly), which writes that norm
into each training log (the Trainer's own ``clip_grad_norm_`` sees no gradients and reports 0).
Global-norm clipping with the Trainer's single backward: ``clip_grad_norm=1.0,
clip_mode="previous"`` (each step clipped with the coefficient of the previous step's norm).

What does not work, and why (found by running ``Trainer`` 5.x with accelerate 1.x):

* ``gradient_accumulation_steps > 1`` with an optimizer created without ``accumulation_steps``:
  the first micro-batch's backward already updated every parameter; the second backward before
  ``optimizer.step()`` raises the optimizer's ``RuntimeError: ... received a second gradient
  before optimizer.step() ... create the optimizer with accumulation_steps=K ...``.
  ``make_trainer_optimizers`` passes ``accumulation_steps`` on (and refuses an optimizer instance
  whose ``accumulation_steps`` differs).
* ``max_grad_norm > 0`` (the Trainer's default 1.0): ``clip_grad_norm_`` runs after the backward,
  on parameters whose gradients are already applied and freed (``p.grad is None``): it clips
  nothing (and computes a norm of 0, which the ``GradNormCallback`` replaces by the optimizer's);
  a bare optimizer handed to such a Trainer warns once, at the first step. Set
  ``max_grad_norm=0`` and clip in the optimizer: ``clip_grad_norm=..., clip_mode="previous"``
  (global norm, one backward) or ``clip_grad_value`` (element clipping). The exact
  ``clip_grad_norm`` (the default ``clip_mode="exact"``) needs two backward passes
  (``optimizer.grad_norm(loss)`` then ``optimizer.fused_backward(loss)``), which the Trainer's
  loop does not do: every optimizer refuses it at the first backward, before any parameter
  changes (docs/clipping.md), unless the optimizer accumulates (``accumulation_steps > 1``): it
  then clips the window exactly.
* ``fp16=True`` (AMP with a ``GradScaler``): the scaler multiplies the loss, our hooks see the
  scaled gradient and do not know the scale (``Lomo`` would step 65536x too far), and
  ``GradScaler.step`` then fails with "No inf checks were recorded for this optimizer" (both seen
  with ``torch.amp.GradScaler("cpu")``; on CPU the Trainer's fp16 AMP is off, so the Trainer path
  itself is untested without a GPU). Use ``bf16=True``, or fp16/bf16 parameters
  (``from_pretrained(..., dtype=torch.bfloat16)``) without AMP. Refused by the helper.
* ``activation_checkpointing=True`` (``gradient_checkpointing`` before transformers 5) needs
  non-reentrant checkpointing where a weight is shared between checkpointed segments (it would
  get its gradient in pieces, which the optimizer refuses): the default of transformers >= 5;
  older versions: ``gradient_checkpointing_kwargs={"use_reentrant": False}``.
* compiled autograd (``torch._dynamo.config.compiled_autograd = True``, as set by some
  ``torch_compile`` recipes) traces the gradient hooks once: the optimizers refuse it with a clear
  error at construction or at the first backward. A ``torch.compile``'d forward is fine.
* transformers' built-in ``optim="lomo"`` / ``"adalomo"`` import ``lomo_optim``; ours is passed
  through ``optimizers=`` instead and is driven by a plain ``backward`` (no ``learning_rate``
  argument to ``accelerator.backward``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import torch

from ._checks import integer
from ._stack import user_stacklevel
from .optim import AdaLomo, GaLore, GoLore, InBackwardOptimizer, Lomo
from .optim._backward import at_first_step
from .optim._clipping import ALTERNATIVES

__all__ = ["make_trainer_optimizers", "check_training_args", "report_grad_norm",
           "GradNormCallback"]

_CALLBACK = None


def _callback_class() -> type:
    """``GradNormCallback``, defined on first use (transformers is imported only then)."""
    global _CALLBACK
    if _CALLBACK is None:
        from transformers import TrainerCallback

        class GradNormCallback(TrainerCallback):
            """Writes ``optimizer.last_grad_norm`` into every training log as ``grad_norm``
            (the Trainer's own norm is computed from ``p.grad`` after the in-backward update
            freed every gradient). Put it first among the callbacks, so that the loggers after
            it see the value: ``report_grad_norm`` does."""

            def __init__(self, optimizer: Any) -> None:
                self.optimizer = _in_backward(optimizer, "GradNormCallback: optimizer")

            def on_log(self, args, state, control, logs=None, **kwargs):
                norm = self.optimizer.last_grad_norm
                if logs is None or norm is None or not ("loss" in logs or "grad_norm" in logs):
                    return  # evaluation and summary logs have no gradient norm
                value = float(norm)  # at logging time, as the Trainer reads its loss
                logs["grad_norm"] = value
                last = state.log_history[-1] if state.log_history else None
                if last is not None and last.get("step") == state.global_step and (
                        "loss" in last or "grad_norm" in last):
                    last["grad_norm"] = value  # the copy the Trainer stored before on_log

        _CALLBACK = GradNormCallback
    return _CALLBACK


def __getattr__(name: str) -> Any:
    if name == "GradNormCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _in_backward(optimizer: Any, name: str) -> Any:
    """``optimizer`` (or the in-backward optimizer that accelerate's wrapper holds), checked."""
    inner = optimizer
    while not hasattr(inner, "last_grad_norm") and hasattr(inner, "optimizer"):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    if not isinstance(inner, InBackwardOptimizer):
        raise TypeError(f"{name} must be a lomo_kernels optimizer (Lomo, AdaLomo, GoLore, "
                        f"GaLore) or accelerate's wrapper of one, got {type(optimizer).__name__}")
    return inner


def _training_args(args: Any, name: str, needs: tuple) -> None:
    """Refuse what is not a ``transformers.TrainingArguments`` (a dict, a string...)."""
    missing = [a for a in needs if not hasattr(args, a)]
    if isinstance(args, (dict, str, bytes, int, float)) or missing:
        raise TypeError(f"{name} must be a transformers.TrainingArguments (with "
                        f"{', '.join(needs)}), got {type(args).__name__}"
                        + (f" without {', '.join(missing)}" if missing else ""))


def calling_trainer(frame: Any) -> Any:
    """The transformers Trainer among the callers from ``frame`` up, or None when no Trainer is
    calling (transformers.trainer is only looked up if imported)."""
    mod = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(mod, "Trainer", None) if mod is not None else None
    if trainer_cls is None:
        return None
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, trainer_cls):
            return obj
        frame = frame.f_back
    return None


@at_first_step
def _check_trainer(optimizer: Any, frame: Any) -> None:
    """At an optimizer's first ``step()``: a Trainer that calls it logs its ``last_grad_norm``
    as its grad_norm; one that clips gradients after backward clips nothing (they are applied
    and freed): say so."""
    trainer = calling_trainer(frame)
    if trainer is None:
        return
    report_grad_norm(trainer, optimizer)
    mgn = getattr(getattr(trainer, "args", None), "max_grad_norm", 0) or 0
    if mgn > 0 and not getattr(optimizer, "_trainer_args_checked", False):
        name = optimizer._name
        warnings.warn(
            f"{name}: the transformers Trainer driving this optimizer has "
            f"max_grad_norm={mgn}, but it clips after backward, when {name} has "
            "already applied and freed every gradient: nothing is clipped (the logged "
            "grad_norm is the optimizer's last_grad_norm). Set max_grad_norm=0 in "
            "TrainingArguments and clip in the optimizer: clip_grad_norm=..., "
            "clip_mode='previous' (one backward), exact clipping through gradient "
            "accumulation (accumulation_steps=K > 1), or clip_grad_value (docs/clipping.md).",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def report_grad_norm(trainer: Any, optimizer: Any = None) -> None:
    """Make ``trainer`` log ``optimizer.last_grad_norm`` (default: ``trainer.optimizer``) as its
    ``grad_norm``: a ``GradNormCallback`` first among its callbacks (once; a callback for another
    optimizer is replaced). The optimizers call it at their first ``step()`` under a Trainer."""
    if not hasattr(getattr(trainer, "callback_handler", None), "callbacks"):
        raise TypeError("report_grad_norm: trainer must be a transformers.Trainer, got "
                        f"{type(trainer).__name__}")
    cls = _callback_class()
    if optimizer is None:
        optimizer = trainer.optimizer
    optimizer = _in_backward(optimizer, "report_grad_norm: optimizer")
    callbacks = trainer.callback_handler.callbacks
    mine = [cb for cb in callbacks if isinstance(cb, cls)]
    if len(mine) == 1 and mine[0].optimizer is optimizer and callbacks[0] is mine[0]:
        return
    for cb in mine:
        callbacks.remove(cb)
    callbacks.insert(0, cls(optimizer))


def check_training_args(args, *, strict: bool = True,
                        accumulation_steps: Optional[int] = None) -> None:
    """Refuse ``TrainingArguments`` that cannot work with in-backward updates (see module doc).

    ``accumulation_steps``: the optimizer's (None: it will be ``gradient_accumulation_steps``, as
    ``make_trainer_optimizers`` makes it). ``strict=False`` turns the ``max_grad_norm`` error
    into a warning (the run works, but no clipping happens and the logged ``grad_norm`` is 0)."""
    _training_args(args, "check_training_args: args",
                   ("gradient_accumulation_steps", "fp16", "max_grad_norm"))
    if not isinstance(strict, bool):
        raise TypeError(f"check_training_args: strict must be True or False, got {strict!r}")
    if accumulation_steps is not None:
        integer(accumulation_steps, "check_training_args: accumulation_steps", ge=1)
    gas = getattr(args, "gradient_accumulation_steps", 1) or 1
    if accumulation_steps is not None and gas != accumulation_steps:
        raise ValueError(
            f"gradient_accumulation_steps={gas}, but the optimizer has accumulation_steps="
            f"{accumulation_steps}: the in-backward optimizers accumulate the micro-batches' "
            "gradients themselves and apply them at the Trainer's optimizer.step(); create the "
            f"optimizer with accumulation_steps={gas} (make_trainer_optimizers does it)."
        )
    if getattr(args, "fp16", False):
        raise ValueError(
            "fp16=True (AMP with a GradScaler) does not work with in-backward updates: the "
            "scaler's loss scale never reaches the update and GradScaler.step finds no gradient. "
            "Use bf16=True, or fp16/bf16 parameters without AMP."
        )
    mgn = getattr(args, "max_grad_norm", 0) or 0
    if mgn > 0:
        how = (f"clip_grad_norm={mgn} (exact: the optimizer accumulates the micro-batches)"
               if gas > 1 else f"clip_grad_norm={mgn}, clip_mode='previous' (global norm, one "
               "backward)")
        msg = (
            f"max_grad_norm={mgn}: the Trainer clips gradients after backward, when Lomo/AdaLomo "
            "have already applied and freed them (or, accumulating, hold them in their own "
            f"buffers): nothing is clipped. Set max_grad_norm=0 and clip in the optimizer: {how}, "
            "exact clipping through gradient accumulation (accumulation_steps=K > 1), "
            "or clip_grad_value."
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)


def make_trainer_optimizers(model, args=None, optimizer: str = "adalomo", *,
                            lr: float | None = None, num_training_steps: int | None = None,
                            strict: bool = True, **optimizer_kwargs):
    """``(optimizer, scheduler)`` for ``Trainer(..., optimizers=(optimizer, scheduler))``.

    model: the model the Trainer trains (its trainable parameters get the hooks).
    args: the ``TrainingArguments`` (checked by ``check_training_args``; its ``learning_rate``,
        ``lr_scheduler_type``, ``warmup_steps``, ``lr_scheduler_kwargs`` and ``max_steps`` build
        the scheduler). None: no checks, no scheduler.
    optimizer: ``"adalomo"``, ``"lomo"``, ``"golore"`` or ``"galore"`` (or an already-built
        instance of one of them).
    lr: the base lr (default ``args.learning_rate``; AdaLomo's is relative to ``rms(p)``).
    num_training_steps: for the scheduler when ``args.max_steps`` is not set. If neither is
        known the scheduler is None and the Trainer builds its own (same type) in ``train()``.
    strict: False turns a ``max_grad_norm > 0`` error into a warning.
    optimizer_kwargs: passed to the optimizer (``clip_grad_value``, ``weight_decay``,
        ``backend``, ``rounding``, ``seed``, ...); ``accumulation_steps`` defaults to
        ``args.gradient_accumulation_steps``. ``clip_grad_norm`` needs ``clip_mode="previous"``
        (one backward per step) unless the optimizer accumulates (K > 1: the exact mode clips
        the window); the exact mode of K=1 needs the two-pass ``grad_norm`` +
        ``fused_backward`` loop, which the Trainer does not run (refused here, before the
        optimizer is built).

    Example::

        args = TrainingArguments("out", learning_rate=1e-3, max_steps=1000, max_grad_norm=0,
                                 lr_scheduler_type="cosine", warmup_steps=50)
        opt, sched = make_trainer_optimizers(model, args, "adalomo", clip_grad_value=1.0)
        Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched)).train()
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError("make_trainer_optimizers: model must be the torch.nn.Module the Trainer "
                        f"trains, got {type(model).__name__}")
    if num_training_steps is not None:
        integer(num_training_steps, "make_trainer_optimizers: num_training_steps", ge=1)
    if args is not None:
        _training_args(args, "make_trainer_optimizers: args", ("gradient_accumulation_steps",))
    gas = (getattr(args, "gradient_accumulation_steps", 1) or 1) if args is not None else 1
    if isinstance(optimizer, InBackwardOptimizer):
        k = optimizer.accumulation_steps
    else:
        k = optimizer_kwargs.setdefault("accumulation_steps", gas)
    if args is not None:
        check_training_args(args, strict=strict, accumulation_steps=k)
        if lr is None:
            _training_args(args, "make_trainer_optimizers: args", ("learning_rate",))
    elif not isinstance(strict, bool):
        raise TypeError(f"make_trainer_optimizers: strict must be True or False, got {strict!r}")
    if (optimizer_kwargs.get("clip_grad_norm") is not None and k == 1
            and optimizer_kwargs.get("clip_mode", "exact") == "exact"):
        raise ValueError(
            "clip_grad_norm with clip_mode='exact' needs the gradient norm before the update, "
            "which the Trainer's single loss.backward() cannot give (it would train unclipped). "
            f"Ways to clip: {ALTERNATIVES}. Or use clip_grad_value (element-wise)."
        )
    if lr is None:
        lr = args.learning_rate if args is not None else 1e-3
    classes = {"adalomo": AdaLomo, "lomo": Lomo, "golore": GoLore, "galore": GaLore}
    if isinstance(optimizer, InBackwardOptimizer):
        opt = optimizer
    elif isinstance(optimizer, str) and optimizer in classes:
        opt = classes[optimizer](model, lr=lr, **optimizer_kwargs)
    else:
        raise (ValueError if isinstance(optimizer, str) else TypeError)(
            f"optimizer must be one of {sorted(classes)} or an instance of Lomo, AdaLomo, "
            f"GoLore or GaLore, got {optimizer!r}"
        )

    if args is not None:
        opt._trainer_args_checked = True  # check_training_args has said what there is to say
    scheduler = None
    if args is not None:
        steps = num_training_steps
        if steps is None and getattr(args, "max_steps", -1) and args.max_steps > 0:
            steps = args.max_steps
        if steps is not None:
            from transformers import get_scheduler

            scheduler = get_scheduler(
                args.lr_scheduler_type,
                optimizer=opt,
                num_warmup_steps=args.get_warmup_steps(steps),
                num_training_steps=steps,
                scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
            )
    return opt, scheduler
