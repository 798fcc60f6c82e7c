"""RESHARP: SHARP with Tikhonov regularisation instead of truncated deconvolution."""

import numpy as np
from scipy import fft as spfft

from ..inversion.solvers import cg
from ..physics.forward import filter_padded
from .smv import check_high_pass_radius, smv_kernel, smv_padded_shape, sphere_fits


def resharp(total_field, mask, voxel_size_mm=(1.0, 1.0, 1.0), radius_mm=4.0, lam=1e-3, tol=1e-6, max_iter=200):
    """Remove the background field by RESHARP (Tikhonov-regularised SHARP).

    Solves  min_x || M_e C x - M_e C f ||^2 + lam || x ||^2  with
    C = delta - S (S the SMV of ``radius_mm``), f the total field and M_e the
    mask eroded by the sphere, through its normal equations
    (C M_e C + lam I) x = C M_e C f by conjugate gradients (C is symmetric:
    the sphere is). The local field is x inside M_e. Like all SMV methods it
    does not recover the constant (DC) part of the local field.

    Reference: Sun H, Wilman AH. Background field removal using spherical
    mean value filtering and Tikhonov regularization. Magn Reson Med
    2014;71:1151-57. The default ``lam`` 1e-3 is the value given in the help
    text of the authors' released ``resharp.m``; the paper tunes lam per data
    set, so treat it as a starting point.

    Parameters
    ----------
    total_field : array (i, j, k)
        Unwrapped total field, any linear unit (the output has the same unit;
        the pipeline passes ppm). Values outside ``mask`` are ignored.
    mask : array (i, j, k)
        Brain mask (non-zero inside).
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm (anisotropic allowed).
    radius_mm : float, default 4.0
        SMV sphere radius in mm; one that reaches no neighbouring voxel is
        refused (``check_high_pass_radius``).
    lam : float, default 1e-3
        Tikhonov weight (dimensionless: the problem is linear, so it does not
        depend on the field unit).
    tol : float, default 1e-6
        CG stops when the normal-equation residual is below tol times that
        of the right-hand side.
    max_iter : int, default 200
        Maximum CG iterations.

    Returns
    -------
    local_field : float32 array, same shape and unit as ``total_field``, zero
        outside ``eroded_mask``.
    eroded_mask : bool array: the voxels whose ``radius_mm`` sphere fits in ``mask``.
    """
    field = np.asarray(total_field, dtype=np.float32)
    inside = np.asarray(mask) > 0
    if field.shape != inside.shape:
        raise ValueError(f"field {field.shape} and mask {inside.shape} must have the same shape")
    check_high_pass_radius(radius_mm, voxel_size_mm)
    shape = smv_padded_shape(field.shape, voxel_size_mm, radius_mm)
    crop = tuple(slice(0, n) for n in field.shape)
    kernel = smv_kernel(shape, voxel_size_mm, radius_mm, rfft=True)
    high_pass_kernel = 1 - kernel
    mask_spectrum = spfft.rfftn(inside.astype(np.float32), s=shape)
    eroded = sphere_fits(mask_spectrum, kernel, shape, voxel_size_mm, radius_mm)

    def high_pass(x):
        return filter_padded(x, high_pass_kernel, shape)

    def normal_operator(x):
        return high_pass(eroded * high_pass(x)) + lam * x

    padded_field = np.zeros(shape, dtype=np.float32)
    padded_field[crop] = np.where(inside, field, 0)
    rhs = high_pass(eroded * high_pass(padded_field))
    local = cg(normal_operator, rhs, tol=tol, max_iter=max_iter)
    eroded_mask = eroded[crop]
    return np.where(eroded_mask, local[crop], 0).astype(np.float32), eroded_mask
