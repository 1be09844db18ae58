"""Building blocks shared by the SiT and AttNet families."""

from .atconv import ATConv, dynamic_depthwise_conv, generate_kernels, lateral_inhibition, pooling_matrix

__all__ = ["ATConv", "dynamic_depthwise_conv", "generate_kernels", "lateral_inhibition", "pooling_matrix"]
