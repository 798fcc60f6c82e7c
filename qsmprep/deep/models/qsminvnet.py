"""QSMInvNet+: U-Net with domain-specific batch normalisation.

Local field and brain mask in, chi out.  9 convolutions (3x3x3, same padding),
each followed by a domain-specific batch norm (one BatchNorm3d per domain:
synthetic = 0, real = 1) and ReLU; 4 max-pool and 4 nearest-neighbour
up-sampling levels with skip concatenations; a final linear 1x1x1 conv.  All
weights except the batch-norm layers are shared between domains, so the
unlabelled real data (trained with a data-consistency loss) and the labelled
synthetic data each normalise with their own statistics.

Reference: Liu J, Koch KM. Deep quantitative susceptibility mapping by
combined background field removal and dipole inversion / QSMInvNet+:
domain adaptation with domain-specific batch normalization. ISMRM abstract.
"""

from torch import nn

from .unet import ContextSequential, InversionNet, NearestUp, UNetCore


class DomainBatchNorm3d(nn.Module):
    """One BatchNorm3d per domain; ``ctx["domain"]`` (int, default 0) picks which.

    Parameters
    ----------
    num_features : int
        Channels.
    num_domains : int, default 2
        Number of domains (0 synthetic, 1 real in QSMInvNet+).
    """

    takes_context = True

    def __init__(self, num_features, num_domains=2):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm3d(num_features) for _ in range(num_domains))

    def forward(self, x, ctx):
        domain = int(ctx.get("domain", 0))
        if not 0 <= domain < len(self.norms):
            raise ValueError(f"domain {domain} out of range: this network has {len(self.norms)} domains")
        return self.norms[domain](x)


class QSMInvNet(InversionNet):
    """QSMInvNet+ U-Net (see module docstring).

    ``forward(field, mask, domain=0)``: domain 0 = synthetic (labelled),
    1 = real (unlabelled); inference on real data uses domain 1.

    Parameters
    ----------
    width : int, default 32
        Channels at the first level (doubling each level).
    depth : int, default 4
        Pooling levels (4 gives the paper's 9 convolutions).
    num_domains : int, default 2
        Sets of batch-norm statistics.
    """

    arch = "qsminvnet"
    needs_mask = True

    def __init__(self, width=32, depth=4, num_domains=2):
        super().__init__()
        self.params = {"width": int(width), "depth": int(depth), "num_domains": int(num_domains)}

        def block(i, o):
            return ContextSequential(
                [nn.Conv3d(i, o, 3, padding=1, bias=False), DomainBatchNorm3d(o, num_domains), nn.ReLU()]
            )

        self.net = UNetCore(
            2, 1, width, depth,
            make_block=block,
            down=lambda c: nn.MaxPool3d(2),
            up=NearestUp,
            make_head=lambda i, o: nn.Conv3d(i, o, 1),
        )
