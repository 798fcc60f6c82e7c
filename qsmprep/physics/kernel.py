"""k-space grids and the unit dipole kernel.

Reference: Salomir R, de Senneville BD, Moonen CT. A fast calculation method
for magnetic field inhomogeneity due to an arbitrary distribution of bulk
susceptibility. Concepts Magn Reson B 2003;19B:26-34. Marques JP, Bowtell R.
Application of a Fourier-based method for rapid calculation of field
inhomogeneity due to spatial variation of magnetic susceptibility. Concepts
Magn Reson B 2005;25B:65-78.
"""

from functools import lru_cache

import numpy as np
from scipy import fft as spfft

from .arrays import to_device


def kspace_grid(shape, voxel_size_mm=(1.0, 1.0, 1.0), rfft=False):
    """Spatial frequencies (cycles/mm) along each array axis, broadcastable.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid shape (i, j, k); odd and even sizes are both exact.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm along i, j, k.
    rfft : bool, default False
        If True, the last axis holds only the non-negative frequencies
        (``scipy.fft.rfftn`` layout), halving memory and FFT work.

    Returns
    -------
    tuple of 3 float32 arrays shaped (n0,1,1), (1,n1,1), (1,1,n2'), in FFT
    (unshifted) order, so that k[0,0,0] is the DC term.
    """
    freqs = []
    for axis, (n, d) in enumerate(zip(shape, voxel_size_mm)):
        f = spfft.rfftfreq(n, d=d) if (rfft and axis == 2) else spfft.fftfreq(n, d=d)
        view = [1, 1, 1]
        view[axis] = f.size
        freqs.append(f.astype(np.float32).reshape(view))
    return tuple(freqs)


def dipole_kernel(shape, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), rfft=False, device=None):
    """Unit dipole kernel in k-space: D(k) = 1/3 - (k . b)^2 / |k|^2, with D(0) = 0.

    Multiplying the Fourier transform of chi (ppm) by D gives that of the
    field perturbation along B0 in ppm (Lorentz sphere correction included).
    D(0) is set to 0, so a constant susceptibility offset gives no field.

    On an even axis the Nyquist sample stands for both +n/2 and -n/2, and
    with B0 oblique to the voxel axes D differs between the two (the cross
    terms k_i k_j b_i b_j change sign). D there is the mean over both signs,
    which drops the cross terms of Nyquist frequencies: the kernel is then
    even on the periodic grid (D(k) = D(-k), a real image-space kernel), so
    filtering commutes with flipping an axis, and the same data stored LPS
    or RAS give the same map. Taking one sign instead changed a 15-degree
    oblique 64x64x48 TKD map by 4 % (relative norm) between the two storage
    orders (``bench/accuracy.py --part storage``).

    Parameters
    ----------
    shape : tuple of 3 int
        Grid shape; odd and even sizes are both exact.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm along i, j, k (anisotropic allowed).
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates (normalised here); see
        ``qsmprep.physics.orientation.b0_dir_from_affine``.
    rfft : bool, default False
        Return the half-spectrum matching ``scipy.fft.rfftn``.
    device : torch device or None, default None
        Build the kernel there as a torch tensor (not cached) instead: the
        deep refinement on a GPU, where the 384^3 grid of a 256^3 volume
        took 0.21 s on the CPU.

    Returns
    -------
    float32 array in FFT (unshifted) order, read-only: kernels are cached
    (training and iterative solvers ask for the same one many times).
    """
    b = np.asarray(b0_dir, dtype=np.float64)
    norm = np.linalg.norm(b)
    if norm == 0:
        raise ValueError("B0 direction must be a non-zero vector")
    key = (tuple(int(n) for n in shape), tuple(float(v) for v in voxel_size_mm), tuple(float(v) for v in b / norm))
    if device is not None:
        regular, nyquist = _split_at_nyquist(key[0], kspace_grid(key[0], key[1], rfft=rfft))
        return _dipole_on_grid([to_device(k, device) for k in regular], [to_device(k, device) for k in nyquist], key[2])
    return _cached_dipole_kernel(*key, bool(rfft))


@lru_cache(maxsize=4)
def _cached_dipole_kernel(shape, voxel_size_mm, b, rfft):
    d = _dipole_on_grid(*_split_at_nyquist(shape, kspace_grid(shape, voxel_size_mm, rfft=rfft)), b)
    d.flags.writeable = False
    return d


def _split_at_nyquist(shape, freqs):
    """Each axis's frequencies as (regular, nyquist): zero at the Nyquist sample (index n/2 of an even axis), and only it."""
    regular, nyquist = [], []
    for n, k in zip(shape, freqs):
        at_nyquist = np.zeros(k.shape, dtype=bool)
        if n % 2 == 0:
            at_nyquist.flat[n // 2] = True  # the axis's only non-unit dimension
        regular.append(k * ~at_nyquist)
        nyquist.append(k * at_nyquist)
    return regular, nyquist


def _dipole_on_grid(regular, nyquist, b):
    """D(k) from ``_split_at_nyquist``'s broadcastable float32 axes (numpy arrays or torch tensors) and a unit b.

    (k . b)^2 averaged over the sign of each Nyquist component: the regular
    components' dot product squared plus each Nyquist component's own term.
    """
    k_dot_b = sum(k * bi for k, bi in zip(regular, b))
    k_dot_b_squared = k_dot_b**2 + sum((k * bi) ** 2 for k, bi in zip(nyquist, b))
    k2 = sum((r + q) ** 2 for r, q in zip(regular, nyquist))
    k2[0, 0, 0] = 1.0  # avoid 0/0; D(0) is set below
    d = 1.0 / 3.0 - k_dot_b_squared / k2
    d[0, 0, 0] = 0.0
    return d
