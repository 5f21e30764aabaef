"""Counting the memory that torch ops allocate, on any device (the meta device included).

``AllocationTracker`` is a dispatch mode that records the storage size of every tensor a
(non-view, non-in-place) torch op returns while it is active, and the peak of their live total
(a tensor counts until its last Python reference dies). Native kernels' internal scratch and
LAPACK workspaces are not seen; everything written in Python (GEMMs, QR, casts, ...) is. The
tests use it to show that an update creates no weight-sized temporary, the benchmarks to measure
the SVD refresh's working set for real model shapes on the meta device (nothing is computed).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    """``with AllocationTracker() as tr: ...`` then ``tr.sizes`` (bytes of every new tensor, in
    order), ``tr.largest`` and ``tr.peak`` (most bytes alive at once)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []
        self.live = 0
        self.peak = 0

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out  # views of, or writes into, storages that exist already
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or any(t is a for a in inputs):
                continue
            nbytes = t.untyped_storage().nbytes()
            self.sizes.append(nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, nbytes)
        return out
