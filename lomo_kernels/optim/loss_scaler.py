"""Dynamic loss scaling for fp16 LOMO, with lomo-optim's arguments and defaults.

Differences from ``lomo_optim.lomo.DynamicLossScaler`` (0.1.1), on purpose:
  * overflow is detected from the device-side gradient norm after the backward (one check a step),
    not by a host-synchronising ``float(grad.sum())`` per parameter inside every hook;
  * it runs without ``torch.distributed`` (lomo-optim's message calls ``get_rank()`` and crashes
    when no process group exists);
  * the scale grows after ``scale_window`` overflow-free steps (lomo-optim never calls
    ``update_scale(False)``, so its scale can only shrink).
"""

from __future__ import annotations

import warnings


class LossScaleOverflowWarning(RuntimeWarning):
    """An fp16 overflow was found in the gradients: the step was skipped, the scale reduced."""


class DynamicLossScaler:
    def __init__(
        self,
        init_scale=2**32,
        scale_factor=2.0,
        scale_window=1000,
        min_scale=1,
        delayed_shift=1,
        consecutive_hysteresis=False,
        raise_error_at_min_scale=True,
        dtype=None,
    ):
        if init_scale <= 0 or scale_factor <= 1 or scale_window < 1 or min_scale <= 0:
            raise ValueError(
                "DynamicLossScaler needs init_scale > 0, scale_factor > 1, scale_window >= 1 and "
                f"min_scale > 0; got {init_scale}, {scale_factor}, {scale_window}, {min_scale}"
            )
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
                    stacklevel=3,
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
