"""B0 direction in voxel coordinates from a NIfTI affine."""

import numpy as np

SCANNER_B0_WORLD = (0.0, 0.0, 1.0)
"""B0 in NIfTI world (scanner RAS+) coordinates: along the z (S-I) axis."""


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
    w = np.asarray(b0_world, dtype=np.float64)
    w = w / np.linalg.norm(w)
    b = voxel_rotation(affine).T @ w
    return tuple(float(v) for v in b / np.linalg.norm(b))


def b0_tilt_deg(b0_dir):
    """Angle in degrees between ``b0_dir`` (voxel coordinates) and the k axis."""
    b = np.asarray(b0_dir, dtype=np.float64)
    return float(np.degrees(np.arccos(min(1.0, abs(b[2]) / np.linalg.norm(b)))))
