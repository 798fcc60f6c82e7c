"""Image-quality metrics used by the QSM reconstruction challenges.

All metrics compare a reconstruction with a reference inside a mask; both
are demeaned in the mask first unless stated otherwise (susceptibility is
relative: D(0) = 0 leaves its mean undetermined).

References: Langkammer C et al. Quantitative susceptibility mapping:
Report from the 2016 reconstruction challenge. Magn Reson Med 2018;79:1661-73.
Ravishankar S, Bresler Y. MR image reconstruction from highly undersampled
k-space data by dictionary learning. IEEE TMI 2011;30:1028-41 (HFEN).
"""

import numpy as np
from scipy import ndimage


def _demeaned_in_mask(recon, ref, mask):
    m = np.asarray(mask) > 0
    x = np.asarray(recon, dtype=np.float64)
    y = np.asarray(ref, dtype=np.float64)
    return (x - x[m].mean()) * m, (y - y[m].mean()) * m, m


def nrmse(recon, ref, mask, demean=True):
    """Normalised RMSE in percent: 100 ||x - y||_2 / ||y||_2 over ``mask``.

    With ``demean`` (default True) both images are demeaned in the mask first,
    as in the 2016 challenge.
    """
    if demean:
        x, y, m = _demeaned_in_mask(recon, ref, mask)
    else:
        m = np.asarray(mask) > 0
        x, y = np.asarray(recon, np.float64) * m, np.asarray(ref, np.float64) * m
    return float(100 * np.linalg.norm(x[m] - y[m]) / np.linalg.norm(y[m]))


def hfen(recon, ref, mask, sigma=1.5):
    """High-frequency error norm in percent.

    100 ||LoG(x) - LoG(y)||_2 / ||LoG(y)||_2 over ``mask``, with the
    Laplacian-of-Gaussian of width ``sigma`` voxels (default 1.5, as in the
    2016 challenge) applied to the demeaned, masked images.
    """
    x, y, m = _demeaned_in_mask(recon, ref, mask)
    lx = ndimage.gaussian_laplace(x, sigma)
    ly = ndimage.gaussian_laplace(y, sigma)
    return float(100 * np.linalg.norm(lx[m] - ly[m]) / np.linalg.norm(ly[m]))
