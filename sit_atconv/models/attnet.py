"""AttNet (SPEC §3): a 4-stage CNN whose token mixer is ATConv, registered with timm.

Variants are rows of `ATTNET_VARIANTS`; module names follow the reference code so its published
ImageNet weights load unchanged (`stages.{i}.{j}.token_mixer.kernel_proj.weight`, ...).
The model follows timm's backbone interface (`forward_features` unpooled, `forward_head`,
`reset_classifier`, `forward_intermediates`, `features_only=True`, grad checkpointing, FX tracing
with ATConv as a leaf module); `timm.create_model("attnet_t2")` builds it with its pretrained cfg.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, RmsNorm2d, SelectAdaptivePool2d, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm's own models import it from here
from torch import Tensor, nn

from ..layers.atconv import ATConv

# ATConv picks its depthwise-conv implementation from runtime shapes and devices and runs custom autograd
# Functions: FX traces it as one call (timm's feature extractors and tests pass this leaf list to the tracer).
register_notrace_module(ATConv)


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


def _global_pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's selectable global pool to (B, C); '' passes the map through. Concatenating pools ('catavgmax')
    would double the width the head LayerNorm and classifier are sized for, so they are refused."""
    if "cat" in pool_type:
        raise ValueError(f"global_pool={pool_type!r} is not supported; use 'avg', 'max', 'avgmax' or ''.")
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


class AttNet(nn.Module):
    """AttNet classifier: stem, 4 stages of ATConv blocks with stride-2 ConvBN between, GAP + LN + head.

    timm attributes: `num_features` = `head_hidden_size` = dims[-1] (channels of `forward_features`, width of
    the pre-logits), `feature_info` (one entry per stage: channels, stride, module name).
    """

    def __init__(self, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), exp_rates=(4, 4, 4, 4),
                 glu_norm: bool = True, layer_scale: bool = True, drop_path_rate: float = 0.0,
                 num_classes: int = 1000, in_chans: int = 3, kernel_size: int = 3,
                 kernel_pool: str = "sequence", drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        self.num_classes, self.num_features = num_classes, dims[-1]
        self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        stem = nn.Sequential(ConvBN(in_chans, dims[0] // 2), nn.GELU(), ConvBN(dims[0] // 2, dims[0]))
        self.downsample_layers = nn.ModuleList([stem] + [ConvBN(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear drop-path schedule
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(*(AttNetBlock(dims[i], exp_rates[i], rates[starts[i] + j], layer_scale, glu_norm,
                                        kernel_size, kernel_pool) for j in range(depths[i])))
            for i in range(len(dims)))
        # the stem divides by 4, every later downsampler by 2
        self.feature_info = [{"num_chs": dim, "reduction": 4 * 2 ** i, "module": f"stages.{i}"}
                             for i, dim in enumerate(dims)]
        self.global_pool = _global_pool(global_pool)
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

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's `checkpoint_seq`): less memory, same outputs."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for `num_classes` (0: none, `forward` gives pre-logits); `global_pool` '' keeps the map."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _global_pool(global_pool)
        ref = next(self.parameters())
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    def _stage(self, i: int, x: Tensor) -> Tensor:
        """Downsampler i, then stage i (block by block under checkpointing)."""
        x = self.downsample_layers[i](x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages[i], x)
        return self.stages[i](x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-stage feature map (B, C, H/32, W/32), unpooled."""
        for i in range(len(self.stages)):
            x = self._stage(i, x)
        return x

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs at `indices` (timm: None all, int the last n, list by index) and the final map.

        `norm` exists for timm's interface: AttNet has no norm before pooling (its LayerNorm acts on the
        pooled features), so intermediates are never normed. With `stop_early` the stages after the last
        requested one are skipped and the returned final map is that stage's output.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; AttNet features are 'NCHW'.")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early else len(self.stages) - 1
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the requested intermediates do not need: later stages, the head norm, the classifier."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if prune_norm or prune_end:  # the head norm is sized for the last stage
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global pool, head LayerNorm, dropout, classifier (pre_logits: stop before it). With global_pool ''
        the norm and classifier act on the channels at every position and the output stays (B, *, H, W)."""
        spatial = self.global_pool.is_identity()
        x = self.global_pool(x)
        if spatial:
            x = x.permute(0, 2, 3, 1)
        x = self.head_drop(self.norm(x))
        if not pre_logits:
            x = self.head(x)
        return x.permute(0, 3, 1, 2) if spatial else x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# timm pretrained cfg of the reference's ImageNet-1k weights (SPEC §3: 224px, bicubic, crop 0.875, ImageNet
# mean/std). They are not downloadable here, so there is no url / hf_hub_id; load them with convert.py.
_IN1K_CFG = {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
             "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
             "first_conv": "downsample_layers.0.0.0", "classifier": "head", "paper_ids": "arXiv:2510.20092"}
default_cfgs = generate_default_cfgs({f"attnet_{variant}.in1k": _IN1K_CFG for variant in ATTNET_VARIANTS})


def create_attnet(name: str, pretrained: bool = False, **kwargs) -> AttNet:
    """Build an AttNet variant by name ("attnet_t2" or "t2") through timm's builder (pretrained cfg,
    `features_only`, `out_indices`); kwargs override the variant's row."""
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
    # features_only: every stage by default, served by forward_intermediates (stages interleave with downsamplers)
    feature_cfg = {"out_indices": tuple(range(len(args["dims"]))), "feature_cls": "getter"}
    return build_model_with_cfg(AttNet, f"attnet_{key}", pretrained=False, feature_cfg=feature_cfg, **args)


def _register(variant: str) -> None:
    def factory(pretrained: bool = False, **kwargs) -> AttNet:
        """timm entry point (pretrained_cfg, features_only, ... pass through to timm's builder)."""
        return create_attnet(variant, pretrained=pretrained, **kwargs)

    factory.__name__ = factory.__qualname__ = f"attnet_{variant}"
    factory.__doc__ = f"AttNet-{variant.upper()} (SPEC §3)."
    factory.__module__ = __name__
    register_model(factory)


for _variant in ATTNET_VARIANTS:
    _register(_variant)
