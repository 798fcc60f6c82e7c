"""Phase quality (for masking) and field noise (for weighted inversion).

See docs/methods/phase.md.
"""

import numpy as np
from scipy import ndimage

from .combine import check_echo_times, echoes_4d, first_echo_difference, in_echo_time_order
from .scaling import wrap_to_pi

NEIGHBOURHOOD_VOXELS = 3
"""Edge length of the cubic neighbourhood for the local phase coherence."""


def phase_quality_map(phase_rad, magnitude, te_s, mask=None):
    """Voxel-wise phase quality in [0, 1]: magnitude quality x phase coherence.

    q = q_mag * q_coh with

    - q_mag = min(1, m_rss / p99(m_rss)): root-sum-of-squares magnitude over
      echoes, normalised by its 99th percentile (over the mask, or the image);
    - q_coh = mean over echoes of |sum_N m_e exp(i psi_e)| / sum_N m_e, the
      magnitude-weighted local phase coherence over a 3x3x3 neighbourhood N
      (1 where the phase is locally smooth, ~1/sqrt(27) ~ 0.2 for pure noise).

    Noise-only background scores near 0, smooth well-sampled tissue near 1,
    and regions where the phase varies too fast for the voxel size (near air
    cavities, at late echoes) or the signal is weak score in between. Local
    coherence as a phase reliability measure follows the phase-derivative
    variance and pseudo-correlation quality maps of Ghiglia & Pritt (Two-
    Dimensional Phase Unwrapping, Wiley 1998, ch. 3).

    Parameters
    ----------
    phase_rad : array (i, j, k, E) or (i, j, k)
        Wrapped phase in rad per echo.
    magnitude : array like ``phase_rad``
        Magnitude per echo.
    te_s : sequence of E float
        Echo times in s (validated; the map does not depend on their order).
    mask : bool array (i, j, k) or None, default None
        Where to normalise the magnitude and report quality; 0 outside.

    Returns
    -------
    float32 array (i, j, k) in [0, 1].
    """
    phase = echoes_4d(phase_rad, "phase").astype(np.float64)
    mag = echoes_4d(magnitude, "magnitude").astype(np.float64)
    if mag.shape != phase.shape:
        raise ValueError(f"magnitude shape {mag.shape} differs from phase shape {phase.shape}")
    check_echo_times(te_s, phase.shape[-1])
    valid = np.isfinite(phase) & np.isfinite(mag)
    mag = np.where(valid, np.abs(mag), 0.0)
    phase = np.where(valid, phase, 0.0)

    rss = np.sqrt((mag**2).sum(-1))
    region = np.ones(rss.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    reference = np.percentile(rss[region], 99) if region.any() else 0.0
    q_mag = np.clip(rss / reference, 0.0, 1.0) if reference > 0 else np.zeros_like(rss)

    coherence = np.zeros(rss.shape)
    for e in range(phase.shape[-1]):
        signal = mag[..., e] * np.exp(1j * phase[..., e])
        local_sum = (ndimage.uniform_filter(signal.real, NEIGHBOURHOOD_VOXELS, mode="nearest")
                     + 1j * ndimage.uniform_filter(signal.imag, NEIGHBOURHOOD_VOXELS, mode="nearest"))
        local_mag = ndimage.uniform_filter(mag[..., e], NEIGHBOURHOOD_VOXELS, mode="nearest")
        coherence += np.abs(local_sum) / np.where(local_mag > 0, local_mag, np.inf)
    coherence /= phase.shape[-1]

    quality = np.clip(q_mag * coherence, 0.0, 1.0)
    return np.where(region, quality, 0.0).astype(np.float32)


def steep_phase_voxels(phase_rad, te_s, mask=None, max_jump_rad=2.0 * np.pi / 3.0):
    """Voxels where the phase changes too fast between neighbours to be unwrapped reliably.

    Spatial unwrapping is unambiguous only where neighbouring samples differ
    by less than pi (Itoh K, Analysis of the phase unwrapping algorithm, Appl
    Opt 1982;21:2470); with noise, jumps approaching pi are already a gamble.
    A voxel is flagged when the wrapped difference to any of its 6 face
    neighbours (inside ``mask``) exceeds ``max_jump_rad``. The phase tested is
    what ``total_field_hz`` unwraps spatially: the difference of the first two
    distinct echoes (the first echo alone when there is one TE), so near air
    cavities at the brain surface the flagged voxels are exactly those where
    2 pi errors would otherwise enter the field map.

    Parameters
    ----------
    phase_rad : array (i, j, k, E) or (i, j, k)
        Wrapped phase in rad per echo.
    te_s : sequence of E float
        Echo times in s, matching the last axis.
    mask : bool array (i, j, k) or None, default None
        Voxels to test and to compare with; None uses every voxel.
    max_jump_rad : float, default 2 pi / 3
        Largest accepted neighbour difference in rad.

    Returns
    -------
    bool array (i, j, k), False outside ``mask``.
    """
    phase = echoes_4d(phase_rad, "phase").astype(np.float64)
    te, phase, _ = in_echo_time_order(te_s, phase)
    difference, _ = first_echo_difference(phase, te)
    tested = phase[..., 0] if difference is None else difference
    region = np.ones(tested.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    region = region & np.isfinite(tested)
    tested = np.nan_to_num(tested)
    steep = np.zeros(tested.shape, dtype=bool)
    for axis in range(3):
        lower = tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))
        upper = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        jump = (np.abs(wrap_to_pi(tested[upper] - tested[lower])) > max_jump_rad) & region[lower] & region[upper]
        steep[lower] |= jump
        steep[upper] |= jump
    return steep & region


def noise_std_hz(magnitude, te_s, mask=None, magnitude_noise_std=1.0):
    """Standard deviation (Hz) of the fitted total field, from magnitude and TE.

    At high SNR the phase noise of echo e has variance sigma^2 / m_e^2, so the
    weighted least-squares slope of ``fit_total_field_hz`` (weights m_e^2) has

        sigma_f = sigma / (2 pi sqrt(sum_e m_e^2 (TE_e - TE_w)^2)),
        TE_w = sum_e m_e^2 TE_e / sum_e m_e^2        (with offset, E >= 2)
        sigma_f = sigma / (2 pi sqrt(sum_e m_e^2 TE_e^2))   (one echo)

    Use 1 / sigma_f^2 as data weights in a weighted dipole inversion.

    Reference: Gudbjartsson H, Patz S. The Rician distribution of noisy MRI
    data. Magn Reson Med 1995;34:910-914 (phase noise sigma / m at high SNR).

    Parameters
    ----------
    magnitude : array (i, j, k, E) or (i, j, k)
        Magnitude per echo.
    te_s : sequence of E float
        Echo times in s, matching the last axis.
    mask : bool array (i, j, k) or None, default None
        Voxels to report; inf elsewhere.
    magnitude_noise_std : float, default 1.0
        Noise standard deviation sigma of the real and imaginary channels, in
        magnitude units. The default gives sigma_f per unit noise, enough for
        relative weights.

    Returns
    -------
    float32 array (i, j, k): sigma_f in Hz; inf where there is no signal or
    outside the mask.
    """
    mag = echoes_4d(magnitude, "magnitude").astype(np.float64)
    te = check_echo_times(te_s, mag.shape[-1])
    weights = np.nan_to_num(mag) ** 2
    total = weights.sum(-1)
    if len(np.unique(te)) > 1:
        te_w = (weights * te).sum(-1) / np.where(total > 0, total, 1.0)
        lever = (weights * (te - te_w[..., np.newaxis]) ** 2).sum(-1)
    else:
        lever = (weights * te**2).sum(-1)
    with np.errstate(divide="ignore"):
        sigma = magnitude_noise_std / (2.0 * np.pi * np.sqrt(lever))
    sigma = np.where(lever > 0, sigma, np.inf)
    if mask is not None:
        sigma = np.where(np.asarray(mask, dtype=bool), sigma, np.inf)
    return sigma.astype(np.float32)
