"""Model zoos: SiT with attention / ATConv / hybrid mixers, and the AttNet CNN family."""

from .attnet import ATTNET_VARIANTS, AttNet, create_attnet
from .sit import MIXERS, SIT_SIZES, SiT, create_sit, list_sit_models, mixer_pattern

__all__ = ["ATTNET_VARIANTS", "AttNet", "create_attnet", "MIXERS", "SIT_SIZES", "SiT", "create_sit",
           "list_sit_models", "mixer_pattern"]
