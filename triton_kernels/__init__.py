"""Triton kernels of lomo_kernels, installed as ``lomo_kernels.triton_kernels`` (never import the
folder as a top-level ``triton_kernels``: that name belongs to a package Triton publishes).

``lomo_update_``, ``adalomo_update_`` and ``golore_update_`` take exactly the positional arguments of the functions of
the same name in ``lomo_kernels.reference``; ``lomo_kernels.ops`` registers them for CUDA tensors
and dispatches ``backend="triton"`` to them (CPU tensors only under ``TRITON_INTERPRET=1``).
"""

from .adalomo_update import adalomo_update_
from .golore_update import golore_update_
from .lomo_update import lomo_update_

__all__ = ["lomo_update_", "adalomo_update_", "golore_update_"]
