"""Deep dipole inversion: training data, augmentation, losses, models, training.

Submodules are imported explicitly (``from qsmprep.deep import losses``) so
that importing this package stays cheap and does not pull in PyTorch.
"""

from importlib import resources
from pathlib import Path


def shipped_model_path(name):
    """Path of the shipped model ``name`` (qsmprep/data/models/<name>.safetensors); imports no torch."""
    return Path(str(resources.files("qsmprep") / "data" / "models" / f"{name}.safetensors"))
