"""Pixel-wise binary cross-entropy, averaged per image then over the batch; the partial BCE of sparse
labels (maps with an unlabelled value) averages over the labelled pixels only."""
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


IGNORE = 255  # the unlabelled value of a supervision map (the segmentation ignore-index convention; datasets.io.IGNORE)


def partial_bce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore: int = IGNORE,
                     check: bool = True) -> torch.Tensor:
    """Partial BCE (WSL4MIS's pCE for one foreground class): each image's BCE averaged over its labelled
    pixels, then the mean over the batch. Equals `bce_loss(logits, labels)` when no pixel is unlabelled.

    Args:
        logits: (B, 1, H, W) raw scores.
        labels: (B, 1, H, W) with 0 = background, 1 = foreground, `ignore` = unlabelled (any dtype).
        ignore: the unlabelled value.
        check: refuse an image without a labelled pixel (one read-back from the device per call). The
            training datasets check every map when they load it and name the file, so the trainer skips it.
    Raises:
        ValueError: (check) an image without a labelled pixel: its loss would be 0/0.
    """
    labelled = labels != ignore
    if not check:
        return bce_loss(logits, torch.where(labelled, labels, torch.zeros_like(labels)), labelled)
    empty = (~labelled.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"partial_bce_loss: image(s) {empty} of the batch have no labelled pixel")
    return bce_loss(logits, torch.where(labelled, labels, torch.zeros_like(labels)), labelled)
