"""Triton kernels of lomo_kernels, installed as ``lomo_kernels.triton_kernels`` (never import the
folder as a top-level ``triton_kernels``: that name belongs to a package Triton publishes).

The ops take exactly the positional arguments of the functions of the same name in
``lomo_kernels.reference``; ``lomo_kernels.ops`` registers them for CUDA tensors and dispatches
``backend="triton"`` to them (CPU tensors only under ``TRITON_INTERPRET=1``).
``workspace_numel(op, shapes)`` sizes the workspace of the op contract; ``launches(op, shape)``
counts the kernel launches of one call.
"""

import math

from . import adalomo_update as _adalomo
from . import grad_accumulate as _accumulate
from . import launch
from . import lomo_update as _lomo
from .adalomo_update import adalomo_update_, adalomo_update_multi_
from .golore_update import golore_update_
from .grad_accumulate import grad_accumulate_
from .lomo_update import lomo_update_, lomo_update_multi_

__all__ = ["lomo_update_", "adalomo_update_", "lomo_update_multi_", "adalomo_update_multi_",
           "golore_update_", "grad_accumulate_", "workspace_numel", "launches"]


def workspace_numel(op: str, shapes) -> int:
    """float32 workspace elements ``op`` needs on this backend: single-tensor ops, enough for any
    one of ``shapes``; multi-tensor ops, for the whole list in one call. O(rows + cols + tiles)
    (the AdaLomo partials are one float per row per column tile and per column per row tile)."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if op == "lomo_update_":
        return launch.workspace_numel(_lomo.need(s) for s in shapes)
    if op == "adalomo_update_":
        return launch.workspace_numel(_adalomo.need(s) for s in shapes)
    if op == "lomo_update_multi_":
        return launch.workspace_numel([_lomo.multi_need(shapes)])
    if op == "adalomo_update_multi_":
        return launch.workspace_numel([_adalomo.multi_need(shapes)])
    if op == "grad_accumulate_":
        return launch.workspace_numel(_accumulate.need(s) for s in shapes)
    raise ValueError(f"unknown op {op!r}")


def launches(op: str, shape, stage: int = 0, dtypes=None) -> int:
    """Kernel launches of one call of ``op`` on the Triton backend, with a workspace (nothing else
    is launched: no allocation, no memset; the multi-tensor ops add one host-to-device copy).
    What bench/ models and what the tests observe.

    ``shape``: the parameter's shape (single-tensor ops) or the list of shapes (multi-tensor ops;
    ``dtypes``: their dtypes, one launch group per dtype; default: one dtype)."""
    if op in ("lomo_update_", "grad_accumulate_"):
        return 1 if math.prod(shape) else 0
    if op == "adalomo_update_":
        return _adalomo.launches(tuple(shape), stage)
    if op in ("lomo_update_multi_", "adalomo_update_multi_"):
        dtypes = list(dtypes) if dtypes is not None else [None] * len(shape)
        groups: dict = {}
        for s, d in zip(shape, dtypes):
            if math.prod(s):
                groups.setdefault(d, []).append(tuple(s))
        return len(groups)
    raise ValueError(f"unknown op {op!r}")
