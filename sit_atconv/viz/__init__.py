"""Pictures of what a trained SiT's token mixers do (`python -m sit_atconv.viz kernels --ckpt RUN`).

`mixers` reads ATConv's per-sample kernels and attention maps off one forward pass (hooks; the operators' own
code); `draw` lays them out with matplotlib; `kernels` ties a run to a PNG.
"""

from .draw import KernelPicture, draw_picture
from .kernels import kernel_picture, write_kernel_picture
from .mixers import attention_maps, inhibition_strength, mixer_pictures

__all__ = ["KernelPicture", "attention_maps", "draw_picture", "inhibition_strength", "kernel_picture",
           "mixer_pictures", "write_kernel_picture"]
