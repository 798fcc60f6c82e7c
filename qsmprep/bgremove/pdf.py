"""PDF: projection onto dipole fields."""

import numpy as np

from ..inversion.solvers import cg
from ..physics.forward import filter_padded, padded_shape
from ..physics.kernel import dipole_kernel


def pdf(
    total_field,
    mask,
    voxel_size_mm=(1.0, 1.0, 1.0),
    b0_dir=(0.0, 0.0, 1.0),
    tol=1e-5,
    max_iter=100,
    weights=None,
    pad_factor=1.5,
):
    """Remove the background field by projection onto dipole fields (PDF).

    Fits a background susceptibility chi_b, allowed only outside the mask
    (including a zero-padded margin beyond the field of view), whose dipole
    field best matches the total field inside the mask:

        min_chi_b || W (f - D * (M_out chi_b)) ||^2   over the mask,

    solved through the normal equations M_out D W^2 D M_out chi_b =
    M_out D W^2 f by conjugate gradients on the padded grid (D the unit
    dipole convolution, W the weights inside the mask and 0 outside). The
    local field is f - D * (M_out chi_b) inside the mask. The dipole kernel
    is zero at DC, so a constant offset of f stays in the local field.

    Reference: Liu T, Khalidov I, de Rochefort L, Spincemaille P, Liu J,
    Tsiouris AJ, Wang Y. A novel background field removal method for MRI
    using projection onto dipole fields (PDF). NMR Biomed 2011;24:1129-36.

    Parameters
    ----------
    total_field : array (i, j, k)
        Unwrapped total field in ppm (the dipole kernel is the unit one, so
        any linear unit works and is kept). Values outside ``mask`` are ignored.
    mask : array (i, j, k)
        Brain mask (non-zero inside); it is not eroded.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm (anisotropic allowed).
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates.
    tol : float, default 1e-5
        CG stops when the normal-equation residual is below tol times that of
        the right-hand side.
    max_iter : int, default 100
        Maximum CG iterations. CG approaches tol slowly; see
        docs/methods/bgremove.md for the residual background measured at
        100 and more iterations.
    weights : array (i, j, k) or None, default None
        Data weights inside the mask, e.g. the inverse noise standard
        deviation of the field (Liu et al.) or the magnitude; None weighs
        every mask voxel equally.
    pad_factor : float, default 1.5
        The grid is zero-padded to at least this multiple of its size on
        each axis, giving background sources room beyond the field of view.

    Returns
    -------
    local_field : float32 array, same shape and unit as ``total_field``, zero
        outside ``mask``.
    mask : bool array: the input mask (PDF does not erode it).
    """
    field = np.asarray(total_field, dtype=np.float32)
    inside = np.asarray(mask) > 0
    if field.shape != inside.shape:
        raise ValueError(f"field {field.shape} and mask {inside.shape} must have the same shape")
    shape = padded_shape(field.shape, pad_factor)
    crop = tuple(slice(0, n) for n in field.shape)
    kernel = dipole_kernel(shape, voxel_size_mm, b0_dir, rfft=True)

    weights2 = np.zeros(shape, dtype=np.float32)
    if weights is None:
        weights2[crop] = inside
    else:
        w = np.asarray(weights, dtype=np.float32)
        if w.shape != field.shape:
            raise ValueError(f"weights {w.shape} and field {field.shape} must have the same shape")
        weights2[crop] = np.where(inside, w * w, 0)
    outside = np.ones(shape, dtype=bool)
    outside[crop] = ~inside

    def dipole(x):
        return filter_padded(x, kernel, shape)

    def normal_operator(chi):
        return outside * dipole(weights2 * dipole(outside * chi))

    padded_field = np.zeros(shape, dtype=np.float32)
    padded_field[crop] = np.where(inside, field, 0)
    rhs = outside * dipole(weights2 * padded_field)
    chi_background = cg(normal_operator, rhs, tol=tol, max_iter=max_iter)
    background = dipole(outside * chi_background)[crop]
    return np.where(inside, field - background, 0).astype(np.float32), inside
