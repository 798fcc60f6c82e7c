"""B0 direction, voxel size and storage order from a NIfTI affine."""

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

SCANNER_B0_WORLD = (0.0, 0.0, 1.0)
"""B0 in NIfTI world (scanner RAS+) coordinates: along the z (S-I) axis."""


def checked_voxel_size_mm(voxel_size_mm):
    """``voxel_size_mm`` as a float64 array of 3 positive sizes in mm; ValueError naming it otherwise."""
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    if vox.shape != (3,) or not np.all(vox > 0):  # "not all > 0": NaN is refused too
        raise ValueError(f"voxel size must be 3 positive values in mm, got {voxel_size_mm!r}")
    return vox


def voxel_rotation(affine):
    """Rotation (3x3, columns = voxel axes in world) of a NIfTI affine.

    Scaling is divided out column by column, so anisotropic voxels do not
    distort the direction; a residual shear is removed by the polar
    decomposition (the nearest orthonormal matrix). Axis flips are kept.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    scaled = m / np.linalg.norm(m, axis=0)
    u, _, vt = np.linalg.svd(scaled)
    return u @ vt


def voxel_size_from_affine(affine):
    """Voxel size in mm (3-tuple) as the column norms of the affine."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(m, axis=0))


def b0_dir_from_affine(affine, b0_world=SCANNER_B0_WORLD):
    """Unit B0 direction in voxel coordinates (i, j, k) for a NIfTI ``affine``.

    Parameters
    ----------
    affine : (4, 4) array
        The image's voxel-to-world (scanner RAS+, mm) affine; only its
        rotation part is used (see ``voxel_rotation``).
    b0_world : tuple of 3 float, default (0, 0, 1)
        B0 direction in world coordinates; override for scanners or
        reconstructions whose world z is not along B0.

    Returns
    -------
    tuple of 3 float, unit length. (0, 0, 1) for an axial acquisition.
    """
    return unit_vector(voxel_rotation(affine).T @ unit_vector(b0_world))


def b0_dir_given_or_from_affine(b0_dir, affine):
    """Unit B0 direction in voxel coordinates: ``b0_dir`` (any non-zero length, e.g. a user's ``--b0-dir``)
    normalised, or ``b0_dir_from_affine(affine)`` where it is None. Returns a tuple of 3 float."""
    return b0_dir_from_affine(affine) if b0_dir is None else unit_vector(b0_dir)


def unit_vector(vector):
    """``vector`` (3 numbers, non-zero) scaled to unit length, in float64, as a tuple of 3 float."""
    v = np.asarray(vector, dtype=np.float64)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def b0_tilt_deg(b0_dir, reference=(0.0, 0.0, 1.0)):
    """Angle in degrees (0-90: a direction and its opposite are one axis) between ``b0_dir`` and ``reference``,
    both in voxel coordinates; ``reference`` defaults to the k axis."""
    b, r = np.asarray(b0_dir, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.degrees(np.arccos(min(1.0, abs(b @ r) / (np.linalg.norm(b) * np.linalg.norm(r))))))


def to_ras(volume, affine):
    """``volume`` (3D, or 4D with echoes last) with its voxel axes reordered and flipped to the nearest RAS+ order.

    Axis 0 then runs towards the subject's right, 1 anterior, 2 superior, whatever the acquisition's voxel
    order (e.g. LPS from DICOM converters, sagittal slabs). Only permutations and flips
    (``nibabel.orientations``): no resampling, an oblique slab keeps its tilt.
    """
    return apply_orientation(np.asarray(volume), io_orientation(affine))


def from_ras(volume, affine):
    """The inverse of ``to_ras``: a volume in RAS+ order back in the voxel order of ``affine``."""
    return apply_orientation(np.asarray(volume), ornt_transform(axcodes2ornt("RAS"), io_orientation(affine)))


def ras_voxel_size(affine):
    """Voxel size in mm along each axis of the volume ``to_ras`` makes of an image with this ``affine``."""
    ras = np.empty(3)
    ras[io_orientation(affine)[:, 0].astype(int)] = voxel_size_from_affine(affine)  # stored axis i -> RAS axis
    return tuple(float(v) for v in ras)


def call_in_ras_order(function, affine, *args, **kwargs):
    """``function(*args, **kwargs)`` with every argument that is an array on the grid of ``args[0]`` (3D, or 4D with
    echoes last) flipped and permuted into RAS+ storage order (``to_ras``), and its array result put back in the
    input's order. Other arguments pass unchanged, so give voxel sizes and directions in RAS+ terms
    (``ras_voxel_size``). Steps that are not invariant to permuting the array axes then depend on the data alone:
    a network's convolutions, finite differences, hole filling slice by slice."""
    grid = np.shape(args[0])[:3]

    def in_ras(value):
        return to_ras(value, affine) if isinstance(value, np.ndarray) and value.shape[:3] == grid else value

    result = function(*map(in_ras, args), **{name: in_ras(value) for name, value in kwargs.items()})
    return np.ascontiguousarray(from_ras(result, affine))


def invert_in_ras_order(invert, local_field_ppm, mask, affine, b0_dir, **params):
    """Run a dipole inversion on the arrays flipped and permuted into RAS+ storage order; chi back in the input's.

    The convolutional network and iLSQR's finite differences are not
    invariant to flipping or permuting the array axes: the same 15-degree
    oblique subject stored LPS and RAS gave maps 11 % apart (deep and
    iLSQR, relative norm; ``bench/accuracy.py --part storage``). Storing
    both in the closest RAS+ order
    (``nibabel.as_closest_canonical``'s flips and transposes, which are
    lossless) makes the map depend on the data alone (``call_in_ras_order``).

    Parameters
    ----------
    invert : callable
        ``invert(local_field_ppm, mask, voxel_size_mm, b0_dir, **params)``,
        one of ``qsmprep.inversion``'s functions.
    local_field_ppm, mask : arrays (i, j, k)
        The inversion's inputs, on the grid of ``affine``.
    affine : (4, 4) array
        Their voxel-to-world (RAS+, mm) affine; gives the order and the voxel size.
    b0_dir : tuple of 3 float
        B0 direction in the input's voxel coordinates.
    **params
        Passed to ``invert``; arrays on the input's grid (iLSQR's
        ``magnitude``) are reordered with the field.

    Returns
    -------
    chi (ppm) in the input's storage order.
    """
    ornt = io_orientation(affine)  # row i: (RAS axis of stored axis i, +1 or -1 for a flip)
    b0_ras = np.empty(3)
    b0_ras[ornt[:, 0].astype(int)] = ornt[:, 1] * np.asarray(b0_dir, dtype=np.float64)
    return call_in_ras_order(invert, affine, np.asarray(local_field_ppm), np.asarray(mask), ras_voxel_size(affine),
                             tuple(float(v) for v in b0_ras), **params)
