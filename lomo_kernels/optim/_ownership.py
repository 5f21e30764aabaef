"""One owner per parameter: a process-wide weak map says which optimizer's post-accumulate-grad
hook updates each parameter. The hooks hold their optimizer weakly and a finalizer removes them
when it is garbage-collected, so an optimizer nobody references stops updating at once."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, List, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

# parameter -> weakref to the optimizer whose hook updates it
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class OptimizerReplacedWarning(UserWarning):
    """A new optimizer took over parameters that another live optimizer updated; the old one was
    detached from all its parameters."""


def make_hook(ref: "weakref.ref[Any]") -> Callable[[torch.Tensor], None]:
    """The post-accumulate-grad hook: holds its optimizer weakly, so that it can be collected."""

    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._hook(p)

    return hook


def remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def other_owners(opt: Any, params: Iterable[torch.Tensor]) -> List[Tuple[Any, list]]:
    """The live, attached optimizers other than ``opt`` that own some of ``params``, each with
    the parameters it owns."""
    found: dict = {}
    for p in params:
        ref = _OWNERS.get(p)
        owner = ref() if ref is not None else None
        if owner is not None and owner is not opt and owner._hook_handles:
            found.setdefault(id(owner), (owner, []))[1].append(p)
    return list(found.values())


def claim(ref: "weakref.ref[Any]", p: torch.Tensor) -> None:
    _OWNERS[p] = ref


def release(opt: Any, params: Iterable[torch.Tensor]) -> None:
    """Forget ``opt`` as the owner of those of ``params`` it owns."""
    for p in params:
        ref = _OWNERS.get(p)
        if ref is not None and ref() is opt:
            del _OWNERS[p]
