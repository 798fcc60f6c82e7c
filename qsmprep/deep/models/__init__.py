"""Dipole-inversion network architectures and their registry by name.

Every model is an :class:`~qsmprep.deep.models.unet.InversionNet`:
``forward(field, mask=None, voxel_size=None, **ctx)`` -> chi (B, 1, X', Y', Z')
in ppm, with its input conventions as class attributes and ``conventions()``.
"""

from .metaqsm import MetaQSM, WPConv3d
from .qsmgan import QSMGANCritic, QSMGANGenerator
from .qsminvnet import DomainBatchNorm3d, QSMInvNet
from .siqsm import SIQSM
from .unet import CONVENTION_VERSION, InversionNet, UNet

ARCHITECTURES = {cls.arch: cls for cls in (UNet, QSMInvNet, MetaQSM, QSMGANGenerator, SIQSM)}


def build_model(arch, **params):
    """Build the network registered as ``arch`` with constructor ``params``.

    Parameters
    ----------
    arch : str
        One of "unet", "qsminvnet", "metaqsm", "qsmgan", "siqsm".
    **params
        Constructor arguments of that architecture (width, depth, ...).

    Raises
    ------
    ValueError for an unknown architecture; TypeError for unknown parameters.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](**params)


__all__ = [
    "ARCHITECTURES", "CONVENTION_VERSION", "DomainBatchNorm3d", "InversionNet", "MetaQSM", "QSMGANCritic",
    "QSMGANGenerator", "QSMInvNet", "SIQSM", "UNet", "WPConv3d", "build_model",
]
