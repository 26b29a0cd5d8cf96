"""Training objectives: gaze_sup (per-level BCE to the level's pseudo-mask + cross-level
consistency), sparse_sup (the same with the partial BCE over labelled pixels) and full_sup (BCE to the
ground truth)."""
import torch

from losses.consistency import consistency_losses
from losses.segmentation import IGNORE, bce_loss, partial_bce_loss

__all__ = ["IGNORE", "bce_loss", "partial_bce_loss", "consistency_losses", "gaze_sup_loss", "full_sup_loss"]


def gaze_sup_loss(outputs: dict, pseudo_masks: list[torch.Tensor], cons_weight: float,
                  cons_mode: str = "prop", partial: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_i BCE(logits_i, pseudo_mask_i) + cons_weight * sum_i L_i (the latter only when
    cons_weight > 0 and N > 1). With `partial`, BCE is the partial BCE over each map's labelled pixels
    (value IGNORE = unlabelled: sparse labels, the gaze uncertain band); the consistency term is unchanged.

    Args:
        outputs: MultiLevelNet outputs (`logits_i`, and `logits_prop_i` for "prop").
        pseudo_masks: N tensors (B, 1, H, W) in {0, 1} (and IGNORE with `partial`), level i's pseudo-mask.
        cons_weight: weight of the consistency term.
        cons_mode: "prop" (the paper's default) or "pure".
        partial: partial BCE; the maps' labelled pixels are not re-checked here (the datasets do it).
    Returns:
        the total loss and a log dict of detached 0-d tensors (no GPU sync per step): `loss_seg_1..N`,
        `loss_cons` (mean of L_i, only when the term is used) and `loss`.
    """
    num_levels = len(pseudo_masks)
    missing = [f"logits_{i}" for i in range(1, num_levels + 1) if f"logits_{i}" not in outputs]
    if num_levels == 0 or missing:
        raise ValueError(f"gaze_sup_loss: {num_levels} pseudo-masks but the model outputs lack {missing} "
                         f"(have {sorted(outputs)})")
    log: dict[str, torch.Tensor] = {}
    seg = []
    for i, target in enumerate(pseudo_masks, start=1):
        logits = outputs[f"logits_{i}"]
        seg.append(partial_bce_loss(logits, target, check=False) if partial else bce_loss(logits, target))
        log[f"loss_seg_{i}"] = seg[-1].detach()
    total = torch.stack(seg).sum()
    if cons_weight > 0 and num_levels > 1:
        cons = torch.stack(consistency_losses(outputs, num_levels, cons_mode))
        total = total + cons_weight * cons.sum()
        log["loss_cons"] = cons.detach().mean()
    log["loss"] = total.detach()
    return total, log


def full_sup_loss(outputs: dict, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE(logits, ground-truth mask); returns the loss and {"loss": value}."""
    loss = bce_loss(outputs["logits"], mask)
    return loss, {"loss": loss.detach()}
