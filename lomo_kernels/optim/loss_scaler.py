"""Dynamic loss scaling for fp16 LOMO, with lomo-optim's arguments and defaults (except the
initial scale: 2**16 instead of 2**32).

Differences from ``lomo_optim.lomo.DynamicLossScaler`` (0.1.1), on purpose:
  * overflow is detected from the device-side gradient norm after the backward (one check a step),
    not by a host-synchronising ``float(grad.sum())`` per parameter inside every hook;
  * it runs without ``torch.distributed`` (lomo-optim's message calls ``get_rank()`` and crashes
    when no process group exists);
  * the scale grows after ``scale_window`` overflow-free steps (lomo-optim never calls
    ``update_scale(False)``, so its scale can only shrink).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict

from .._checks import integer, number
from .._stack import user_stacklevel

#: The initial scale. lomo-optim starts at 2**32, which overflows float16 gradients for about 16
#: steps (each skipped) before the scale is small enough; torch.amp.GradScaler starts at 2**16.
DEFAULT_INIT_SCALE = 2.0**16


class LossScaleOverflowWarning(RuntimeWarning):
    """An fp16 overflow was found in the gradients: the step was skipped, the scale reduced."""


class DynamicLossScaler:
    """Dynamic loss scaling: halve the scale on overflow (the step is skipped), double it after
    ``scale_window`` steps without one. Arguments as lomo-optim's, except ``init_scale``'s
    default (2**16, see ``DEFAULT_INIT_SCALE``)."""

    def __init__(
        self,
        init_scale: float = DEFAULT_INIT_SCALE,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_scale: float = 1,
        delayed_shift: int = 1,
        consecutive_hysteresis: bool = False,
        raise_error_at_min_scale: bool = True,
        dtype: Any = None,
    ) -> None:
        self._check("DynamicLossScaler: {}", init_scale=init_scale, scale_factor=scale_factor,
                    scale_window=scale_window, min_scale=min_scale, delayed_shift=delayed_shift)
        self.cur_scale = float(init_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.delayed_shift = int(delayed_shift)
        self.cur_hysteresis = int(delayed_shift)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_error_at_min_scale = bool(raise_error_at_min_scale)

    @staticmethod
    def _check(name: str, init_scale: float = DEFAULT_INIT_SCALE, scale_factor: float = 2.0,
               scale_window: int = 1000, min_scale: float = 1, delayed_shift: int = 1,
               **_: Any) -> None:
        number(init_scale, name.format("init_scale"), gt=0.0)
        number(scale_factor, name.format("scale_factor"), gt=1.0)
        integer(scale_window, name.format("scale_window"), ge=1)
        number(min_scale, name.format("min_scale"), gt=0.0)
        integer(delayed_shift, name.format("delayed_shift"), ge=1)
        if min_scale > init_scale:
            raise ValueError(f"{name.format('min_scale')} ({min_scale}) must be <= "
                             f"{name.format('init_scale')} ({init_scale})")

    @classmethod
    def check_args(cls, args: Dict[str, Any], name: str) -> None:
        """Check ``args`` (keyword arguments of the constructor; ``name``: what to call them)."""
        accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
        for key in args:
            if key not in accepted:
                raise TypeError(f"{name}: unknown argument {key!r}; accepted: {', '.join(accepted)}")
        cls._check(name + "['{}']", **args)

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise RuntimeError(
                        "lomo_kernels: fp16 gradients overflow at the minimum loss scale "
                        f"({self.min_scale}); cannot decrease the scale any further"
                    )
                next_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                warnings.warn(
                    f"[lomo_kernels] fp16 overflow: step skipped, loss scale {self.cur_scale:g} -> "
                    f"{next_scale:g}",
                    LossScaleOverflowWarning,
                    stacklevel=user_stacklevel(),
                )
                self.cur_scale = next_scale
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
