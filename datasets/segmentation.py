"""Training and test data for Kvasir-SEG and NCI-ISBI in the paper's prepared layout.

ROOT/images/<id>.{jpg|dcm}, ROOT/masks/<id>.{jpg|png}, ROOT/gaze/<gaze_dir>/<id>.{jpg|png},
ROOT/<split>.txt. One dataset class serves every dataset: what differs lives in its spec (common.dataspec).
"""
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.dataspec import DataSpec, load_spec
from datasets.io import DataError, image_size, other_extension, read_gray, read_ids, read_image


def data_spec(data) -> DataSpec:
    """The dataset spec of --data (a built-in name, a spec file path, or a DataSpec)."""
    return load_spec(data)


def level_thresholds(data, num_levels: int, override: Optional[Sequence[float]] = None) -> List[float]:
    """The spec's hierarchical thresholds for `num_levels` levels, or `override` (--thresholds)."""
    return data_spec(data).level_thresholds(num_levels, override)


def normalized_image(image: np.ndarray, data, path) -> torch.Tensor:
    """An image as read from `path`, normalised for the network: (C, H, W) float32."""
    spec, channels = data_spec(data), 3 if image.ndim == 3 else 1
    if channels != spec.in_channels:
        raise DataError(f"{path} has {channels} channel(s) but --data {spec.name} expects {spec.in_channels}")
    return torch.from_numpy(np.ascontiguousarray(spec.normalize(image)))


def resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, H, W) -> (C, size, size); bilinear with align_corners=False, or nearest."""
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=(size, size), mode=mode, **kw)[0]


class SegmentationDataset(torch.utils.data.Dataset):
    """One split of a prepared dataset.

    Train mode yields {"image": (C, S, S), "target": (K, S, S), "id"} *before* the random flips
    (those are applied per batch by `random_flip`, so a preloaded and a per-sample pipeline share them).
    K = number of levels (gaze_sup: gaze map resized bilinear, then >= threshold_i) or 1 (full_sup:
    the mask resized nearest). Test mode yields the resized image and the mask at its original size.
    Files needed: a gaze_sup training split reads images and gaze maps only (no masks); full_sup
    training and test mode (the test split, --val_fraction ids) read images and masks.

    Args:
        root: prepared dataset folder.
        data: the dataset spec: a built-in name ("kvasir", "prostate"), a spec file path, or a DataSpec.
        split: split file name without .txt, or an explicit list of ids (engine/train.py trims
            --data_size_rate before passing them).
        train: train or test mode.
        method: "gaze_sup" (targets from gaze maps) or "full_sup" (targets from masks).
        spatial_size: side of the square network input.
        thresholds: one per level (gaze_sup).
        gaze_dir: folder under ROOT/gaze holding the gaze maps.
    """

    def __init__(self, root, data: str, split, train: bool, method: str = "gaze_sup", spatial_size: int = 384,
                 thresholds: Sequence[float] = (0.5,), gaze_dir: str = "crf_compat1"):
        self.root, self.data, self.spec = Path(root), data, data_spec(data)
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        self.ids = read_ids(self.root / f"{split}.txt") if isinstance(split, str) else list(split)
        if not self.ids:
            raise DataError(f"no ids in split {split!r} of {self.root}")
        self.train, self.method, self.size = train, method, spatial_size
        self.thresholds = list(thresholds)
        self.gaze_dir = self.root / "gaze" / gaze_dir
        self.check_files()

    def image_path(self, i: int) -> Path:
        return self.root / "images" / (self.ids[i] + self.spec.image_ext)

    def mask_path(self, i: int) -> Path:
        return self.root / "masks" / (self.ids[i] + self.spec.mask_ext)

    def gaze_path(self, i: int) -> Path:
        return self.gaze_dir / (self.ids[i] + self.spec.gaze_ext)

    def uses_gaze(self) -> bool:
        return self.train and self.method == "gaze_sup"

    def check_files(self) -> None:
        """Fail before training: every file exists, is readable, and the image and its mask/gaze map agree in size."""
        for i in range(len(self.ids)):
            image = self.image_path(i)
            if not image.is_file():
                raise DataError(f"image not found: {image}{other_extension(image)}")
            other = self.gaze_path(i) if self.uses_gaze() else self.mask_path(i)
            if not other.is_file():
                kind = "gaze map" if self.uses_gaze() else "mask"
                raise DataError(f"{kind} not found: {other}{other_extension(other)}" + (
                    " (make gaze maps with: python -m gaze --csv FIXATIONS.csv --root ROOT --data DATA)"
                    if self.uses_gaze() else ""))
            if image_size(image) != image_size(other):
                raise DataError(f"size mismatch: {image} is {image_size(image)} but {other} is {image_size(other)}")

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, i: int) -> torch.Tensor:
        """Normalised image at its original size, (C, H, W) float32."""
        return normalized_image(read_image(self.image_path(i)), self.data, self.image_path(i))

    def load_mask(self, i: int) -> torch.Tensor:
        """Binary mask at its original size, (1, H, W) float32 (gray / 255 > 0.5)."""
        return torch.from_numpy((read_gray(self.mask_path(i)) > 0.5).astype(np.float32))[None]

    def load_target(self, i: int) -> torch.Tensor:
        """Training targets at the network size, (K, S, S) float32 in {0, 1}."""
        if self.uses_gaze():
            gaze = resize(torch.from_numpy(read_gray(self.gaze_path(i)))[None], self.size, "bilinear")
            return torch.cat([(gaze >= t).float() for t in self.thresholds])
        return resize(self.load_mask(i), self.size, "nearest")

    def __getitem__(self, i: int) -> dict:
        image = resize(self.load_image(i), self.size, "bilinear")
        if self.train:
            return {"image": image, "target": self.load_target(i), "id": self.ids[i]}
        return {"image": image, "mask": self.load_mask(i), "id": self.ids[i]}


def random_flip(images: torch.Tensor, targets: torch.Tensor, flips: torch.Tensor):
    """Flip each sample of a batch: flips (B, 2) bool, column 0 = vertical (H axis), column 1 = horizontal (W axis)."""
    flips = flips.to(images.device)
    for axis, col in ((-2, 0), (-1, 1)):
        sel = flips[:, col].view(-1, 1, 1, 1)
        images = torch.where(sel, images.flip(axis), images)
        targets = torch.where(sel, targets.flip(axis), targets)
    return images, targets
