"""Resampling between an acquisition grid and a B0-aligned grid.

Most of qsmprep works on any grid: the dipole kernel takes anisotropic voxels
and any B0 direction. Methods that do not (deep networks trained on axial,
isotropic data) need the data on a grid whose third axis is along B0 and,
optionally, with isotropic voxels; their result then goes back to the
acquisition grid. docs/methods/resampling.md explains the choices made here.
"""

import logging

import numpy as np
from scipy import ndimage

from .orientation import SCANNER_B0_WORLD, voxel_rotation, voxel_size_from_affine

logger = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def rotation_between(a, b):
    """Smallest rotation matrix taking unit vector ``a`` onto unit vector ``b`` (Rodrigues)."""
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if np.linalg.norm(v) < 1e-12:
        if c > 0:
            return np.eye(3)
        # antiparallel: a half turn about any axis perpendicular to a
        axis = np.cross(a, np.eye(3)[np.argmin(np.abs(a))])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def b0_aligned_grid(shape, affine, voxel_size_mm=None, b0_world=SCANNER_B0_WORLD):
    """A grid whose third voxel axis is along B0 and which covers the input FOV.

    The voxel axis of ``affine`` closest to B0 becomes the third axis (the
    other two keep their order) and all three are turned by the smallest
    rotation that puts it exactly on B0, so an axial acquisition rotated
    in-plane keeps its in-plane orientation and needs no resampling at all.
    The new grid is the bounding box, in the new axes, of the input's field
    of view (voxel edges), centred on it, with one more voxel along an axis
    where that keeps the input's parity at the input's voxel size (so that
    at a small tilt the two grids' voxel centres nearly coincide rather than
    lie half a voxel apart); where it reaches outside the input FOV (the
    corners of an oblique slab) resampled data are zero.

    Parameters
    ----------
    shape : tuple of int
        Input grid shape (the first three entries are used).
    affine : (4, 4) array
        Input voxel-to-world affine (scanner RAS+, mm).
    voxel_size_mm : None, float or tuple of 3 float, default None
        Voxel size of the new grid in mm; None keeps the input voxel sizes
        (reordered with the axes); a float gives isotropic voxels.
    b0_world : tuple of 3 float, default (0, 0, 1)
        B0 direction in world coordinates.

    Returns
    -------
    (shape, affine): tuple of 3 int and a (4, 4) float64 array.
    """
    affine = np.asarray(affine, dtype=np.float64)
    b0 = np.asarray(b0_world, dtype=np.float64)
    b0 = b0 / np.linalg.norm(b0)
    rotation = voxel_rotation(affine)
    closeness = np.abs(rotation.T @ b0)
    closeness[2] += 1e-6  # a tie (a 45 degree slab) keeps the slice axis third
    along_b0 = int(np.argmax(closeness))
    order = [a for a in range(3) if a != along_b0] + [along_b0]
    axes = rotation[:, order]
    if axes[:, 2] @ b0 < 0:
        axes[:, 2] = -axes[:, 2]
    axes = rotation_between(axes[:, 2], b0) @ axes
    axes[:, 2] = b0  # exact, not up to rounding

    native_size = np.asarray(voxel_size_from_affine(affine))
    if voxel_size_mm is None:
        new_size = native_size[order]
    else:
        new_size = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,)).copy()

    # FOV corners (voxel edges) in world, projected on the new axes
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    projected = axes.T @ world
    low, high = projected.min(axis=1), projected.max(axis=1)
    new_shape = np.maximum(np.ceil((high - low) / new_size - 1e-6).astype(int), 1)
    if np.allclose(new_size, native_size[order]):
        # the native grid's parity along each axis: both grids centred on the FOV then share their voxel centres
        # where the tilt is small, instead of lying half a voxel apart (interpolation's worst case, paid twice)
        new_shape += (new_shape - np.asarray(shape[:3])[order]) % 2
    first_centre = (low + high) / 2 - (new_shape - 1) / 2 * new_size

    new_affine = np.eye(4)
    new_affine[:3, :3] = axes * new_size
    new_affine[:3, 3] = axes @ first_centre
    return tuple(int(n) for n in new_shape), new_affine


def antialias_sigma_vox(affine, target_affine):
    """Gaussian pre-filter widths (source voxels) for resampling onto ``target_affine``.

    s_i, the extent of one target voxel along source axis i in source voxels,
    is the norm of row i of the target-to-source index matrix. Where s_i > 1
    (downsampling) the filter's FWHM is sqrt(s_i^2 - 1) source voxels, so that
    combined in quadrature with the source voxel's own width it spans a
    target voxel: sigma_i = sqrt(s_i^2 - 1) / 2.355; 0 where s_i <= 1.
    """
    index_map = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
    extent = np.linalg.norm(index_map[:3, :3], axis=1)
    return tuple(float(v) for v in np.sqrt(np.maximum(extent**2 - 1.0, 0.0)) / FWHM_PER_SIGMA)


def _inside_fov(source_shape, matrix, offset, target_shape):
    """Target voxels whose centre maps inside the source FOV (voxel edges -0.5 .. n - 0.5)."""
    axes = [np.arange(n, dtype=np.float64) for n in target_shape]
    inside = np.ones(target_shape, bool)
    for i, n in enumerate(source_shape):
        coord = offset[i] + sum(
            matrix[i, j] * axes[j].reshape([-1 if a == j else 1 for a in range(3)])
            for j in range(3)
        )
        inside &= (coord >= -0.5 - 1e-6) & (coord <= n - 0.5 + 1e-6)
    return inside


def _resample_real(volume, matrix, offset, target_shape, order, sigma):
    if any(s > 0 for s in sigma):
        volume = ndimage.gaussian_filter(volume, sigma, mode="nearest")
    # "nearest" extends the edge voxels over the outer half voxel of the FOV;
    # the caller zeroes everything beyond it
    return ndimage.affine_transform(
        volume, matrix, offset=offset, output_shape=target_shape, order=order, mode="nearest"
    )


def resample_to_grid(
    data, affine, target_shape, target_affine, order=1, complex_mode="real_imag", antialias=True
):
    """Resample ``data`` from its grid onto another grid (same world space).

    Each target voxel centre is mapped to source voxel coordinates through
    the two affines and interpolated with ``scipy.ndimage.affine_transform``
    (vectorised). The source FOV reaches to the outer voxel edges (the edge
    voxels are extended over that last half voxel); target voxels whose
    centre falls outside it are 0.

    Parameters
    ----------
    data : array, 3D or more (extra trailing axes, e.g. echoes, are resampled
        volume by volume), real or complex
        Real data must be a smooth quantity (field in Hz or ppm, chi,
        magnitude, unwrapped phase). Never pass wrapped phase as a real
        image: interpolating between +pi - e and -pi + e gives ~0 instead of
        ~pi, a spurious wrap; pass the complex signal (or exp(1j * phase))
        instead.
    affine, target_affine : (4, 4) arrays
        Voxel-to-world affines of the source and target grids.
    target_shape : tuple of 3 int
    order : int, default 1
        Spline order: 1 (trilinear; no overshoot at mask edges, preserves
        ranges, the default) or 3 (cubic B-spline; less interpolation blur
        for smooth fields, but can ring next to sharp edges).
    complex_mode : {"real_imag", "magnitude_phase"}, default "real_imag"
        For complex data. "real_imag": the real and imaginary parts are
        resampled (interpolation is linear, so this is the complex
        interpolation; wraps are never interpolated, and phase cancellation
        inside a large target voxel lowers the magnitude as in a real
        low-resolution acquisition). "magnitude_phase": the magnitude is
        resampled as a real image and the phase is taken from the
        resampled complex data, so magnitude is not lowered where phase
        varies fast (for magnitude-based masking and weighting).
    antialias : bool, default True
        Gaussian pre-filter where the target grid is coarser than the source
        (see ``antialias_sigma_vox``); no filtering otherwise.

    Returns
    -------
    array of shape target_shape + data.shape[3:], float32 or complex64.
    """
    if order not in (1, 3):
        raise ValueError(f"order must be 1 or 3, not {order}")
    if complex_mode not in ("real_imag", "magnitude_phase"):
        raise ValueError(f"complex_mode must be 'real_imag' or 'magnitude_phase', not {complex_mode!r}")
    data = np.asarray(data)
    target_shape = tuple(int(n) for n in target_shape[:3])
    index_map = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
    matrix, offset = index_map[:3, :3], index_map[:3, 3]
    sigma = antialias_sigma_vox(affine, target_affine) if antialias else (0.0, 0.0, 0.0)
    logger.debug("resampling %s -> %s, order %d, anti-aliasing sigma %s voxels", data.shape, target_shape, order, sigma)

    inside = _inside_fov(data.shape[:3], matrix, offset, target_shape)

    def one(volume):
        return _resample_real(volume, matrix, offset, target_shape, order, sigma) * inside

    volumes = data.reshape(data.shape[:3] + (-1,))
    is_complex = np.iscomplexobj(data)
    out = np.empty(target_shape + (volumes.shape[3],), np.complex64 if is_complex else np.float32)
    for v in range(volumes.shape[3]):
        volume = volumes[..., v]
        if not is_complex:
            out[..., v] = one(volume.astype(np.float64))
            continue
        resampled = one(volume.real.astype(np.float64)) + 1j * one(volume.imag.astype(np.float64))
        if complex_mode == "magnitude_phase":
            resampled = one(np.abs(volume).astype(np.float64)) * np.exp(1j * np.angle(resampled))
        out[..., v] = resampled
    return out.reshape(target_shape + data.shape[3:])


def to_b0_aligned(data, affine, voxel_size_mm=None, order=1):
    """Resample ``data`` onto its B0-aligned grid (see ``b0_aligned_grid``).

    Parameters
    ----------
    data : array (i, j, k[, ...])
        Image on the grid of ``affine``; axes after the third are resampled alike.
    affine : array (4, 4)
        Its voxel-to-world affine (mm).
    voxel_size_mm : tuple of 3 float or None, default None
        Voxel size of the aligned grid in mm; None keeps the input's (``b0_aligned_grid``).
    order : int, default 1
        Spline order of the interpolation (1 trilinear, 3 cubic; ``resample_to_grid``, whose default
        ``complex_mode`` complex data get).

    Returns
    -------
    (data_aligned, aligned_affine). On the aligned grid
    ``b0_dir_from_affine(aligned_affine)`` is (0, 0, 1).
    """
    shape, aligned_affine = b0_aligned_grid(np.shape(data), affine, voxel_size_mm)
    return resample_to_grid(data, affine, shape, aligned_affine, order), aligned_affine


def field_and_mask_to_b0_aligned(field, mask, affine, voxel_size_mm=None, order=1):
    """A local field and its mask on their B0-aligned grid (``to_b0_aligned``; ``voxel_size_mm`` and the field's
    interpolation ``order`` as there): the mask is its linear resampling > 0.5, and the field is zero outside it.

    Returns (field_aligned, mask_aligned (bool), aligned_affine).
    """
    field_aligned, aligned_affine = to_b0_aligned(field, affine, voxel_size_mm, order=order)
    mask_aligned = to_b0_aligned(np.asarray(mask, dtype=np.float32), affine, voxel_size_mm)[0] > 0.5
    return field_aligned * mask_aligned, mask_aligned, aligned_affine


def from_b0_aligned(data_aligned, aligned_affine, native_shape, native_affine, order=1):
    """Resample data from the B0-aligned grid back onto the native grid.

    The inverse of ``to_b0_aligned`` up to interpolation blur (and zero
    outside the aligned grid's coverage, which contains the native FOV).
    ``native_shape`` and ``native_affine`` (mm) are the native grid's; ``order`` (default 1, trilinear) as for
    ``to_b0_aligned``.
    """
    return resample_to_grid(data_aligned, aligned_affine, native_shape, native_affine, order)
