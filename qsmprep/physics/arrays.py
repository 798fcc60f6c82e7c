"""Numpy arrays and torch tensors: what lets one library function serve both (the deep refinement on a GPU).

torch is never imported here unless a caller has loaded it or asks for a device.
"""

import sys

import numpy as np
from scipy import fft as spfft

from ..errors import UsageError


def is_tensor(a):
    """Whether ``a`` is a torch tensor (torch is not imported where nothing has loaded it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def resolve_device(device="auto"):
    """torch.device for "auto" (CUDA when available), "cpu" or "cuda[:N]" (inference and training alike);
    UsageError if CUDA is asked for but absent.

    "cuda" is checked by ``torch.cuda.device_count``, which asks NVML and leaves CUDA uninitialised, not by
    ``is_available``, which initialises it: qsmprep checks ``--device cuda`` before any work, in the process that
    MultiProc forks its workers from, and a child cannot use CUDA initialised before its fork (PyTorch, "poison
    fork"). "auto" is settled in the process that runs the network, by the stronger ``is_available``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and torch.cuda.device_count() == 0:
        raise UsageError("--device cuda was given but no CUDA GPU is available: use --device cpu or auto.")
    return torch.device(device)


def to_device(array, device):
    """``array`` (numpy array or torch tensor) as a float32 torch tensor on ``device``.

    A tensor already there is returned as it is (a kernel moved once serves every filtering); a numpy
    array is copied, so read-only cached kernels are never shared with torch. A boolean mask is copied as
    one byte a voxel and made float32 on the device (a quarter of the transfer).
    """
    import torch

    if is_tensor(array):
        return array.to(device=device, dtype=torch.float32)
    array = np.asarray(array)
    if array.dtype != bool:
        array = array.astype(np.float32, copy=False)
    return torch.tensor(array, device=device).to(torch.float32)


def to_numpy(array):
    """``array`` (numpy array or torch tensor on any device) as a float32 numpy array."""
    return np.asarray(array.cpu().numpy() if is_tensor(array) else array, dtype=np.float32)


def zero_outside(array, inside):
    """``array`` where the boolean ``inside`` holds, else 0 (NaN outside too): a tensor stays a tensor."""
    if is_tensor(array):
        return sys.modules["torch"].where(inside, array, 0.0)
    return np.where(inside, array, array.dtype.type(0))


def fft_module(a):
    """``torch.fft`` for a torch tensor, ``scipy.fft`` for a numpy array.

    Their transforms agree when called positionally, ``rfftn(x, s, axes)`` and ``irfftn(x, s, axes)``,
    so one call serves both (a tensor stays on its device).
    """
    return sys.modules["torch"].fft if is_tensor(a) else spfft
