"""peft-mode: Mixture of Dyadic Experts (MoDE) adapters for PEFT.

``import peft_mode`` registers the "MODE" adapter type with peft, after which
`peft.get_peft_model` accepts a `MoDEConfig` and `peft.PeftModel.from_pretrained`
loads saved MoDE adapters.
"""

from .training.callback import RouterStatsCallback
from .tuner import MODE_PEFT_TYPE, MoDEConfig, MoDELayer, MoDELinear, MoDEMergeError, MoDEModel

__version__ = "0.1.0"

__all__ = [
    "MODE_PEFT_TYPE",
    "MoDEConfig",
    "MoDELayer",
    "MoDELinear",
    "MoDEMergeError",
    "MoDEModel",
    "RouterStatsCallback",
    "__version__",
]
