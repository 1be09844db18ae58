"""Building blocks shared by the SiT and AttNet families."""

from .atconv import ATConv, generate_kernels, lateral_inhibition, pool_features, pooling_matrix
from .depthwise import dynamic_depthwise_conv

__all__ = ["ATConv", "dynamic_depthwise_conv", "generate_kernels", "lateral_inhibition", "pool_features",
           "pooling_matrix"]
