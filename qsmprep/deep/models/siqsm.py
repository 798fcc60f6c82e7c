"""SI-QSM: scale-invariant residual U-Net with parallel plain and dilated kernels.

Local field and ROI mask (2 channels) in, chi out.  Each block runs a plain
3x3x3 convolution and a dilated 3x3x3 convolution (dilation 2, the receptive
field of a 5x5x5 kernel, as in an Inception layer) in parallel, concatenates
them, reduces channels with a 1x1x1 convolution and adds a residual
connection; LeakyReLU activations.  Down-sampling by stride-2 convolutions,
up-sampling by transposed convolutions (no pooling); with 4 levels the input
is zero-padded to multiples of 16.

Reference: Larrain JM. Scale-invariant deep learning approach for QSM
reconstruction: SI-QSM. MSc thesis, Pontificia Universidad Catolica de Chile, 2022.
"""

import torch
from torch import nn

from .unet import InversionNet, TransposedUp, UNetCore


class ParallelResidualBlock(nn.Module):
    """Plain and dilated 3x3x3 branches, 1x1x1 reduction, residual sum, LeakyReLU.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels; a 1x1x1 projection matches them on the residual path.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        half = max(out_channels // 2, 1)
        self.plain = nn.Conv3d(in_channels, half, 3, padding=1)
        self.dilated = nn.Conv3d(in_channels, half, 3, padding=2, dilation=2)
        self.reduce = nn.Conv3d(2 * half, out_channels, 1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        self.act = nn.LeakyReLU(0.1)  # slope not given in the thesis

    def forward(self, x, ctx=None):
        branches = self.act(torch.cat([self.plain(x), self.dilated(x)], dim=1))
        return self.act(self.reduce(branches) + self.skip(x))


class StridedDown(nn.Conv3d):
    """2x down-sampling by a learned 2x2x2 convolution, stride 2."""

    def __init__(self, channels):
        super().__init__(channels, channels, kernel_size=2, stride=2)


class SIQSM(InversionNet):
    """SI-QSM residual U-Net (see module docstring).

    Parameters
    ----------
    width : int, default 32
        Channels at the first level.
    depth : int, default 4
        Down-sampling levels (4: sizes padded to multiples of 16).
    """

    arch = "siqsm"
    needs_mask = True

    def __init__(self, width=32, depth=4):
        super().__init__()
        self.params = {"width": int(width), "depth": int(depth)}
        self.net = UNetCore(
            2, 1, width, depth,
            make_block=lambda i, o: ParallelResidualBlock(i, o),
            down=StridedDown,
            up=TransposedUp,
            make_head=lambda i, o: nn.Conv3d(i, o, 1),
        )
