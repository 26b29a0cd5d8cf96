"""A mask's outline drawn on its image (OpenCV), for gaze reports, predictions and TensorBoard images.

Colours are RGB: prediction green, reference (ground truth or pseudo-mask) red.
"""
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np


def draw_contours(image: np.ndarray, mask: np.ndarray, color: Tuple[int, int, int], thickness: int = 1) -> np.ndarray:
    """A copy of `image` (H, W, 3) uint8 with the boundaries of `mask` (H, W, nonzero = inside) drawn.

    Every boundary is drawn (outer ones and those of holes); the pixels drawn lie on the mask's own
    border, so the outline marks exactly where the mask ends.
    """
    if mask.shape != image.shape[:2]:
        raise ValueError(f"draw_contours: mask {mask.shape} and image {image.shape[:2]} differ in size")
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    return out


PRED_COLOR = (0, 255, 0)
REF_COLOR = (255, 0, 0)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """A displayable (H, W, 3) uint8 copy of an image as `datasets.io.read_image` returns it.

    RGB uint8 is kept; anything else (8-bit gray, 16-bit PNG, float DICOM) is min-max scaled to 0-255
    and replicated to 3 channels, as `dicom_to_uint8_rgb` does for the CRF.
    """
    if image.ndim == 3 and image.dtype == np.uint8:
        return np.ascontiguousarray(image[..., :3])
    gray = image.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(-1)
    lo, hi = float(gray.min()), float(gray.max())
    scaled = (gray - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(gray)
    return np.repeat(np.round(scaled).astype(np.uint8)[..., None], 3, axis=2)


def contour_thickness(shape: Sequence[int]) -> int:
    """1 px up to ~300 px images, thicker on large ones so the outline stays visible when zoomed out."""
    return max(1, round(min(shape[:2]) / 300))


def overlay(image: np.ndarray, pred: np.ndarray, ref: Optional[np.ndarray] = None,
            thickness: Optional[int] = None) -> np.ndarray:
    """Prediction contour (green) and optionally a reference contour (red) on an RGB uint8 image.

    Args:
        image: (H, W, 3) uint8.
        pred: (H, W) predicted mask.
        ref: (H, W) ground truth or pseudo-mask, drawn first so the prediction stays on top.
        thickness: line width in pixels (default from the image size).
    """
    thickness = thickness or contour_thickness(image.shape)
    if ref is not None:
        image = draw_contours(image, ref, REF_COLOR, thickness)
    return draw_contours(image, pred, PRED_COLOR, thickness)
