"""Masked-off lanes of a ``tl.load`` without ``other=`` read poison in the Triton interpreter.

Triton leaves such a lane undefined (a GPU may read anything there); the interpreter fills it with
zeros, which hides a kernel that sums or flags every lane. tests/conftest.py installs this for the
whole test run when the kernels run in the interpreter, so every Triton test fails on a masked load
that forgot its ``other=`` and lets the garbage reach a result: float lanes read NaN (bf16: its
NaN pattern), integer lanes -1. ``LOMO_KERNELS_TRITON_POISON=0`` turns it off (the interpreter's
own zeros).
"""

import os

import numpy as np

ENV = "LOMO_KERNELS_TRITON_POISON"


def enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(ENV, "1") != "0"


def poisoned(original):
    """``InterpreterBuilder.create_masked_load`` with poison for a missing ``other``."""
    from triton.runtime import interpreter as interp

    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        if other is None:
            dtype_tt = ptrs.get_element_ty()
            dtype_np = interp._get_np_dtype(dtype_tt)
            if dtype_tt == interp.tl.bfloat16:
                fill = np.full_like(ptrs.data, 0x7FC0, dtype=dtype_np)
            elif np.issubdtype(dtype_np, np.floating):
                fill = np.full_like(ptrs.data, np.nan, dtype=dtype_np)
            else:
                fill = np.full_like(ptrs.data, -1, dtype=dtype_np)
            other = interp.TensorHandle(fill, dtype_tt)
        return original(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    create_masked_load.poisons = True
    return create_masked_load


def installed() -> bool:
    from triton.runtime import interpreter as interp

    return getattr(interp.InterpreterBuilder.create_masked_load, "poisons", False)


def install() -> None:
    """Poison the interpreter's masked loads for the rest of the process (idempotent)."""
    from triton.runtime import interpreter as interp

    if not installed():
        builder = interp.InterpreterBuilder
        builder.create_masked_load = poisoned(builder.create_masked_load)
