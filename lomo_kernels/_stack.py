"""Where a warning should point: the first frame outside lomo_kernels and torch (the user's)."""

from __future__ import annotations

import os
import sys

import torch

_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                       for f in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function."""
    level, f = 1, sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level += 1
        f = f.f_back
    return level
