"""Spherical mean value (SMV) filtering, the building block of SHARP-type methods.

The field of sources outside a region is harmonic inside it, and a harmonic
function equals its mean over any sphere that fits in the region (the mean
value property). So (delta - SMV) applied to the total field removes the
background field wherever the sphere fits in the mask.

Reference: Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative
imaging of intrinsic magnetic tissue properties using MRI signal phase: an
approach to in vivo brain iron metabolism? NeuroImage 2011;54:2789-2807.
"""

import numpy as np
from scipy import fft as spfft

from ..masking import VOXEL_SIZE_RTOL, ball_mm
from ..physics.arrays import fft_module


def smv_kernel(shape, voxel_size_mm=(1.0, 1.0, 1.0), radius_mm=5.0, rfft=False, device=None):
    """k-space kernel of the normalised sphere (the spherical mean value operator).

    The sphere is built in image space as the voxels whose centres lie within
    ``radius_mm`` (in mm, so anisotropic voxels give an ellipsoid in index
    space; see ``qsmprep.masking.ball_mm``), centred at voxel (0, 0, 0) with
    wrap-around, normalised to sum 1, then Fourier transformed. The ball is
    symmetric, so the transform is real; its value at DC is 1.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid shape; odd and even sizes are both handled. Each axis must hold
        the whole ball (2 floor(r / d) + 1 voxels).
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm along i, j, k.
    radius_mm : float, default 5.0
        Sphere radius in mm.
    rfft : bool, default False
        Return the half-spectrum matching ``scipy.fft.rfftn``.
    device : torch device or None, default None
        Build the sphere and transform it there, returning a torch tensor: the
        deep refinement's high-pass on a GPU (the padded 384^3 grid of a 256^3
        volume took 0.54 s in numpy on 2 CPU cores).

    Returns
    -------
    float32 array (or tensor on ``device``) in FFT (unshifted) order.
    """
    ball = ball_mm(radius_mm, voxel_size_mm)
    if any(b > n for b, n in zip(ball.shape, shape)):
        raise ValueError(f"a {radius_mm} mm sphere ({ball.shape} voxels) does not fit in a {tuple(shape)} grid")
    offsets = np.nonzero(ball)
    half = [(b - 1) // 2 for b in ball.shape]
    wrapped = tuple((o - h) % n for o, h, n in zip(offsets, half, shape))
    if device is None:
        sphere = np.zeros(shape, dtype=np.float32)
    else:
        import torch

        sphere = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        wrapped = tuple(torch.as_tensor(i, device=device) for i in wrapped)
    sphere[wrapped] = 1.0 / offsets[0].size
    fft = fft_module(sphere)
    spectrum = (fft.rfftn if rfft else fft.fftn)(sphere).real
    return spectrum.contiguous() if device is not None else spectrum.astype(np.float32)


def check_high_pass_radius(radius_mm, voxel_size_mm):
    """Raise ValueError when a sphere of ``radius_mm`` (mm) holds only its centre at ``voxel_size_mm`` (mm).

    Its spherical mean is then the identity and the high-pass (delta - SMV)
    zero, so a SHARP-type method using it (V-SHARP, RESHARP, the deep
    refinement's high-pass) would return a zero field. The sphere reaches a
    neighbour once the radius is the smallest voxel dimension; twice the
    largest is advised (``qsmprep.bgremove.vsharp.default_radii_mm``).
    """
    if ball_mm(radius_mm, voxel_size_mm).sum() == 1:
        voxel = " x ".join(f"{v:.6g}" for v in voxel_size_mm)
        # the smallest radius ball_mm accepts (its tolerance allows for float32 affines), rounded up to 0.001 mm
        smallest = np.ceil(min(voxel_size_mm) / (1 + VOXEL_SIZE_RTOL) * 1000) / 1000
        advised = round(2 * float(max(voxel_size_mm)), 3)
        raise ValueError(f"a {radius_mm:.10g} mm sphere reaches no neighbouring voxel at {voxel} mm voxels, so its "
                         f"high-pass field would be zero: give at least {smallest:g} mm "
                         f"({advised:g} mm, twice the largest voxel dimension, is advised)")


def smv_padded_shape(shape, voxel_size_mm, radius_mm):
    """Grid shape, padded at the far end of each axis, on which a circular SMV of ``radius_mm`` does not wrap.

    Each axis grows by ceil(radius / voxel size) voxels of zeros, and at least
    to the sphere's own width (a small grid must still hold the kernel), rounded
    up to a fast real-FFT size.
    """
    ball = ball_mm(radius_mm, voxel_size_mm).shape
    return tuple(
        spfft.next_fast_len(int(max(n + np.ceil(radius_mm / d * (1 - VOXEL_SIZE_RTOL)), b)), real=True)
        for n, d, b in zip(shape, voxel_size_mm, ball)
    )


def sphere_fits(mask_spectrum, kernel, shape, voxel_size_mm, radius_mm):
    """Voxels whose whole ``radius_mm`` sphere lies inside the mask (mask eroded by the sphere).

    Computed as SMV(mask) == 1 by FFT: with n voxels in the ball, a voxel is
    kept when SMV(mask) > 1 - 0.5 / n, i.e. no ball voxel is missing, which
    is robust to float32 FFT round-off.

    Parameters
    ----------
    mask_spectrum : complex array or tensor
        ``scipy.fft.rfftn`` of the (zero-padded) mask on ``shape``, or
        ``torch.fft.rfftn`` of it (the result is then a tensor on its device).
    kernel : float array or tensor
        ``smv_kernel(shape, voxel_size_mm, radius_mm, rfft=True)`` (with the
        same ``device`` for a tensor spectrum).
    shape : tuple of 3 int
        The padded grid shape.
    voxel_size_mm : tuple of 3 float
        Voxel size in mm.
    radius_mm : float
        Sphere radius in mm.

    Returns
    -------
    bool array (or tensor) of ``shape``.
    """
    n_ball = int(ball_mm(radius_mm, voxel_size_mm).sum())
    mean_of_mask = fft_module(mask_spectrum).irfftn(mask_spectrum * kernel, shape)
    return mean_of_mask > 1.0 - 0.5 / n_ball


def largest_fitting_radius(mask, voxel_size_mm, radius_mm):
    """The largest SMV radius (mm), at most ``radius_mm``, whose sphere fits somewhere inside ``mask``.

    ``radius_mm`` where its sphere fits (``sphere_fits``); else the largest of
    ``radius_mm`` - v, ``radius_mm`` - 2v, ... down to 2v (v the largest voxel
    dimension, V-SHARP's smallest radius: ``qsmprep.bgremove.vsharp.default_radii_mm``)
    whose sphere fits; else 0 (none: a mask under five voxels thick). A thin
    slab's mask (under about 30 mm after background removal's erosion at 8 mm)
    holds no 8 mm sphere, where a SHARP-type high-pass would leave no field to fit.

    Parameters
    ----------
    mask : bool array (i, j, k)
    voxel_size_mm : tuple of 3 float
        Voxel size in mm.
    radius_mm : float
        The radius wanted, in mm.
    """
    v = float(max(voxel_size_mm))
    radii = [radius_mm] + [r for r in np.arange(radius_mm - v, 2 * v - 1e-6, -v) if r >= 2 * v]
    m = np.asarray(mask, dtype=np.float32)
    shape = smv_padded_shape(m.shape, voxel_size_mm, radius_mm)  # padded for the largest: no smaller sphere wraps
    spectrum = spfft.rfftn(m, shape)  # once, for every radius tried
    for radius in radii:
        if sphere_fits(spectrum, smv_kernel(shape, voxel_size_mm, radius, rfft=True), shape, voxel_size_mm, radius).any():
            return float(radius)
    return 0.0

