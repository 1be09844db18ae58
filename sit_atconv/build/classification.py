"""Config -> the objects of a classification run: the AttNet, its data (digits or an image folder with
timm's transforms) and the classification task with timm's mixup/cutmix."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset

from ..config import RunConfig
from ..data import DigitsDataset, SeededItems
from ..errors import DataError
from ..models.attnet import AttNet
from ..tasks.classification import ClassificationTask


def build_classifier(cfg: RunConfig) -> nn.Module:
    """The AttNet `cfg.classifier` describes: a registered timm variant (with its default config) or an
    explicit architecture (default config: its input size, no crop)."""
    c = cfg.classifier
    if c.name is not None:
        return timm.create_model(c.name, num_classes=c.num_classes, in_chans=c.in_chans, drop_path_rate=c.drop_path)
    model = AttNet(**c.architecture(), num_classes=c.num_classes, in_chans=c.in_chans, drop_path_rate=c.drop_path)
    mean, std = (0.5,) * c.in_chans, (0.5,) * c.in_chans  # inputs in [-1, 1]
    model.pretrained_cfg = {"input_size": (c.in_chans, c.input_size, c.input_size), "crop_pct": 1.0,
                            "interpolation": "bilinear", "mean": mean, "std": std, "num_classes": c.num_classes}
    return model


def _split_folder(root: Path, split: str) -> Path | None:
    return root / split if (root / split).is_dir() else None


def eval_transform(model: nn.Module, input_size: int | None = None):
    """timm's evaluation transform from the model's default config (resize by crop_pct, centre crop)."""
    data_cfg = resolve_data_config({}, model=model)
    if input_size is not None:
        data_cfg["input_size"] = (data_cfg["input_size"][0], input_size, input_size)
    return create_transform(**data_cfg, is_training=False)


def image_folder(path: str | Path, transform) -> Dataset:
    """A class-subfolder image folder read by timm (class order: timm's natural sort of folder names)."""
    from timm.data import ImageDataset

    return ImageDataset(str(path), transform=transform)


def classification_data(cfg: RunConfig, model: nn.Module) -> tuple[Dataset, Dataset | None]:
    """(training set, held-out set or None): digits splits, or ROOT/train and ROOT/val image folders."""
    d, c, a = cfg.data, cfg.classifier, cfg.augment
    if d.source == "digits":
        if c.in_chans != 1 or c.num_classes < 10:
            raise DataError("digits are 1-channel images of 10 classes: pass --classifier.in_chans 1 "
                            "--classifier.num_classes 10")
        return (DigitsDataset("train", c.input_size, quantized=True),
                DigitsDataset("held_out", c.input_size, quantized=True))
    if d.data_path is None or not Path(d.data_path).is_dir():
        raise DataError(f"data.data_path={d.data_path}: pass --data-path to a folder with train/ (and val/) "
                        "class subfolders")
    root = Path(d.data_path)
    train_dir = _split_folder(root, "train") or root
    data_cfg = resolve_data_config({}, model=model)
    train_tf = create_transform(c.input_size, is_training=True, auto_augment=a.rand_augment,
                                color_jitter=a.color_jitter, re_prob=a.random_erase,
                                interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"])
    train = SeededItems(image_folder(train_dir, train_tf))
    val_dir = _split_folder(root, "val")
    return train, (image_folder(val_dir, eval_transform(model, c.input_size)) if val_dir else None)


def build_classification_task(cfg: RunConfig, held_out: Dataset | None,
                              device: torch.device | str = "cpu") -> ClassificationTask:
    a = cfg.augment
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                      num_classes=cfg.classifier.num_classes)
    return ClassificationTask(cfg.classifier.num_classes, mixup=mixup, label_smoothing=a.label_smoothing,
                              shift=a.shift, held_out=held_out, device=device)
