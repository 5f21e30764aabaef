"""lomo_kernels: fused LOMO / AdaLomo / GoLore updates inside the backward pass, with native
(C++/CUDA), Triton and pure-PyTorch backends. See README.md."""

from . import ops, reference
from .ops import available_backends
from .optim import (
    AdaLomo,
    DynamicLossScaler,
    GaLore,
    GoLore,
    Lomo,
    LossScaleOverflowWarning,
    NonFiniteGradientWarning,
)

__version__ = "0.1.0"

__all__ = [
    "Lomo", "AdaLomo", "GoLore", "GaLore", "DynamicLossScaler", "NonFiniteGradientWarning",
    "LossScaleOverflowWarning",
    "available_backends", "ops", "reference", "__version__",
]
