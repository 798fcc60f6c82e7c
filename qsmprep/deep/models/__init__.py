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


def build_model(arch, normalise_amplitude=False, **params):
    """Build the network registered as ``arch`` with constructor ``params``.

    Parameters
    ----------
    arch : str
        One of "unet", "qsminvnet", "metaqsm", "qsmgan", "siqsm".
    normalise_amplitude : bool, default False
        Make the network amplitude-equivariant, as the dipole inversion is
        (see ``InversionNet.forward``); recorded in the model's params.
        Not for networks with a non-linear output transform (QSMGAN).
    **params
        Constructor arguments of that architecture (width, depth, ...).

    Raises
    ------
    ValueError for an unknown architecture or an amplitude normalisation it
    cannot take; TypeError for unknown parameters.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    model = ARCHITECTURES[arch](**params)
    if normalise_amplitude:
        if model.output_transform != "identity":
            raise ValueError(f"{arch} has the non-linear output transform {model.output_transform!r}; "
                             "it cannot be amplitude-normalised")
        model.params["normalise_amplitude"] = True  # recorded only when used, as for the CFL2 prior
    return model


__all__ = [
    "ARCHITECTURES", "CONVENTION_VERSION", "DomainBatchNorm3d", "InversionNet", "MetaQSM", "QSMGANCritic",
    "QSMGANGenerator", "QSMInvNet", "SIQSM", "UNet", "WPConv3d", "build_model",
]
