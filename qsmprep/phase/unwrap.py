"""Spatial phase unwrapping: Laplacian (least squares) and quality-guided.

Both take wrapped phase in rad on a 3D grid and return float32 unwrapped phase
in rad, zero outside the mask. See docs/methods/phase.md.
"""

import logging

import numpy as np
from scipy import fft as spfft
from scipy import ndimage
from skimage.restoration import unwrap_phase

from ..inversion.solvers import cg
from ..physics import checked_voxel_size_mm
from .scaling import nearest_multiple_of_2pi, wrap_to_pi

log = logging.getLogger(__name__)


def _valid_mask(phase, mask):
    """Voxels with finite phase inside ``mask`` (all finite voxels if None)."""
    valid = np.isfinite(phase)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != phase.shape:
            raise ValueError(f"mask shape {mask.shape} differs from phase shape {phase.shape}")
        valid &= mask
    return valid


def _check_3d(phase, voxel_size_mm):
    if phase.ndim != 3:
        raise ValueError(f"spatial unwrapping takes one 3D volume, got shape {phase.shape}")
    return checked_voxel_size_mm(voxel_size_mm)


def _both_ends_valid(valid, axis):
    """Edges along ``axis`` (shape of a forward difference) whose two voxels are both valid."""
    n = valid.shape[axis]
    return np.take(valid, range(n - 1), axis=axis) & np.take(valid, range(1, n), axis=axis)


def _adjoint_diff(y, axis):
    """Adjoint of the forward difference: (D^T y)[i] = y[i-1] - y[i], with zero ends."""
    pad = [(0, 0)] * y.ndim
    pad[axis] = (1, 1)
    return -np.diff(np.pad(y, pad), axis=axis)


def unwrap_laplacian(phase_rad, voxel_size_mm=(1.0, 1.0, 1.0), mask=None, tol=1e-4, max_iter=200):
    """Laplacian (least-squares) phase unwrapping by a DCT Poisson solve.

    The Laplacian of the true phase is estimated from wrapped finite
    differences, lap(phi) = sum_a D_a^T wrap(D_a psi) / d_a^2 (psi wrapped
    phase, D_a the forward difference along axis a, d_a its voxel size in mm),
    and phi solves the Poisson equation with Neumann boundaries. Without a
    mask this is one DCT-II solve, eigenvalues sum_a (2 - 2 cos(pi k_a / N_a)) / d_a^2.
    With a mask only differences between two mask voxels count (weighted least
    squares); that system is solved by conjugate gradients preconditioned with
    the unmasked DCT solve.

    References: Schofield MA, Zhu Y. Fast phase unwrapping algorithm for
    interferometric applications. Opt Lett 2003;28:1194-1196. Ghiglia DC,
    Romero LA. Robust two-dimensional weighted and unweighted phase unwrapping
    that uses fast transforms and iterative methods. J Opt Soc Am A
    1994;11:107-117.

    Parameters
    ----------
    phase_rad : array (i, j, k)
        Wrapped phase in rad. NaN voxels are treated as outside the mask.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm; differences along axis a are weighted by 1/d_a^2.
    mask : bool array (i, j, k) or None, default None
        Region to unwrap; None unwraps every finite voxel with the direct
        DCT solve.
    tol : float, default 1e-4
        Relative residual at which the masked conjugate-gradient solve stops.
    max_iter : int, default 200
        Iteration cap of the masked solve (a warning is logged if reached).

    Returns
    -------
    float32 array (i, j, k): unwrapped phase in rad, 0 outside the mask.
    Where the wrapped differences are consistent (no phase residues, e.g. a
    smooth field sampled finely enough) the result equals the true phase up
    to one constant per connected region of the mask; near residues (noise,
    sharp edges) the least-squares solution spreads a smooth, low-order error
    instead of leaving 2 pi jumps. The result is NOT congruent with the input:
    its global constant is chosen so that result - input is close to a
    multiple of 2 pi on average (circular mean over the mask).
    """
    psi = np.asarray(phase_rad, dtype=np.float64)
    vox = _check_3d(psi, voxel_size_mm)
    valid = _valid_mask(psi, mask)
    out = np.zeros(psi.shape, dtype=np.float32)
    if not valid.any():
        log.warning("Laplacian unwrapping: the mask is empty; returning zeros")
        return out
    psi = np.where(valid, psi, 0.0)

    eig = np.zeros(psi.shape)
    for axis, (n, d) in enumerate(zip(psi.shape, vox)):
        view = [1, 1, 1]
        view[axis] = n
        eig = eig + ((2.0 - 2.0 * np.cos(np.pi * np.arange(n) / n)) / d**2).reshape(view)
    eig[0, 0, 0] = 1.0

    def poisson_solve(rhs):
        spectrum = spfft.dctn(rhs, type=2, norm="ortho")
        spectrum /= eig
        spectrum[0, 0, 0] = 0.0
        return spfft.idctn(spectrum, type=2, norm="ortho")

    if mask is None and valid.all():
        edge_weights = None
    else:
        edge_weights = [_both_ends_valid(valid, axis) for axis in range(3)]

    def normal_op(u):
        """A u = sum_a D_a^T W_a D_a u / d_a^2."""
        total = np.zeros_like(u)
        for axis, d in enumerate(vox):
            grad = np.diff(u, axis=axis)
            if edge_weights is not None:
                grad *= edge_weights[axis]
            total += _adjoint_diff(grad, axis) / d**2
        return total

    rhs = np.zeros_like(psi)
    for axis, d in enumerate(vox):
        grad = wrap_to_pi(np.diff(psi, axis=axis), np.float64)
        if edge_weights is not None:
            grad *= edge_weights[axis]
        rhs += _adjoint_diff(grad, axis) / d**2

    if edge_weights is None:
        phi = poisson_solve(rhs)
    else:
        phi = cg(normal_op, rhs, tol=tol, max_iter=max_iter, precondition=poisson_solve)
        residual = np.linalg.norm(rhs - normal_op(phi)) / np.linalg.norm(rhs)
        if residual > tol:
            log.warning("Laplacian unwrapping stopped at %d iterations, relative residual %.2g (tol %.2g)",
                        max_iter, residual, tol)

    offset = np.angle(np.mean(np.exp(1j * (psi[valid] - phi[valid]))))
    out[valid] = phi[valid] + offset
    return out


def unwrap_quality(phase_rad, mask=None, voxel_size_mm=(1.0, 1.0, 1.0)):
    """Quality-guided spatial unwrapping (reliability-sorted edges), congruent.

    Uses scikit-image's 3D ``unwrap_phase``: edges between voxels are joined in
    order of decreasing reliability, reliability being the inverse of the
    wrapped second differences, so noisy regions are unwrapped last. The
    result differs from the input by an exact multiple of 2 pi in every voxel.

    Reference: Abdul-Rahman HS, Gdeisat MA, Burton DR, Lalor MJ, Lilley F,
    Moore CJ. Fast and robust three-dimensional best path phase unwrapping
    algorithm. Appl Opt 2007;46:6623-6635.

    Parameters
    ----------
    phase_rad : array (i, j, k)
        Wrapped phase in rad. NaN voxels are treated as outside the mask.
    mask : bool array (i, j, k) or None, default None
        Region to unwrap; None unwraps every finite voxel.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Checked but not used: the reliability is computed in index space, and
        since the result is congruent, voxel size can change only the order in
        which regions are joined, not the values of a correct unwrap.

    Returns
    -------
    float32 array (i, j, k): unwrapped phase in rad, 0 outside the mask.
    Each connected region of the mask is shifted by 2 pi k so that its median
    lies in [-pi, pi).
    """
    psi = np.asarray(phase_rad, dtype=np.float64)
    _check_3d(psi, voxel_size_mm)
    valid = _valid_mask(psi, mask)
    out = np.zeros(psi.shape, dtype=np.float32)
    if not valid.any():
        log.warning("quality-guided unwrapping: the mask is empty; returning zeros")
        return out
    wrapped = wrap_to_pi(np.where(valid, psi, 0.0), np.float64)
    if valid.all():
        phi = np.asarray(unwrap_phase(wrapped))
    else:
        phi = np.ma.getdata(unwrap_phase(np.ma.masked_array(wrapped, mask=~valid)))
    labels, n_regions = ndimage.label(valid)
    medians = np.asarray(ndimage.median(phi, labels, np.arange(1, n_regions + 1)))
    shifts = np.concatenate([[0.0], nearest_multiple_of_2pi(medians)])
    out[valid] = (phi - shifts[labels])[valid]
    return out
