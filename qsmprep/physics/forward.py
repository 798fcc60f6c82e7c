"""Forward model: susceptibility (ppm) -> field perturbation (ppm of B0)."""

import numpy as np
from scipy import fft as spfft

from .arrays import fft_module, is_tensor, to_device
from .kernel import dipole_kernel


def padded_shape(shape, pad_factor=2.0):
    """Grid shape at least ``pad_factor`` times ``shape``, rounded up to fast FFT sizes."""
    return tuple(spfft.next_fast_len(int(np.ceil(n * pad_factor)), real=True) for n in shape)


def filter_padded(volume, kernel_rfft, big_shape):
    """Multiply ``volume``'s spectrum by ``kernel_rfft`` on the zero-padded grid ``big_shape``; crop back.

    The one k-space filtering step shared by the forward model, the direct
    inversions, the deep refinement and the training losses: rfftn over the
    last three axes on the padded grid, multiplication by a half-spectrum
    kernel of that grid (``rfft=True`` layout), irfftn, crop to ``volume``'s
    shape. A numpy array is filtered by scipy.fft and returned as float32; a
    torch tensor by torch.fft on its own device (the kernel, numpy or torch,
    is moved there), with leading batch axes kept, and returned as a tensor.
    A volume already on ``big_shape`` is filtered as it is: the operators of
    PDF, RESHARP and iLSQR, which run on the padded grid.
    """
    axes = (-3, -2, -1)
    crop = (Ellipsis,) + tuple(slice(0, n) for n in np.shape(volume)[-3:])
    if is_tensor(volume):  # stay on its device (GPU refinement, losses)
        fft = fft_module(volume)
        kernel = to_device(kernel_rfft, volume.device)
        return fft.irfftn(fft.rfftn(volume, s=big_shape, dim=axes) * kernel, s=big_shape, dim=axes)[crop]
    spectrum = spfft.rfftn(np.asarray(volume, dtype=np.float32), s=big_shape, axes=axes)
    spectrum *= kernel_rfft
    return spfft.irfftn(spectrum, s=big_shape, axes=axes)[crop].astype(np.float32)


def forward_field_ppm(chi_ppm, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), pad_factor=2.0):
    """Field perturbation (ppm of B0) of a susceptibility distribution (ppm).

    f = F^-1[ D(k) F[chi] ] on a zero-padded grid, so the convolution is
    linear rather than circular, then cropped back to the input grid.

    References: Salomir R, de Senneville BD, Moonen CTW. A fast calculation method for magnetic field
    inhomogeneity due to an arbitrary distribution of bulk susceptibility. Concepts Magn Reson B
    2003;19B:26-34. Marques JP, Bowtell R. Application of a Fourier-based method for rapid calculation of
    field inhomogeneity due to spatial variation of magnetic susceptibility. Concepts Magn Reson B
    2005;25B:65-78.

    Parameters
    ----------
    chi_ppm : array (i, j, k), or torch tensor (..., i, j, k)
        Susceptibility in ppm; zero outside the sources. A tensor is filtered by torch.fft on its device,
        leading batch axes kept, and differentiably (the training losses).
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm.
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates.
    pad_factor : float, default 2.0
        Each axis is zero-padded to at least this multiple of its size.
        1.0 gives the circular convolution on the native grid.

    Returns
    -------
    float32 array (a tensor for a tensor), same shape as ``chi_ppm``: field in ppm.
    """
    chi = chi_ppm.float() if is_tensor(chi_ppm) else np.asarray(chi_ppm, dtype=np.float32)
    shape = tuple(chi.shape[-3:])
    big = padded_shape(shape, pad_factor) if pad_factor > 1 else shape
    return filter_padded(chi, dipole_kernel(big, voxel_size_mm, b0_dir, rfft=True), big)
