"""Contour overlays: a mask's outline drawn on its image (cv2), for `predict` and TensorBoard images.

Colours are RGB: prediction green, reference (ground truth or pseudo-mask) red.
"""
from collections.abc import Sequence

import numpy as np
import torch

from common.contours import draw_contours
from common.dataspec import IMAGENET_MEAN, IMAGENET_STD

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


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A network input (C, H, W) back to (H, W, 3) uint8: 3 channels undo the ImageNet normalisation
    (Kvasir), 1 channel (prostate, per-image standardised) is min-max scaled."""
    x = image.detach().float().cpu()
    if x.shape[0] == 3:
        x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return to_uint8_rgb(x[0].numpy())


def contour_thickness(shape: Sequence[int]) -> int:
    """1 px up to ~300 px images, thicker on large ones so the outline stays visible when zoomed out."""
    return max(1, round(min(shape[:2]) / 300))


def overlay(image: np.ndarray, pred: np.ndarray, ref: np.ndarray = None, thickness: int | None = None) -> np.ndarray:
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


@torch.no_grad()
def log_images(writer, model: torch.nn.Module, iteration: int, test_data, train_images: torch.Tensor,
               train_targets: torch.Tensor, gaze_sup: bool, count: int = 4) -> None:
    """TensorBoard images at the network input size: `images/test` (prediction green, ground truth red) for
    the first test images, and training images with each level's pseudo-mask (red) and that level's
    prediction (green), `images/train_level_<i>` (full_sup: `images/train`, ground truth red)."""
    from engine.evaluate import model_outputs

    was_training = model.training
    model.eval()
    n = min(count, len(test_data))
    if n:
        images = torch.cat(test_data.images[:n])
        preds = torch.sigmoid(model_outputs(model, images)["logits"].float()) > 0.5
        panels = []
        for image, pred, mask in zip(images, preds, test_data.masks[:n]):
            gt = torch.nn.functional.interpolate(mask[None, None].float(), size=image.shape[-2:], mode="nearest")
            panels.append(overlay(denormalize(image), pred[0].cpu().numpy(), gt[0, 0].numpy()))
        writer.add_images("images/test", np.stack(panels), iteration, dataformats="NHWC")
    outputs = model_outputs(model, train_images)
    for i in range(1, train_targets.shape[1] + 1) if gaze_sup else [0]:
        key, tag = (f"logits_{i}", f"images/train_level_{i}") if i else ("logits", "images/train")
        preds = (torch.sigmoid(outputs[key].float()) > 0.5)[:, 0].cpu().numpy()
        refs = (train_targets[:, max(i - 1, 0)] == 1).cpu().numpy()  # unlabelled (255) not shown as foreground
        panels = [overlay(denormalize(x), p, r) for x, p, r in zip(train_images, preds, refs)]
        writer.add_images(tag, np.stack(panels), iteration, dataformats="NHWC")
    model.train(was_training)
