"""Training and test data for Kvasir-SEG and NCI-ISBI in the paper's prepared layout.

ROOT/images/<id>.{jpg|dcm}, ROOT/masks/<id>.{jpg|png}, ROOT/gaze/<gaze_dir>/<id>.{jpg|png},
ROOT/labels/<label_dir>/<id>.png (sparse labels: 0 background, 1 foreground, 255 unlabelled),
ROOT/<split>.txt. One dataset class serves every dataset: what differs lives in its spec (common.dataspec).
"""
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.dataspec import DataSpec, load_spec
from common.methods import METHODS
from datasets.io import (
    IGNORE,
    DataError,
    image_size,
    other_extension,
    read_gray,
    read_ids,
    read_image,
    read_labels,
)


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


def resize_labels(labels: np.ndarray, size: int) -> torch.Tensor:
    """A sparse label map (H, W) uint8 {0, 1, 255} -> (1, size, size) uint8 {0, 1, 255}.

    Shrinking takes, for each output pixel, the labels present in its cell (adaptive max pooling of the
    foreground and background indicators): a point or a 1-pixel scribble survives a 10x reduction, where
    nearest sampling would drop most of it. A cell holding both labels stays unlabelled. Enlarging is
    nearest, which keeps every label.
    """
    x = torch.from_numpy(np.ascontiguousarray(labels))[None, None]
    fg, bg = (x == 1).float(), (x == 0).float()
    if labels.shape[0] >= size and labels.shape[1] >= size:
        fg, bg = F.adaptive_max_pool2d(fg, size), F.adaptive_max_pool2d(bg, size)
    else:
        fg, bg = (F.interpolate(t, size=(size, size), mode="nearest") for t in (fg, bg))
    out = torch.full_like(fg, IGNORE, dtype=torch.uint8)
    out[(fg > 0) & (bg == 0)] = 1
    out[(bg > 0) & (fg == 0)] = 0
    return out[0]


def gaze_targets(gaze: torch.Tensor, thresholds: Sequence[float],
                 ignore_below: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(1, S, S) gaze map in [0, 1] -> (K, S, S) float targets: level i is 1 where gaze >= threshold_i and 0
    below; with `ignore_below` (GNAN's uncertain band) pixels with ignore_below_i <= gaze < threshold_i are
    IGNORE (unlabelled) and only gaze < ignore_below_i is background."""
    levels = []
    for i, t in enumerate(thresholds):
        target = (gaze >= t).float()
        if ignore_below is not None:
            target[(gaze >= ignore_below[i]) & (gaze < t)] = IGNORE
        levels.append(target)
    return torch.cat(levels)


class SegmentationDataset(torch.utils.data.Dataset):
    """One split of a prepared dataset.

    Train mode yields {"image": (C, S, S), "target": (K, S, S), "id"} *before* the random flips
    (those are applied per batch by `random_flip`, so a preloaded and a per-sample pipeline share them).
    K = number of levels (gaze_sup: gaze map resized bilinear, then >= threshold_i, with IGNORE in the
    uncertain band of `ignore_below`; sparse_sup: the sparse label map, `resize_labels`, the same for every
    level) or 1 (full_sup: the mask resized nearest). A target with no labelled pixel is a DataError
    naming the file. Test mode yields the resized image and the mask at its original size.
    Files needed: a gaze_sup (sparse_sup) training split reads images and gaze maps (label maps) only (no
    masks); full_sup training and test mode (the test split, --val_fraction ids) read images and masks.

    Args:
        root: prepared dataset folder.
        data: the dataset spec: a built-in name ("kvasir", "prostate"), a spec file path, or a DataSpec.
        split: split file name without .txt, or an explicit list of ids (engine/train.py trims
            --data_size_rate before passing them).
        train: train or test mode.
        method: "gaze_sup" (targets from gaze maps), "sparse_sup" (from sparse label maps) or "full_sup"
            (from masks).
        spatial_size: side of the square network input.
        thresholds: one per level (gaze_sup).
        gaze_dir: folder under ROOT/gaze holding the gaze maps.
        label_dir: folder under ROOT/labels holding the sparse label maps (sparse_sup).
        ignore_below: gaze_sup's uncertain band, one lower bound per level (each below its threshold).
        num_levels: sparse_sup: how many copies of the label map (one per level).
    """

    def __init__(self, root, data: str, split, train: bool, method: str = "gaze_sup", spatial_size: int = 384,
                 thresholds: Sequence[float] = (0.5,), gaze_dir: str = "crf_compat1", label_dir: Optional[str] = None,
                 ignore_below: Optional[Sequence[float]] = None, num_levels: int = 1):
        self.root, self.data, self.spec = Path(root), data, data_spec(data)
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        self.ids = read_ids(self.root / f"{split}.txt") if isinstance(split, str) else list(split)
        if not self.ids:
            raise DataError(f"no ids in split {split!r} of {self.root}")
        self.train, self.method, self.size = train, method, spatial_size
        if method not in METHODS:
            raise ValueError(f"SegmentationDataset: unknown method {method!r}; expected one of {METHODS}")
        if train and method == "sparse_sup" and not label_dir:
            raise DataError("sparse_sup needs --label_dir (a folder under ROOT/labels/, e.g. points)")
        self.thresholds = list(thresholds)
        self.ignore_below = list(ignore_below) if ignore_below is not None else None
        self.num_levels = num_levels
        self.gaze_dir = self.root / "gaze" / gaze_dir
        self.label_dir = self.root / "labels" / label_dir if label_dir else None
        self.check_files()

    def image_path(self, i: int) -> Path:
        return self.root / "images" / (self.ids[i] + self.spec.image_ext)

    def mask_path(self, i: int) -> Path:
        return self.root / "masks" / (self.ids[i] + self.spec.mask_ext)

    def gaze_path(self, i: int) -> Path:
        return self.gaze_dir / (self.ids[i] + self.spec.gaze_ext)

    def label_path(self, i: int) -> Path:
        return self.label_dir / (self.ids[i] + ".png")

    def uses_gaze(self) -> bool:
        return self.train and self.method == "gaze_sup"

    def uses_labels(self) -> bool:
        return self.train and self.method == "sparse_sup"

    def target_levels(self) -> int:
        """K, the channels of a training target."""
        return len(self.thresholds) if self.uses_gaze() else self.num_levels if self.uses_labels() else 1

    def target_path(self, i: int) -> Path:
        """The file a training target is made from (or the mask, in test mode)."""
        if self.uses_gaze():
            return self.gaze_path(i)
        return self.label_path(i) if self.uses_labels() else self.mask_path(i)

    def check_files(self) -> None:
        """Fail before training: every file exists, is readable, and the image and its mask/gaze map agree in size."""
        for i in range(len(self.ids)):
            image = self.image_path(i)
            if not image.is_file():
                raise DataError(f"image not found: {image}{other_extension(image)}")
            other = self.target_path(i)
            if not other.is_file():
                kind = "gaze map" if self.uses_gaze() else "sparse label map" if self.uses_labels() else "mask"
                hint = " (make gaze maps with: python -m gaze --csv FIXATIONS.csv --root ROOT --data DATA)" \
                    if self.uses_gaze() else " (simulate them with: python -m prepare sparse --root ROOT --kind " \
                    "points|scribbles)" if self.uses_labels() else ""
                raise DataError(f"{kind} not found: {other}{other_extension(other)}{hint}")
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
        """Training targets at the network size, (K, S, S) float32 in {0, 1} (and IGNORE = unlabelled)."""
        if self.uses_gaze():
            gaze = resize(torch.from_numpy(read_gray(self.gaze_path(i)))[None], self.size, "bilinear")
            target = gaze_targets(gaze, self.thresholds, self.ignore_below)
        elif self.uses_labels():
            target = resize_labels(read_labels(self.label_path(i)), self.size).float().expand(self.num_levels, -1, -1)
        else:
            return resize(self.load_mask(i), self.size, "nearest")
        empty = [k + 1 for k in range(len(target)) if bool((target[k] == IGNORE).all())]
        if empty:
            why = f"with --ignore_below {self.ignore_below}" if self.uses_gaze() else f"at {self.size} px"
            raise DataError(f"{self.target_path(i)}: no labelled pixel {why} (level(s) {empty}); every training "
                            "image needs at least one labelled pixel")
        return target.contiguous()

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
