from ._base import GradNormSpikeWarning, InBackwardOptimizer, NonFiniteGradientWarning
from ._sharding import IndependentRanksWarning
from ._ownership import OptimizerReplacedWarning
from .adalomo import AdaLomo
from .golore import GaLore, GoLore
from .lomo import Lomo
from .loss_scaler import DynamicLossScaler, LossScaleOverflowWarning

__all__ = [
    "Lomo", "AdaLomo", "GoLore", "GaLore", "InBackwardOptimizer", "DynamicLossScaler",
    "NonFiniteGradientWarning", "LossScaleOverflowWarning", "OptimizerReplacedWarning",
    "IndependentRanksWarning", "GradNormSpikeWarning",
]
