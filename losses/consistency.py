"""Cross-level consistency (the spec's L_i): each level's prediction is pulled towards the other
levels' (detached) predictions by maximising the dot product of the two-class probability vectors."""
import torch
import torch.nn.functional as F


def _two_class(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) logits -> (B, 2, H, W) probabilities [1 - p, p], in at least float32."""
    p = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    return torch.cat([1 - p, p], dim=1)


def consistency_losses(outputs: dict, num_levels: int, mode: str = "prop") -> list[torch.Tensor]:
    """L_i = -(1/(N-1)) sum_{j != i} mean_{b,h,w} sum_c Q_i * stopgrad(P_j), for i = 1..N.

    Args:
        outputs: MultiLevelNet outputs with `logits_i` (and `logits_prop_i` for mode "prop").
        num_levels: N >= 2.
        mode: "prop": Q_i from `logits_prop_i` (resized to the logits' size, nearest);
            "pure": Q_i = P_i from `logits_i`.
    Returns:
        [L_1, ..., L_N], scalars in at least float32 (half-precision logits are cast up).
    """
    if num_levels < 2:
        raise ValueError(f"consistency_losses: needs num_levels >= 2, got {num_levels}")
    if mode not in ("prop", "pure"):
        raise ValueError(f"consistency_losses: unknown mode {mode!r}; expected 'prop' or 'pure'")
    logits = [outputs[f"logits_{i}"] for i in range(1, num_levels + 1)]
    targets = [_two_class(x).detach() for x in logits]  # stopgrad(P_j)
    if mode == "pure":
        queries = [_two_class(x) for x in logits]
    else:
        queries = []
        for i, x in enumerate(logits, start=1):
            prop = outputs[f"logits_prop_{i}"]
            if prop.shape[-2:] != x.shape[-2:]:
                prop = F.interpolate(prop, size=x.shape[-2:], mode="nearest")
            queries.append(_two_class(prop))
    losses = []
    for i in range(num_levels):
        dots = [(queries[i] * targets[j]).sum(1).mean() for j in range(num_levels) if j != i]
        losses.append(-torch.stack(dots).sum() / (num_levels - 1))
    return losses
