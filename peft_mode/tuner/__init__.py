"""The MoDE tuner for PEFT: configuration, layers, tuner model and registration."""

from .config import DEFAULT_TARGET_MODULES, MoDEConfig
from .layer import MoDELayer, MoDELinear, MoDEMergeError
from .model import MoDEModel
from .peft_type import MODE_PEFT_TYPE
from .registration import register

register()

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "MODE_PEFT_TYPE",
    "MoDEConfig",
    "MoDELayer",
    "MoDELinear",
    "MoDEMergeError",
    "MoDEModel",
    "register",
]
