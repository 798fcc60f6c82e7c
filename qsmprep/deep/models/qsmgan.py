"""QSMGAN: U-Net generator with a larger input than output, and a 3D patch critic.

Generator: a 3D U-Net whose blocks are two (3x3x3 conv, BatchNorm,
LeakyReLU 0.2), with average-pool down-sampling and transposed-conv
up-sampling, ending in a centre crop: each output voxel then sees field from
all around it (the paper's best is a 64^3 input -> 48^3 output, a margin of
8 voxels per side).  The field enters multiplied by 100 and the network
predicts tanh(10 chi); ``forward`` returns chi = atanh(y) / 10 in ppm.
Critic (WGAN-GP): four (4x4x4 conv, stride 2, LeakyReLU 0.2) blocks and a
final conv, giving a patch of real/fake scores.

Reference: Chen Y, Jakary A, Avadiappan S, Hess CP, Lupo JM. QSMGAN:
improved quantitative susceptibility mapping using 3D generative adversarial
networks with increased receptive field. NeuroImage 2020;207:116389.
"""

from torch import nn

from .unet import InversionNet, TransposedUp, UNetCore, conv_norm_act


def _leaky():
    return nn.LeakyReLU(0.2)


class QSMGANGenerator(InversionNet):
    """QSMGAN generator (see module docstring).

    Output size = input size - 2 * ``crop_margin`` along every axis.

    Parameters
    ----------
    width : int, default 32
        Channels at the first level.
    depth : int, default 4
        Pooling levels.
    crop_margin : int, default 8
        Voxels cropped at each side of the output (64 -> 48).
    """

    arch = "qsmgan"
    input_scale = 100.0
    output_transform = "tanh10"

    def __init__(self, width=32, depth=4, crop_margin=8):
        super().__init__()
        self.params = {"width": int(width), "depth": int(depth), "crop_margin": int(crop_margin)}
        self.net = UNetCore(
            1, 1, width, depth,
            make_block=lambda i, o: conv_norm_act(i, o, 2, _leaky),
            down=lambda c: nn.AvgPool3d(2),
            up=TransposedUp,
            make_head=lambda i, o: nn.Conv3d(i, o, 1),
        )

    @property
    def crop_margin(self):
        return self.params["crop_margin"]


class QSMGANCritic(nn.Module):
    """WGAN-GP patch critic for chi patches in tanh(10 chi) space.

    Parameters
    ----------
    width : int, default 32
        Channels of the first block (doubling each block).

    ``forward(chi_t)`` with chi_t (B, 1, X, Y, Z) returns one score per item
    (the mean of the patch scores), unbounded (Wasserstein critic).
    """

    def __init__(self, width=32):
        super().__init__()
        layers, prev = [], 1
        for i in range(4):
            layers += [nn.Conv3d(prev, width * 2**i, 4, stride=2, padding=1), _leaky()]
            prev = width * 2**i
        layers.append(nn.Conv3d(prev, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, chi_t):
        return self.net(chi_t).flatten(1).mean(dim=1)
