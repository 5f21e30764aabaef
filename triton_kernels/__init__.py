"""Triton kernels of lomo_kernels, installed as ``lomo_kernels.triton_kernels`` (never import the
folder as a top-level ``triton_kernels``: that name belongs to a package Triton publishes).

The ops take exactly the positional arguments of the functions of the same name in
``lomo_kernels.reference``; ``lomo_kernels.ops`` registers them for CUDA tensors and dispatches
``backend="triton"`` to them (CPU tensors only under ``TRITON_INTERPRET=1``).
``workspace_numel(op, shapes)`` sizes the workspace of the op contract; ``launches(op, shape)``
counts the kernel launches of one call.
"""

from . import adalomo_update as _adalomo
from . import grad_accumulate as _accumulate
from . import launch
from . import lomo_update as _lomo
from .adalomo_update import adalomo_update_, adalomo_update_multi_
from .golore_update import golore_update_
from .grad_accumulate import grad_accumulate_
from .launch import launches
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
