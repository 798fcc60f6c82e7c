"""iLSQR: LSQR dipole inversion with streaking-artefact estimation and removal.

Reference: Li W, Wang N, Yu F, Han H, Cao W, Romero R, Tantiwongkosi B,
Duong TQ, Liu C. A method for estimating and removing streaking artifacts in
quantitative susceptibility mapping. NeuroImage 2015;108:111-122.

Four steps (see ``ilsqr`` and docs/methods/inversion.md):

1. chi_lsqr: weighted least squares fit of the dipole model to the field,
   solved by LSQR with early stopping; voxels whose field Laplacian is large
   (noise, phase errors, veins) are down-weighted.
2. chi_fast: a fast, streak-free but blurred estimate from sign(D) F f,
   smoothed in the ill-conditioned part of k-space and scaled to TKD.
3. chi_streak: the streaking artefacts, the image whose spectrum lives only
   in the ill-conditioned cone |D| < 0.1 and whose gradients match those of
   chi_lsqr where chi_fast says the tissue is smooth; solved by LSQR.
4. chi = M (chi_lsqr - chi_streak).
"""

import logging

import numpy as np
from scipy import fft as spfft

from ..bgremove.smv import smv_kernel
from ..physics import dipole_kernel, filter_padded, padded_shape
from .gradient import forward_gradient, forward_gradient_adjoint, masked_laplacian
from .solvers import lsqr
from .tkd import tkd

log = logging.getLogger(__name__)

LAPLACIAN_PERCENTILES = (60.0, 99.9)
"""Field-Laplacian percentiles (in the mask) between which the step-1 weight falls from 1 to 0."""
GRADIENT_PERCENTILES = (50.0, 70.0)
"""chi_fast gradient percentiles (in the mask) between which the step-3 weight falls from 1 to 0."""
KSPACE_WEIGHT_PERCENTILES = (1.0, 30.0)
"""|D| percentiles (over k-space) between which the step-2 blend goes from smoothed to unsmoothed."""
KSPACE_WEIGHT_EXPONENT = 0.001
"""Exponent n of |D|^n in the step-2 k-space weight (nearly a log |D| ramp)."""
FAST_SMOOTHING_RADIUS_MM = 3.0
"""Radius of the spherical mean used to smooth the ill-conditioned spectrum in step 2."""
FAST_TKD_THRESHOLD = 1.0 / 8.0
"""TKD threshold of the map that fixes chi_fast's scale and offset."""
CONE_THRESHOLD = 0.1
"""|D| below which k-space is ill-conditioned and streaks live (step 3)."""


def _ramp_weight(values, mask, percentiles):
    """1 below the lower percentile (in ``mask``) of ``values``, 0 above the upper, linear between; 0 outside."""
    low, high = np.percentile(values[mask], percentiles)
    w = np.clip((high - values) / max(high - low, np.finfo(np.float32).tiny), 0.0, 1.0)
    return np.where(mask, w, 0).astype(np.float32)


def _initial_lsqr(field, mask, d, shape, voxel_size_mm, data_weight, tol, max_iter):
    """Step 1: chi from the weighted normal equations D^T W D chi = D^T W f, by early-stopped LSQR."""
    w = data_weight * _ramp_weight(np.abs(masked_laplacian(field, mask, voxel_size_mm)), mask, LAPLACIAN_PERCENTILES)

    def convolve(x):
        return filter_padded(x, d, shape)

    def normal_operator(x):  # symmetric: its own adjoint
        return convolve(w * convolve(x))

    return lsqr(normal_operator, normal_operator, convolve(w * field), tol=tol, max_iter=max_iter)


def _fast_estimate(field, mask, d, shape, voxel_size_mm, b0_dir):
    """Step 2: streak-free, smoothed chi from sign(D) F f, scaled to a TKD map."""
    spectrum = np.sign(d) * spfft.rfftn(field)
    magnitude_power = np.abs(d) ** KSPACE_WEIGHT_EXPONENT
    low, high = np.percentile(magnitude_power, KSPACE_WEIGHT_PERCENTILES)
    w = np.clip((magnitude_power - low) / (high - low), 0.0, 1.0)
    # keep the well-conditioned spectrum, use its spherical mean in the cone
    blend = w + (1 - w) * smv_kernel(shape, voxel_size_mm, FAST_SMOOTHING_RADIUS_MM, rfft=True)
    chi = np.where(mask, spfft.irfftn(spectrum * blend, s=shape), 0)
    chi = np.where(mask, filter_padded(chi, blend, shape), 0)
    # sign(D) F f carries the right structure but not the right scale: fit a chi + b to TKD
    reference = tkd(field, mask, voxel_size_mm, b0_dir, threshold=FAST_TKD_THRESHOLD)
    design = np.stack([chi[mask], np.ones(int(mask.sum()), dtype=np.float32)], axis=1)
    (slope, offset), *_ = np.linalg.lstsq(design.astype(np.float64), reference[mask].astype(np.float64), rcond=None)
    return np.where(mask, slope * chi + offset, 0).astype(np.float32)


def _streaking_artefacts(chi_lsqr, chi_fast, mask, d, shape, voxel_size_mm, tol, max_iter):
    """Step 3: the cone-supported image whose weighted gradients match chi_lsqr's.

    The operator is A = W grad P with P the projection onto the cone. LSQR
    from zero keeps its iterates in the range of A^T, inside the range of P,
    where P x = x; so A is applied as W grad, and P once at the end.
    """
    per_mm = [np.float32(1.0 / d) for d in voxel_size_mm]
    gradients = forward_gradient(chi_fast, per_mm)
    weights = [_ramp_weight(np.abs(g), mask, GRADIENT_PERCENTILES) * s for g, s in zip(gradients, per_mm)]
    cone = (np.abs(d) < CONE_THRESHOLD).astype(np.float32)

    def project(x):
        return filter_padded(x, cone, shape)

    streaks = lsqr(
        lambda x: forward_gradient(x, weights),
        lambda y: project(forward_gradient_adjoint(y, weights)),
        forward_gradient(chi_lsqr, weights),
        tol=tol,
        max_iter=max_iter,
    )
    return project(streaks)


def ilsqr(
    local_field_ppm,
    mask,
    voxel_size_mm=(1.0, 1.0, 1.0),
    b0_dir=(0.0, 0.0, 1.0),
    tol=0.01,
    max_iter=50,
    magnitude=None,
    pad_factor=1.0,
):
    """Susceptibility (ppm) by iLSQR: LSQR, then streaking-artefact estimation and subtraction.

    Li W, Wang N, Yu F, et al. A method for estimating and removing streaking
    artifacts in quantitative susceptibility mapping. NeuroImage
    2015;108:111-122.

    1. chi_lsqr solves the weighted normal equations
       F^-1 D F W1 F^-1 D F chi = F^-1 D F W1 f (the paper's Eq. 6, the
       normal equations of min ||W1^(1/2) (F^-1 D F chi - f)||_2), by LSQR
       (``tol``, ``max_iter``; early stopping is the regularisation). W1 is 1 where
       the field's 7-point Laplacian (inside the mask) is below its 60th
       percentile in the mask, falls linearly to 0 at its 99.9th percentile,
       and is 0 outside the mask; times the magnitude if one is given.
    2. chi_fast: F^-1[sign(D) F f] (the dipole kernel's magnitude applied
       to chi), where the spectrum is blended with its 3 mm spherical mean
       according to a |D|^0.001 ramp between its 1st and 30th percentiles
       over k-space, masked, blended again, and finally scaled and offset by
       a least-squares fit to TKD (threshold 1/8) inside the mask.
    3. chi_streak = argmin ||W3 grad(P chi_s) - W3 grad(chi_lsqr)||_2 by
       LSQR (``tol``, ``max_iter``), with P the projection onto the
       ill-conditioned cone |D| < 0.1 and W3 per-axis weights that are 1
       where |grad chi_fast| is below its 50th percentile in the mask and
       fall linearly to 0 at its 70th: where the tissue is smooth, gradients
       of chi_lsqr with a cone-supported spectrum are streaks.
    4. chi = M (chi_lsqr - chi_streak).

    The paper solves step 3 with LSMR; here it is LSQR, which converges to
    the same minimiser. The field's Laplacian uses only neighbours in the
    mask, so the mask edge does not count as a large Laplacian.

    Parameters
    ----------
    local_field_ppm : array (i, j, k)
        Local (tissue) field in ppm of B0; only values inside ``mask`` are used.
    mask : array (i, j, k)
        Region of interest (non-zero = inside); the result is zero outside.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm (anisotropic allowed).
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates.
    tol : float, default 0.01
        LSQR stopping tolerance of steps 1 and 3 (see ``qsmprep.inversion.lsqr``);
        0.01 as in the paper.
    max_iter : int, default 50
        Maximum LSQR iterations of steps 1 and 3; 50 as in the paper.
    magnitude : array (i, j, k) or None, default None
        GRE magnitude; if given, it multiplies the step-1 data weight
        (scaled by its 99th percentile in the mask and clipped to 1).
    pad_factor : float, default 1.0
        Zero-pad each axis to at least this multiple of its size (rounded up
        to a fast FFT size). Time grows with the padded volume.

    Returns
    -------
    float32 array, same shape: susceptibility in ppm, zero outside ``mask``.
    """
    m_in = np.asarray(mask) > 0
    if not m_in.any():
        raise ValueError("the mask is empty")
    shape_in = m_in.shape
    shape = padded_shape(shape_in, pad_factor)
    crop = tuple(slice(0, n) for n in shape_in)

    def pad(a):
        out = np.zeros(shape, dtype=a.dtype)
        out[crop] = a
        return out

    m = pad(m_in)
    field = pad(np.where(m_in, np.asarray(local_field_ppm, dtype=np.float32), np.float32(0)))
    data_weight = np.float32(1.0)
    if magnitude is not None:
        mag = np.abs(np.asarray(magnitude, dtype=np.float32))
        scale = np.percentile(mag[m_in], 99)
        data_weight = pad(np.clip(mag / scale if scale > 0 else np.ones_like(mag), 0, 1).astype(np.float32))
    d = dipole_kernel(shape, voxel_size_mm, b0_dir, rfft=True)

    chi_lsqr = _initial_lsqr(field, m, d, shape, voxel_size_mm, data_weight, tol, max_iter)
    log.info("iLSQR step 1 (weighted LSQR) done")
    chi_fast = _fast_estimate(field, m, d, shape, voxel_size_mm, b0_dir)
    log.info("iLSQR step 2 (fast estimate) done")
    chi_streak = _streaking_artefacts(chi_lsqr, chi_fast, m, d, shape, voxel_size_mm, tol, max_iter)
    log.info("iLSQR step 3 (streaking artefacts) done")
    return np.where(m_in, (chi_lsqr - chi_streak)[crop], 0).astype(np.float32)
