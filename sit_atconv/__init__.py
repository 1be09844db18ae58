"""sit_atconv: SiT diffusion transformers and AttNet CNNs built on Attentive Convolution.

Importing the package registers the AttNet variants with timm (`timm.create_model("attnet_t2")`).
"""

from . import models  # noqa: F401  (registers attnet_* with timm)

__version__ = "0.1.0"
