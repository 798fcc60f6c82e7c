"""NIfTI reading and atomic writing, with errors that name the file and the fix."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataError, NoInputError


def require_file(path, what):
    """``path`` as a Path; NoInputError naming ``what`` (e.g. "local field") when it is a folder or missing, or a
    symbolic link to nothing (as DataLad and git-annex leave files whose content was not fetched)."""
    path = Path(path)
    if path.is_dir():
        raise NoInputError(f"{what} {path} is a folder, not a file: give the path of the file itself.")
    if path.is_symlink() and not path.exists():
        raise NoInputError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which is not there: in a "
                           f"DataLad dataset fetch the content first (datalad get {path}); otherwise put the file "
                           "itself in its place.")
    if not path.is_file():
        raise NoInputError(f"{what} {path} does not exist: check the path.")
    return path


def read_text_utf8(path, what="", fix="save it as UTF-8.", error=DataError):
    """Text of the file ``path``, decoded as UTF-8 with a byte-order mark (which Windows editors and Excel write)
    dropped. Raises ``error`` (default DataError) naming ``what`` (e.g. "recipe"), the file, the first byte that
    is not UTF-8 and the ``fix``; OSError passes through."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        name = f"{what} {path}" if what else str(path)
        raise error(f"{name} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                    f"{fix}") from None


def read_json_object(path, what="", fix="fix it.", error=DataError):
    """The JSON object (a dict) in the file ``path``. Raises ``error`` (default DataError) naming ``what`` (e.g.
    "JSON sidecar"), the file and the ``fix`` when the file is not UTF-8 (``read_text_utf8``), not JSON, or JSON of
    another type (a list, a string); OSError passes through."""
    name = f"{what} {path}" if what else str(path)
    try:
        content = json.loads(read_text_utf8(path, what, fix, error))
    except json.JSONDecodeError as exc:
        raise error(f"{name} is not valid JSON ({exc}): {fix}") from None
    if not isinstance(content, dict):
        raise error(f"{name} holds a JSON {type(content).__name__}, not an object: {fix}")
    return content


def json_safe(value):
    """``value`` (nested dicts, lists, tuples) with every non-finite float as a string, "inf", "-inf" or "nan":
    JSON has no such numbers, and the Infinity and NaN tokens Python writes for them are refused by strict parsers
    (BIDS tools) (e.g. ``resolution_tolerance = inf`` from a parameters file)."""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def sidecar_path(path):
    """The path of the JSON sidecar beside the NIfTI file ``path`` (its .nii.gz or .nii replaced by .json)."""
    path = Path(path)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return path.with_name(stem + ".json")


REEXPORT = "re-export it as .nii or .nii.gz"
"""The fix for an input NIfTI file that cannot be read."""


def unreadable_nifti(path, what, exc, fix=REEXPORT):
    """The NoInputError for the NIfTI file ``path`` (a ``what``) that nibabel could not read, raising ``exc``."""
    return NoInputError(f"{what} {path} is not a readable NIfTI file ({exc}): {fix}.")


COMPLEX_VALUES_FIX = "give real images: the magnitude, |z|, and the phase, angle(z), each as its own file"
"""The fix for a NIfTI file of complex values (a cast to float32 would keep the real part, silently)."""


def read_header(path, what="image"):
    """(shape, affine) of the NIfTI file ``path`` (a ``what``) from its header alone; NoInputError naming it when
    it is missing or cannot be read (``require_file``, ``unreadable_nifti``)."""
    path = require_file(path, what)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken files
        raise unreadable_nifti(path, what, exc) from exc
    return tuple(int(n) for n in img.shape), img.affine


def load_nifti(path, what="image", fix=REEXPORT, dtype=np.float32):
    """Read a NIfTI file as float32 (or ``dtype``).

    Parameters
    ----------
    path : str or Path
        The file to read.
    what : str, default "image"
        What the file is meant to be, for error messages ("field map", "mask").
    fix : str, default "re-export it as .nii or .nii.gz"
        What the user should do with an unreadable file (a derivative of
        qsmprep's own is rewritten by running it again, not re-exported).
    dtype : numpy dtype or None, default float32
        Type of the data returned; None keeps nibabel's (a label map's
        stored integers exactly, which float32 merges above 2**24; scaled
        data as float64).

    Returns
    -------
    (data, affine, header) with data as an array of ``dtype``.

    Raises
    ------
    NoInputError if the file is missing or unreadable; DataError if it holds
    complex values or its affine is degenerate (``check_affine``).
    """
    path = require_file(path, what)
    try:
        img = nib.load(str(path))
        complex_values = np.issubdtype(img.get_data_dtype(), np.complexfloating)
        data = None if complex_values else np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises many types for broken files
        raise unreadable_nifti(path, what, exc, fix) from exc
    if complex_values:
        raise DataError(f"{what} {path} holds complex values: {COMPLEX_VALUES_FIX}.")
    check_affine(path, img.affine)
    return data, img.affine, img.header


def check_affine(path, affine):
    """Raise DataError unless the affine maps the three voxel axes onto three independent world directions.

    A zero or repeated column (a broken sform/qform) gives no voxel size,
    B0 direction or storage order, so nothing downstream could be trusted.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if not np.isfinite(m).all() or not norms.all() or abs(np.linalg.det(m)) < 1e-6 * np.prod(norms):
        raise DataError(f"{path} has a degenerate affine (voxel-to-world axes {np.round(m, 4).tolist()}): each voxel "
                        "axis needs a non-zero, independent direction; repair the header's sform/qform (re-convert "
                        "the DICOMs, e.g. with dcm2niix).")


def load_volume(path, what="image", dtype=np.float32):
    """``load_nifti`` for a single 3D volume: trailing singleton axes (e.g. a 4D file of one volume) are dropped,
    anything else with more than one volume is a DataError. Returns (data, affine, header)."""
    data, affine, header = load_nifti(path, what, dtype=dtype)
    if data.ndim < 3 or any(n != 1 for n in data.shape[3:]):
        raise DataError(f"{what} {path} has shape {data.shape}: give a single 3D volume.")
    return data.reshape(data.shape[:3]), affine, header


def nifti_values(path, what="image"):
    """Read every voxel of a NIfTI file once and summarise its values.

    Unlike a header read, this finds files whose data are cut short (an
    interrupted copy of a .nii.gz). The data are read in their stored type;
    the header's scaling is applied to the extremes only, so an integer image
    is never copied to floats (a float image's rounding check copies it once).

    Parameters
    ----------
    path : str or Path
        The file to read.
    what : str, default "image"
        What the file is meant to be, for error messages ("phase image").

    Returns
    -------
    dict with ``shape`` (tuple), ``nonfinite`` (number of NaN or infinite
    voxels), ``min`` and ``max`` (of the finite values, scaled; None when
    there are none), ``integral`` (True when every finite value is a whole
    number, as vendor integer phase is) and ``digests`` (one per volume,
    ``_volume_digests``: a copied volume has the same).

    Raises
    ------
    NoInputError if the file is missing, or its header or data cannot be read
    in full.
    """
    path = require_file(path, what)
    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        if hasattr(proxy, "get_unscaled"):
            raw = np.asarray(proxy.get_unscaled())
            slope, inter = float(proxy.slope), float(proxy.inter)
        else:
            raw, slope, inter = np.asarray(proxy), 1.0, 0.0
    except Exception as exc:  # nibabel, gzip and zlib raise many types for broken or truncated files
        raise unreadable_nifti(path, what, exc) from exc
    if np.iscomplexobj(raw):
        raise DataError(f"{what} {path} holds complex values: {COMPLEX_VALUES_FIX}.")
    if np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool:
        values, nonfinite, integral = raw, 0, True
    else:
        finite = np.isfinite(raw)
        nonfinite = int(raw.size - np.count_nonzero(finite))
        values = raw if nonfinite == 0 else raw[finite]
        integral = bool(values.size == 0 or np.array_equal(values, np.round(values)))
    integral = integral and float(slope).is_integer() and float(inter).is_integer()
    if values.size == 0:
        low = high = None
    else:
        low, high = sorted((float(values.min()) * slope + inter, float(values.max()) * slope + inter))
    return {"shape": tuple(int(n) for n in img.shape), "nonfinite": nonfinite, "min": low, "max": high,
            "integral": integral, "digests": _volume_digests(raw, slope, inter)}


DIGEST_SLAB = 16
"""Slices of a volume turned into float values at a time by ``_volume_digests``, so that no float copy of a large
image is held."""


def _volume_digests(raw, slope, inter):
    """A digest of each 3D volume of ``raw``, in order, from its values (``raw * slope + inter`` computed in float64,
    as nibabel's ``get_fdata`` gives them) rounded to float32: a copy of a volume, in the same file or another, has
    the same digest, whether copied byte for byte or re-saved as floats of those values (float64 or float32, from
    int16 with any scaling, say). A copy whose values were computed in float32 from a non-zero intercept, or
    re-quantised to other integers, can differ by rounding and is not matched. Two echoes' phases never agree to
    float32 precision in every voxel, so volumes with the same digest are copies. The values are made
    ``DIGEST_SLAB`` slices at a time, so copies are found without holding a float copy of an image."""
    volumes = [raw] if raw.ndim <= 3 else np.moveaxis(raw.reshape(raw.shape[:3] + (-1,), order="F"), -1, 0)
    digests = []
    for volume in volumes:
        volume = volume.reshape(volume.shape + (1,) * (3 - volume.ndim))
        digest = hashlib.blake2b(digest_size=16)
        for start in range(0, volume.shape[2], DIGEST_SLAB):  # Fortran order: the slabs' bytes, one after another
            values = (volume[:, :, start:start + DIGEST_SLAB].astype(np.float64) * slope + inter).astype(np.float32)
            values += np.float32(0)  # -0.0 -> 0.0
            values[np.isnan(values)] = np.nan  # one bit pattern for every NaN
            digest.update(values.tobytes(order="F"))
        digests.append(digest.hexdigest())
    return tuple(digests)


def write_atomic(path, write, suffix=None):
    """Create ``path`` by ``write(temporary_path)``, then a rename: no partial file is ever left at ``path``.

    The temporary file lies beside ``path`` and ends in ``suffix`` (default: ``path``'s suffixes, as writers
    such as nibabel choose the format by name); it gets the usual umask-based mode, not mkstemp's private 0600.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="".join(path.suffixes) if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` atomically (``write_atomic``), UTF-8 encoded."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_nifti(path, data, affine, header=None, dtype=np.float32):
    """Write ``data`` to ``path`` atomically (``write_atomic``): no partial file is ever left at ``path``.
    ``header``: a NIfTI header to keep (e.g. the input's descriptions), default None; ``dtype``: the stored data
    type, default float32 (masks are written as uint8)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header)
    img.set_data_dtype(dtype)
    return write_atomic(path, lambda tmp: nib.save(img, tmp), suffix="".join(Path(path).suffixes) or ".nii.gz")


def check_same_grid(ref_path, ref_img, other_path, other_img, labels=False):
    """Raise DataError unless two (shape, affine) pairs describe the same grid.

    ``labels``: the other image is a mask or label map, so the fix named is to resample it onto the reference's
    grid with nearest-neighbour interpolation (not the reference onto its grid)."""
    (ref_shape, ref_affine), (shape, affine) = ref_img, other_img
    fix = (f"resample {other_path} onto the grid of {ref_path} with nearest-neighbour interpolation" if labels
           else "resample one onto the other's grid")
    if tuple(ref_shape[:3]) != tuple(shape[:3]):
        raise DataError(f"{other_path} has shape {tuple(shape[:3])} but {ref_path} has {tuple(ref_shape[:3])}: {fix}.")
    if not np.allclose(ref_affine, affine, atol=1e-3):
        raise DataError(f"{other_path} and {ref_path} have different affines (voxel-to-world): {fix}.")
