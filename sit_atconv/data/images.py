"""Image folders (ImageNet layout: a subfolder per class) with the ADM centre crop, as tensors in [-1, 1]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while >= 2x too big, BICUBIC-resize the short side, crop centre."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HxWxC array -> float CxHxW tensor in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names): labels index the sorted class subfolders; a flat folder is one class."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; pass --data-path to a folder of class subfolders")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, folder in enumerate(classes or [""]):
        for dirpath, dirnames, names in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    files.append(Path(dirpath) / name)
                    labels.append(label)
            if not classes:  # flat folder: only its own files
                break
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found; check --data-path")
    return files, labels, classes or [root.name]


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """Read one RGB image, ADM-centre-crop it, return a 3xSxS tensor in [-1, 1]."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as err:  # PIL raises several types for corrupt or non-image files
        raise DataError(f"{path}: cannot read image ({type(err).__name__}: {err}); "
                        "replace or delete the file") from None
    return to_tensor(center_crop_arr(img, image_size))


class ImageFolderDataset(Dataset):
    """(3xSxS image in [-1, 1], label) from an ImageNet-layout folder; `load(i, flip)` gives the mirror too."""

    def __init__(self, root: str | os.PathLike, image_size: int = 256):
        self.root, self.image_size = Path(root), image_size
        self.files, self.labels, self.classes = scan_image_folder(root)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        """Item `index`, mirrored when `flip`."""
        image = load_image(self.files[index], self.image_size)
        return (image.flip(-1) if flip else image), self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index, False)
