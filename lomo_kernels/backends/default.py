"""The default backend: the pure-PyTorch reference (lomo_kernels/reference.py) registered as every
op's ``CompositeExplicitAutograd`` implementation: what ``torch.ops.lomo_kernels.<op>`` runs on a
device no faster backend registered a kernel for. The emulated namespace has none (a missing
build is an error, not the reference)."""

from __future__ import annotations

import torch

from .. import _ops, reference


def register() -> None:
    for name in _ops.OPS:
        torch.library.impl(f"{_ops.NAMESPACE}::{name}", "CompositeExplicitAutograd")(
            getattr(reference, name))
