"""The paper's networks: one U-Net level (`SegNet`: encoder + head + classifier, as in the
authors' code, so their checkpoints load) and the N-level model for gaze supervision."""
import copy
from collections.abc import Sequence

import torch
from torch import nn

from common.methods import MULTI_LEVEL_METHODS
from models.basic_unet import BasicUNet
from models.feature_propagation import PROPAGATIONS, Propagation, propagation_function

PAPER_FEATURES = (64, 128, 256, 512, 1024, 128)



class SegNet(nn.Module):
    """One U-Net level: `encoder` (BasicUNet -> feat_dim channels), `head` (a projection head kept
    for checkpoint compatibility, unused in forward) and `classifier` (1x1 conv -> 1 logit).

    Args:
        in_channels: input image channels.
        features: BasicUNet widths.
        feat_dim: feature dimension (encoder output channels).
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int = 3,
        features: Sequence[int] = PAPER_FEATURES,
        feat_dim: int = 128,
        num_groups: int = 4,
    ):
        super().__init__()
        self.encoder = BasicUNet(in_channels, feat_dim, features, num_groups)
        self.head = nn.Sequential(
            nn.Conv2d(feat_dim, feat_dim, kernel_size=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(feat_dim, feat_dim, kernel_size=1),
        )
        self.classifier = nn.Conv2d(feat_dim, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, C, H, W) -> {"logits": (B, 1, H, W), "feature": (B, feat_dim, H, W)}."""
        feature = self.encoder(x)
        return {"logits": self.classifier(feature), "feature": feature}


class MultiLevelNet(nn.Module):
    """N level-specific U-Nets (`model.0` ... `model.{N-1}`), all starting from level 1's weights.

    Args:
        num_levels: number of supervision levels N.
        in_channels, features, feat_dim, num_groups: as SegNet.
        propagation: the feature propagation implementation, "torch" or "triton" (see
            models.feature_propagation.propagation_function), or a callable of the same contract.
    """

    def __init__(
        self,
        num_levels: int = 2,
        in_channels: int = 3,
        features: Sequence[int] = PAPER_FEATURES,
        feat_dim: int = 128,
        num_groups: int = 4,
        propagation: "str | Propagation" = "torch",
    ):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"MultiLevelNet: num_levels must be >= 1, got {num_levels}")
        # resolved here, so an unusable choice fails when the model is built, not at the first step
        self.propagate_fn = propagation_function(propagation)
        self.propagation = propagation if isinstance(propagation, str) else getattr(propagation, "__name__", "custom")
        first = SegNet(in_channels, features, feat_dim, num_groups)
        self.model = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num_levels - 1)])

    @property
    def num_levels(self) -> int:
        return len(self.model)

    def extra_repr(self) -> str:
        return f"propagation={self.propagation}"

    def forward(self, x: torch.Tensor, propagate: bool = True) -> dict[str, torch.Tensor]:
        """Run every level on x.

        Args:
            x: (B, C, H, W) images.
            propagate: also compute `feature_prop_i` / `logits_prop_i` (needed only by the
                training loss; evaluation passes False).
        Returns:
            for i = 1..N: `logits_i`, `feature_i` (and `feature_prop_i`, `logits_prop_i` when
            propagate), plus `logits`: the mean of the levels' logits.
        """
        out: dict[str, torch.Tensor] = {}
        for i, net in enumerate(self.model, start=1):
            level = net(x)
            out[f"logits_{i}"] = level["logits"]
            out[f"feature_{i}"] = level["feature"]
            if propagate:
                out[f"feature_prop_{i}"] = self.propagate_fn(level["feature"])
                out[f"logits_prop_{i}"] = net.classifier(out[f"feature_prop_{i}"])
        out["logits"] = torch.stack([out[f"logits_{i}"] for i in range(1, self.num_levels + 1)]).mean(0)
        return out


def build_model(
    method: str,
    num_levels: int = 2,
    in_channels: int = 3,
    features: Sequence[int] = PAPER_FEATURES,
    feat_dim: int = 128,
    num_groups: int = 4,
    propagation: "str | Propagation" = "torch",
) -> nn.Module:
    """"gaze_sup", "sparse_sup" -> MultiLevelNet(num_levels), "full_sup" -> SegNet; both return dicts with "logits".

    Args:
        method: "gaze_sup", "sparse_sup" (the same network, trained on sparse labels) or "full_sup".
        num_levels, in_channels, features, feat_dim, num_groups: as MultiLevelNet / SegNet.
        propagation: feature propagation for gaze_sup's consistency loss: "torch" (default, any device),
            "triton" (fused kernels, CUDA only) or a callable. It changes no weights: a checkpoint trained
            with one loads into a model built with the other, and evaluation (propagate=False) never calls
            it, so testing and prediction can always build with the default. full_sup checks the name only.
    Raises:
        UserError: an unknown propagation name, or "triton" without triton or a CUDA device.
    """
    if method in MULTI_LEVEL_METHODS:
        return MultiLevelNet(num_levels, in_channels, features, feat_dim, num_groups, propagation)
    if method == "full_sup":
        if isinstance(propagation, str) and propagation not in PROPAGATIONS:
            propagation_function(propagation)  # the same error as gaze_sup's
        return SegNet(in_channels, features, feat_dim, num_groups)
    raise ValueError(f"build_model: unknown method {method!r}; expected 'gaze_sup', 'sparse_sup' or 'full_sup'")


@torch.no_grad()
def ensemble_segnet(model: MultiLevelNet) -> SegNet:
    """One SegNet whose floating-point parameters and buffers are the mean over the levels
    (integer buffers, if any, are taken from level 1)."""
    levels = [net.state_dict() for net in model.model]
    merged = copy.deepcopy(model.model[0])
    mean = {k: torch.stack([sd[k] for sd in levels]).mean(0) if v.is_floating_point() else v.clone()
            for k, v in levels[0].items()}
    merged.load_state_dict(mean)
    return merged
