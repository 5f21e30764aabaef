from ._base import GradNormSpikeWarning, InBackwardOptimizer, NonFiniteGradientWarning
from ._ownership import OptimizerReplacedWarning
from .adalomo import AdaLomo
from .lomo import Lomo
from .loss_scaler import DynamicLossScaler, LossScaleOverflowWarning

__all__ = [
    "Lomo", "AdaLomo", "InBackwardOptimizer", "DynamicLossScaler", "NonFiniteGradientWarning",
    "LossScaleOverflowWarning", "OptimizerReplacedWarning", "GradNormSpikeWarning",
]
