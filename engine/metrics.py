"""Per-image segmentation metrics (pure functions on binary masks)."""
import numpy as np
import torch
from scipy import ndimage

EPS = 1e-7


def dice_iou(pred: torch.Tensor, gt: torch.Tensor) -> tuple:
    """The paper's per-image Dice = 2|P∩G| / (|P| + |G| + 1e-7) and IoU = |P∩G| / (|P∪G| + 1e-7)."""
    pred, gt = pred.bool(), gt.bool()
    inter = (pred & gt).sum().item()
    p, g = pred.sum().item(), gt.sum().item()
    return 2 * inter / (p + g + EPS), inter / (p + g - inter + EPS)


def _surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances from each border pixel of `a` to the nearest border pixel of `b` (MedPy's definition)."""
    cross = ndimage.generate_binary_structure(2, 1)
    a_border = a ^ ndimage.binary_erosion(a, structure=cross, iterations=1)
    b_border = b ^ ndimage.binary_erosion(b, structure=cross, iterations=1)
    return ndimage.distance_transform_edt(~b_border)[a_border]


def hd95(pred, gt) -> float:
    """95th percentile of the symmetric surface distances in pixels, as medpy.metric.binary.hd95.

    NaN when either mask is empty (undefined; averaged with nanmean)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        return float("nan")
    # Crop to the masks' joint bounding box, padded with background as the erosion sees the image edge:
    # every border pixel stays inside, so the distances are unchanged and large images cost little.
    rows, cols = np.nonzero(pred | gt)
    box = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    pred, gt = np.pad(pred[box], 1), np.pad(gt[box], 1)
    return float(np.percentile(np.hstack([_surface_distances(pred, gt), _surface_distances(gt, pred)]), 95))


def summarize(values) -> tuple:
    """(mean, std) over images, ignoring NaN; (nan, nan) for no finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))
