"""Classification as a training task: (soft-)cross-entropy with timm's mixup/cutmix and label smoothing;
held-out top-1/top-5 as the preview."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the k highest logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


@torch.no_grad()
def count_correct(model: nn.Module, loader, device: torch.device | str) -> tuple[int, int, int]:
    """(top-1 hits, top-5 hits, images) of `model` in eval mode over a loader of (images, labels)."""
    was_training = model.training
    model.eval()
    top1 = top5 = n = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        c1, c5 = topk_correct(model(x).float(), y)
        top1, top5, n = top1 + c1, top5 + c5, n + len(y)
    model.train(was_training)
    return top1, top5, n


class ClassificationTask:
    """Cross-entropy on (image, label) batches.

    `mixup` (timm's Mixup, which also smooths labels) turns hard labels into soft targets, trained with
    soft-target cross-entropy; otherwise plain cross-entropy with `label_smoothing`. `shift` translates the
    whole batch by up to that many pixels (tensor datasets such as digits, which timm transforms do not
    reach). Random draws come from torch's generator, which the loop seeds per step; timm's Mixup draws
    from numpy's, which is seeded from a torch draw so that it is reproducible too.
    """

    name = "classification"

    def __init__(self, num_classes: int, *, mixup: Mixup | None = None, label_smoothing: float = 0.0,
                 shift: int = 0, held_out: Dataset | None = None, device: torch.device | str = "cpu",
                 eval_batch_size: int = 256):
        self.num_classes, self.mixup, self.label_smoothing, self.shift = num_classes, mixup, label_smoothing, shift
        self.held_out, self.device, self.eval_batch_size = held_out, device, eval_batch_size
        self.soft_loss = SoftTargetCrossEntropy()

    def prepare(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        if self.shift:
            offsets = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            x = torch.roll(x, offsets, dims=(2, 3))
        if self.mixup is not None:
            np.random.seed(int(torch.randint(0, 2**31 - 1, ())))
            x, y = self.mixup(x, y)
        return x, y

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        logits = model(x)
        if y.ndim == 2:  # soft targets from mixup/cutmix
            return self.soft_loss(logits, y), {}
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, {"train_top1": (logits.detach().argmax(1) == y).float().mean()}

    def preview(self, model: nn.Module, step: int, run_dir: Path) -> dict[str, float]:
        """Held-out top-1 / top-5 of the EMA model (nothing when no held-out set was given)."""
        if self.held_out is None:
            return {}
        loader = DataLoader(self.held_out, batch_size=self.eval_batch_size)
        top1, top5, n = count_correct(model, loader, self.device)
        return {"val_top1": top1 / n, "val_top5": top5 / n}
