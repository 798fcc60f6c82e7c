"""Meta-QSM: a U-Net whose convolutions are weight-prediction convolutions.

A WP-Conv layer holds a small MLP that maps the voxel size (mm, 3 values) to
the kernel (outC, inC, k, k, k) and bias (outC) of a convolution, so one
network reconstructs data of any resolution.  Every convolution of the U-Net,
the final 1x1x1 one included, is a WP-Conv; items of one batch may have
different voxel sizes (the per-item kernels run as one grouped convolution).

Reference: Liu J, Koch KM. Meta-QSM: an image-resolution-arbitrary network
for QSM reconstruction. arXiv:1908.00206 (2019).
"""

import torch.nn.functional as F
from torch import nn

from .unet import ContextSequential, InversionNet, NearestUp, UNetCore


class WPConv3d(nn.Module):
    """Weight-prediction 3D convolution (stride 1, same padding).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels.
    kernel_size : int, default 3
        Cubic kernel size (odd).
    hidden : int, default 64
        Width of the two hidden layers of the MLP (3 -> hidden -> hidden -> weights).
    """

    takes_context = True

    def __init__(self, in_channels, out_channels, kernel_size=3, hidden=64):
        super().__init__()
        self.shape = (out_channels, in_channels, kernel_size, kernel_size, kernel_size)
        n_weights = out_channels * in_channels * kernel_size**3
        self.mlp = nn.Sequential(
            nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_weights + out_channels)
        )
        # Start the predicted kernels at the scale of a default conv initialisation.
        last = self.mlp[-1]
        nn.init.normal_(last.weight, std=(1.0 / (in_channels * kernel_size**3)) ** 0.5 / hidden**0.5)
        nn.init.zeros_(last.bias)

    def predict(self, voxel_size):
        """Kernels (B, outC, inC, k, k, k) and biases (B, outC) for voxel sizes (B, 3) in mm."""
        out = self.mlp(voxel_size)
        n = out.shape[1] - self.shape[0]
        return out[:, :n].reshape(-1, *self.shape), out[:, n:]

    def forward(self, x, ctx):
        weight, bias = self.predict(ctx["voxel_size"].to(x.dtype))
        b = x.shape[0]
        y = F.conv3d(
            x.reshape(1, -1, *x.shape[2:]),
            weight.reshape(-1, *self.shape[1:]),
            bias.reshape(-1),
            padding=self.shape[-1] // 2,
            groups=b,
        )
        return y.reshape(b, self.shape[0], *y.shape[2:])


class MetaQSM(InversionNet):
    """Meta-QSM U-Net (see module docstring): 2 x (WP-Conv, BatchNorm, ReLU) per
    level, max-pool down, nearest up-sampling, final 1x1x1 WP-Conv.

    ``forward(field, voxel_size=...)`` with voxel_size (B, 3) or (3,) in mm.

    Parameters
    ----------
    width : int, default 16
        Channels at the first level.
    depth : int, default 3
        Pooling levels (sizes are padded to multiples of 2**depth; 3 keeps
        the 2-4 mm slice direction of clinical data at useful sizes).
    hidden : int, default 32
        Hidden width of each WP-Conv MLP.
    """

    arch = "metaqsm"
    needs_voxel_size = True

    def __init__(self, width=16, depth=3, hidden=32):
        super().__init__()
        self.params = {"width": int(width), "depth": int(depth), "hidden": int(hidden)}

        def block(i, o):
            return ContextSequential(
                [WPConv3d(i, o, 3, hidden), nn.BatchNorm3d(o), nn.ReLU(), WPConv3d(o, o, 3, hidden), nn.BatchNorm3d(o), nn.ReLU()]
            )

        self.net = UNetCore(
            1, 1, width, depth,
            make_block=block,
            down=lambda c: nn.MaxPool3d(2),
            up=NearestUp,
            make_head=lambda i, o: WPConv3d(i, o, 1, hidden),
        )
