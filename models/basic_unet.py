"""The paper's 2D U-Net: a re-implementation of MONAI's BasicUNet (spatial_dims=2, GroupNorm,
LeakyReLU 0.1, transposed-conv upsampling, skip concatenation) with the same module tree, so
state-dict keys and shapes match MONAI's exactly (e.g. `conv_0.conv_0.conv.weight`,
`upcat_1.convs.conv_1.adn.N.bias`, `final_conv.weight`).

MONAI's ADN block also holds a `D` Dropout(p=0) between N and A; it is the identity and has no
state, so it is left out here.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Convolution(nn.Sequential):
    """3x3 conv (bias on) -> GroupNorm -> LeakyReLU(0.1); keys `conv.*`, `adn.N.*`."""

    def __init__(self, in_chns: int, out_chns: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chns, out_chns, kernel_size=3, padding=1)
        self.adn = nn.Sequential()
        self.adn.add_module("N", nn.GroupNorm(num_groups, out_chns))
        self.adn.add_module("A", nn.LeakyReLU(0.1, inplace=True))


class TwoConv(nn.Sequential):
    """Two Convolution blocks: `conv_0`, `conv_1`."""

    def __init__(self, in_chns: int, out_chns: int, num_groups: int):
        super().__init__()
        self.conv_0 = Convolution(in_chns, out_chns, num_groups)
        self.conv_1 = Convolution(out_chns, out_chns, num_groups)


class Down(nn.Sequential):
    """2x2 max pooling, then TwoConv: `max_pooling`, `convs`."""

    def __init__(self, in_chns: int, out_chns: int, num_groups: int):
        super().__init__()
        self.max_pooling = nn.MaxPool2d(kernel_size=2)
        self.convs = TwoConv(in_chns, out_chns, num_groups)


class UpSample(nn.Sequential):
    """2x2 stride-2 transposed conv, under the key `deconv` as in MONAI."""

    def __init__(self, in_chns: int, out_chns: int):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_chns, out_chns, kernel_size=2, stride=2)


class UpCat(nn.Module):
    """Upsample x, concatenate [encoder skip, upsampled], TwoConv.

    Args:
        in_chns: channels of the input to upsample.
        cat_chns: channels of the encoder skip connection.
        out_chns: output channels.
        num_groups: GroupNorm groups.
        halves: upsample to in_chns // 2 channels (MONAI's default) instead of in_chns.
    """

    def __init__(self, in_chns: int, cat_chns: int, out_chns: int, num_groups: int, halves: bool = True):
        super().__init__()
        up_chns = in_chns // 2 if halves else in_chns
        self.upsample = UpSample(in_chns, up_chns)
        self.convs = TwoConv(cat_chns + up_chns, out_chns, num_groups)

    def forward(self, x: torch.Tensor, x_e: torch.Tensor) -> torch.Tensor:
        x_0 = self.upsample(x)
        # Odd encoder sizes lose a row/column to max pooling; MONAI restores it by replicating
        # the last row/column (pad right/bottom by one).
        pad_w = 1 if x_e.shape[-1] != x_0.shape[-1] else 0
        pad_h = 1 if x_e.shape[-2] != x_0.shape[-2] else 0
        if pad_w or pad_h:
            x_0 = F.pad(x_0, (0, pad_w, 0, pad_h), mode="replicate")
        return self.convs(torch.cat([x_e, x_0], dim=1))


class BasicUNet(nn.Module):
    """Five-level 2D U-Net, MONAI BasicUNet-compatible.

    Args:
        in_channels: input image channels.
        out_channels: channels of the final 1x1 conv (the paper's feature dimension, 128).
        features: six widths: five encoder levels, then the width after the last upsampling.
        num_groups: GroupNorm groups; must divide every width.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 128,
        features: Sequence[int] = (64, 128, 256, 512, 1024, 128),
        num_groups: int = 4,
    ):
        super().__init__()
        fea = tuple(int(f) for f in features)
        if len(fea) != 6:
            raise ValueError(f"BasicUNet: features must have 6 widths, got {len(fea)}: {fea}")
        bad = [f for f in fea if f <= 0 or f % num_groups]
        if bad:
            raise ValueError(f"BasicUNet: every width in features={fea} must be a positive multiple of "
                             f"num_groups={num_groups} (GroupNorm); offending: {bad}")
        self.conv_0 = TwoConv(in_channels, fea[0], num_groups)
        self.down_1 = Down(fea[0], fea[1], num_groups)
        self.down_2 = Down(fea[1], fea[2], num_groups)
        self.down_3 = Down(fea[2], fea[3], num_groups)
        self.down_4 = Down(fea[3], fea[4], num_groups)
        self.upcat_4 = UpCat(fea[4], fea[3], fea[3], num_groups)
        self.upcat_3 = UpCat(fea[3], fea[2], fea[2], num_groups)
        self.upcat_2 = UpCat(fea[2], fea[1], fea[1], num_groups)
        self.upcat_1 = UpCat(fea[1], fea[0], fea[5], num_groups, halves=False)  # as MONAI
        self.final_conv = nn.Conv2d(fea[5], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W), H and W ideally multiples of 16 -> (B, out_channels, H, W)."""
        if x.ndim != 4 or min(x.shape[-2:]) < 16:
            raise ValueError(f"BasicUNet: expected a (B, C, H, W) input with H, W >= 16 (four 2x poolings), "
                             f"got shape {tuple(x.shape)}")
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        u2 = self.upcat_2(u3, x1)
        u1 = self.upcat_1(u2, x0)
        return self.final_conv(u1)
