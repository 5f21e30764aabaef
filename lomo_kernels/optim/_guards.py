"""What in-backward updates cannot run under (compiled autograd), found without importing anything
heavy; and ``with_note``, which adds what a failed backward changed to its error."""

from __future__ import annotations

import sys


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
