"""Pixel-wise binary cross-entropy, averaged per image then over the batch."""
import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits: mean over each image's pixels, then mean over the batch, computed in at
    least float32 (half-precision logits from autocast are cast up).

    Args:
        logits: (B, 1, H, W) raw scores.
        target: (B, 1, H, W) targets in [0, 1].
        mask: optional (B, 1, H, W) {0, 1} weights: each image's loss is then the mean over its
            masked pixels. Images whose mask is empty carry no information and are left out of the
            batch mean; if every mask is empty the loss is 0 (still connected to the graph).
    """
    if logits.shape != target.shape:
        raise ValueError(f"bce_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    per_pixel = F.binary_cross_entropy_with_logits(logits.to(dtype), target.to(dtype), reduction="none")
    per_pixel = per_pixel.flatten(1)
    if mask is None:
        return per_pixel.mean(1).mean()
    if mask.shape != logits.shape:
        raise ValueError(f"bce_loss: mask {tuple(mask.shape)} and logits {tuple(logits.shape)} differ")
    mask = mask.to(dtype).flatten(1)
    count = mask.sum(1)
    valid = (count > 0).to(dtype)
    per_image = (per_pixel * mask).sum(1) / count.clamp(min=1)
    return (per_image * valid).sum() / valid.sum().clamp(min=1)  # no host sync: no data-dependent branch
