"""A mask's outline drawn on its image (OpenCV), for gaze reports, predictions and TensorBoard images."""
from typing import Tuple

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
