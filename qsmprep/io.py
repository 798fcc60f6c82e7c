"""NIfTI reading and atomic writing, with errors that name the file and the fix."""

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataError, NoInputError


def load_nifti(path, what="image"):
    """Read a NIfTI file as float32.

    Parameters
    ----------
    path : str or Path
        The file to read.
    what : str, default "image"
        What the file is meant to be, for error messages ("field map", "mask").

    Returns
    -------
    (data, affine, header) with data as a float32 array.

    Raises
    ------
    NoInputError if the file is missing or unreadable; DataError if its data
    cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"{what} {path} does not exist: check the path.")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for broken files
        raise NoInputError(f"{what} {path} is not a readable NIfTI file ({exc}): re-export it as .nii or .nii.gz.") from exc
    return data, img.affine, img.header


def save_nifti(path, data, affine, header=None, dtype=np.float32):
    """Write ``data`` to ``path`` atomically: a temporary file, then a rename.

    No partial file is ever left at ``path``, even if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header)
    img.set_data_dtype(dtype)
    suffix = "".join(path.suffixes) or ".nii.gz"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); give it the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_same_grid(ref_path, ref_img, other_path, other_img):
    """Raise DataError unless two (shape, affine) pairs describe the same grid."""
    (ref_shape, ref_affine), (shape, affine) = ref_img, other_img
    if tuple(ref_shape[:3]) != tuple(shape[:3]):
        raise DataError(
            f"{other_path} has shape {tuple(shape[:3])} but {ref_path} has {tuple(ref_shape[:3])}: "
            "resample one onto the other's grid."
        )
    if not np.allclose(ref_affine, affine, atol=1e-3):
        raise DataError(f"{other_path} and {ref_path} have different affines (voxel-to-world): resample onto one grid.")
