"""AttNet (SPEC §3): a 4-stage CNN whose token mixer is ATConv, registered with timm.

Variants are rows of `ATTNET_VARIANTS`; module names follow the reference code so its published
ImageNet weights load unchanged (`stages.{i}.{j}.token_mixer.kernel_proj.weight`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, RmsNorm2d, trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from ..layers.atconv import ATConv


@dataclass(frozen=True)
class AttNetVariant:
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    exp_rates: tuple[float, ...]
    glu_norm: bool
    layer_scale: bool
    drop_path_rate: float


ATTNET_VARIANTS: dict[str, AttNetVariant] = {
    "xxs": AttNetVariant((2, 2, 4, 2), (32, 64, 128, 240), (8, 8, 4, 4), False, False, 0.02),
    "xs": AttNetVariant((2, 2, 7, 2), (40, 80, 160, 320), (8, 8, 4, 4), False, True, 0.02),
    "s": AttNetVariant((2, 3, 10, 3), (40, 80, 160, 320), (8, 8, 4, 4), False, False, 0.1),
    "t1": AttNetVariant((2, 3, 12, 3), (48, 96, 224, 384), (8, 8, 4, 4), True, True, 0.1),
    "t2": AttNetVariant((3, 3, 16, 3), (64, 128, 288, 512), (8, 8, 4, 4), True, True, 0.2),
    "t3": AttNetVariant((4, 4, 26, 4), (72, 144, 320, 576), (8, 8, 4, 4), True, True, 0.4),
    "t4": AttNetVariant((5, 5, 28, 5), (96, 192, 384, 768), (8, 8, 4, 4), True, True, 0.5),
}


class ConvBN(nn.Sequential):
    """Conv k x k (stride 2, no bias) + BatchNorm: the stem halves and the stage downsamplers."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


class LayerScale(nn.Module):
    """Per-channel residual scale, initialised small (1e-6)."""

    def __init__(self, dim: int, init_value: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class GLU(nn.Module):
    """Gated channel mixer: 1x1 to 2h, split (x, v), act(dwconv3x3(x)) * v, [RMSNorm], 1x1 back."""

    def __init__(self, dim: int, hidden: int, norm: bool, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden * 2, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.norm_layer = RmsNorm2d(hidden, eps=1e-6) if norm else nn.Identity()
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x, v = self.fc1(x).chunk(2, dim=1)
        x = self.drop(self.norm_layer(self.act(self.dwconv(x)) * v))
        return self.drop(self.fc2(x))


class AttNetBlock(nn.Module):
    """Pre-norm residual block: LN2d -> ATConv -> [LayerScale] -> DropPath; LN2d -> GLU -> ..."""

    def __init__(self, dim: int, exp_rate: float, drop_path: float, layer_scale: bool, glu_norm: bool,
                 kernel_size: int = 3, kernel_pool: str = "sequence"):
        super().__init__()
        self.norm_1 = LayerNorm2d(dim, eps=1e-6)
        self.token_mixer = ATConv(dim, kernel_size, layout="image", act="gelu", kernel_pool=kernel_pool)
        self.norm_2 = LayerNorm2d(dim, eps=1e-6)
        self.channel_mixer = GLU(dim, int(2 * int(dim * exp_rate) / 3), glu_norm)
        self.layer_scale_1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.layer_scale_2 = LayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.layer_scale_1(self.token_mixer(self.norm_1(x))))
        return x + self.drop_path(self.layer_scale_2(self.channel_mixer(self.norm_2(x))))


class AttNet(nn.Module):
    """AttNet classifier: stem, 4 stages of ATConv blocks with stride-2 ConvBN between, GAP + LN + head."""

    def __init__(self, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), exp_rates=(4, 4, 4, 4),
                 glu_norm: bool = True, layer_scale: bool = True, drop_path_rate: float = 0.0,
                 num_classes: int = 1000, in_chans: int = 3, kernel_size: int = 3,
                 kernel_pool: str = "sequence", drop_rate: float = 0.0):
        super().__init__()
        self.num_classes, self.num_features = num_classes, dims[-1]
        stem = nn.Sequential(ConvBN(in_chans, dims[0] // 2), nn.GELU(), ConvBN(dims[0] // 2, dims[0]))
        self.downsample_layers = nn.ModuleList([stem] + [ConvBN(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear drop-path schedule
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(*(AttNetBlock(dims[i], exp_rates[i], rates[starts[i] + j], layer_scale, glu_norm,
                                        kernel_size, kernel_pool) for j in range(depths[i])))
            for i in range(len(dims)))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-5)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-stage feature map (B, C, H/32, W/32)."""
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.norm(x.mean(dim=(-2, -1))))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _default_cfg(num_classes: int = 1000) -> dict:
    return {"url": "", "num_classes": num_classes, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "downsample_layers.0.0.0", "classifier": "head"}


def create_attnet(name: str, pretrained: bool = False, **kwargs) -> AttNet:
    """Build an AttNet variant by name ("attnet_t2" or "t2"); kwargs override the variant's row."""
    key = name.lower().removeprefix("attnet_")
    if key not in ATTNET_VARIANTS:
        valid = ", ".join(f"attnet_{v}" for v in ATTNET_VARIANTS)
        raise ValueError(f"unknown AttNet variant {name!r}; valid names: {valid}.")
    if pretrained:
        raise ValueError("pretrained=True: no weights are bundled; load the authors' checkpoint with "
                         "sit_atconv.convert.load_reference_checkpoint(model, path).")
    variant = ATTNET_VARIANTS[key]
    args = {"depths": variant.depths, "dims": variant.dims, "exp_rates": variant.exp_rates,
            "glu_norm": variant.glu_norm, "layer_scale": variant.layer_scale,
            "drop_path_rate": variant.drop_path_rate}
    args.update(kwargs)
    model = AttNet(**args)
    model.default_cfg = model.pretrained_cfg = _default_cfg(model.num_classes)
    return model


def _register(variant: str) -> None:
    def factory(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                **kwargs) -> AttNet:
        """timm entry point; timm's hub/cache options are accepted and unused (no bundled weights)."""
        return create_attnet(variant, pretrained=pretrained, **kwargs)

    factory.__name__ = factory.__qualname__ = f"attnet_{variant}"
    factory.__doc__ = f"AttNet-{variant.upper()} (SPEC §3)."
    factory.__module__ = __name__
    register_model(factory)


for _variant in ATTNET_VARIANTS:
    _register(_variant)
