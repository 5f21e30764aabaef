"""lomo_kernels: fused LOMO / AdaLomo / GoLore updates inside the backward pass, with native
(C++/CUDA), Triton and pure-PyTorch backends. See README.md, docs/spec.md (the numerical
contract) and docs/design.md (the architecture)."""

from . import ops, reference
from .ops import BackendFallbackWarning, available_backends
from .optim import (
    AdaLomo,
    DynamicLossScaler,
    GaLore,
    GoLore,
    GradNormSpikeWarning,
    InBackwardOptimizer,
    IndependentRanksWarning,
    Lomo,
    LossScaleOverflowWarning,
    NonFiniteGradientWarning,
    OptimizerReplacedWarning,
)
from . import hf as _hf  # noqa: F401  (registers the transformers.Trainer check of the first step())

__version__ = "0.1.0"

__all__ = [
    "Lomo", "AdaLomo", "GoLore", "GaLore", "InBackwardOptimizer", "DynamicLossScaler",
    "NonFiniteGradientWarning", "LossScaleOverflowWarning", "OptimizerReplacedWarning",
    "BackendFallbackWarning", "IndependentRanksWarning", "GradNormSpikeWarning",
    "available_backends", "ops", "reference", "__version__",
]
