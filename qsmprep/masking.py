"""Brain masks from GRE magnitude (and an optional phase quality map).

Structuring elements are built in millimetres, so erosion by ``erode_mm``
removes the same physical thickness along every axis of anisotropic voxels.
See docs/methods/masking.md.
"""

import logging

import numpy as np

log = logging.getLogger(__name__)


def ball_mm(radius_mm, voxel_size_mm=(1.0, 1.0, 1.0)):
    """Boolean ball of radius ``radius_mm`` (mm) on a grid of ``voxel_size_mm``.

    A voxel offset (a, b, c) belongs to the ball when
    (a dx)^2 + (b dy)^2 + (c dz)^2 <= radius_mm^2, so on anisotropic voxels the
    element is an ellipsoid in index space and a sphere in mm. The centre voxel
    is always included; an axis whose voxel is larger than the radius gets
    extent 1 along it.

    Parameters
    ----------
    radius_mm : float
        Radius in mm; must be >= 0.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm along i, j, k.

    Returns
    -------
    bool array of odd shape (2 ri + 1, 2 rj + 1, 2 rk + 1), ri = floor(r / di).
    """
    if radius_mm < 0:
        raise ValueError(f"radius must be >= 0 mm, got {radius_mm!r}")
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    if vox.shape != (3,) or np.any(vox <= 0):
        raise ValueError(f"voxel size must be 3 positive values in mm, got {voxel_size_mm!r}")
    half = np.floor(radius_mm / vox + 1e-9).astype(int)
    axes = [np.arange(-h, h + 1) * d for h, d in zip(half, vox)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x**2 + y**2 + z**2 <= radius_mm**2 * (1 + 1e-9)
