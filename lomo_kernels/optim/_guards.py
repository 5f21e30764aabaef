"""What in-backward updates cannot run under, found without importing anything heavy: compiled
autograd, and a transformers Trainer that clips gradients after backward."""

from __future__ import annotations

import sys
from typing import Any, Optional


def compiled_autograd_active() -> bool:
    """True inside a backward that compiled autograd runs (or traces)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(
        getattr(ca, "in_compiled_autograd_region", False)
        or getattr(ca, "compiled_autograd_enabled", False)
    )


def compiled_autograd_configured() -> bool:
    """True when ``torch._dynamo.config.compiled_autograd`` is set."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and bool(getattr(dynamo.config, "compiled_autograd", False))


def compiled_autograd_message(name: str) -> str:
    return (
        f"{name}: in-backward updates do not work under compiled autograd "
        "(torch._dynamo.compiled_autograd, torch._dynamo.config.compiled_autograd = True): "
        "it traces the gradient hooks into a graph once, so the per-step work of each update "
        "(step counts, optimizer state, the end-of-backward overflow check) would not run at "
        "every step. Run the backward without compiled autograd (the forward may still be "
        "torch.compile'd)."
    )


def calling_trainer_max_grad_norm(frame: Any) -> Optional[float]:
    """``args.max_grad_norm`` of the transformers Trainer among the callers from ``frame`` up,
    or None when no Trainer is calling (transformers.trainer is only looked up if imported)."""
    mod = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(mod, "Trainer", None) if mod is not None else None
    if trainer_cls is None:
        return None
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, trainer_cls):
            return getattr(getattr(obj, "args", None), "max_grad_norm", 0) or 0
        frame = frame.f_back
    return None


def with_note(exc: Exception, note: str) -> Exception:
    """``exc`` with ``note`` appended to its message, of the same type where it can be rebuilt."""
    msg = f"{exc} {note}"
    try:
        new = type(exc)(msg)
        if str(new) == msg:
            return new
    except Exception:
        pass
    return RuntimeError(f"{type(exc).__name__}: {msg}")
