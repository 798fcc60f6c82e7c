"""Multi-echo phase -> total field map in Hz.

``total_field_hz`` is the whole step: sort echoes by TE, unwrap the first
echo and the first echo difference spatially, unwrap every later echo in
time voxel by voxel from those two, then fit the phase evolution over TE per
voxel with ``fit_total_field_hz``. See docs/methods/phase.md.
"""

import itertools
import logging

import numpy as np

from ..errors import DataError
from .scaling import nearest_multiple_of_2pi, wrap_to_pi
from .unwrap import unwrap_laplacian, unwrap_quality

log = logging.getLogger(__name__)

MAX_PLAUSIBLE_TE_S = 0.5
"""Latest plausible gradient-echo time (s): one above it is milliseconds given as seconds (or, in
``qsmprep-simulate``, too many echoes). BIDS validation, the total-field fit and the simulator share it."""

UNWRAPPERS = {"laplacian": unwrap_laplacian, "quality": unwrap_quality}


def milliseconds_hint(te_s):
    """" (it looks like milliseconds)" for an echo time "in seconds" of 1 to 1000, as echo times in milliseconds are,
    else "": the messages of every check against ``MAX_PLAUSIBLE_TE_S`` add it alike."""
    return " (it looks like milliseconds)" if 1 <= te_s < 1000 else ""


def check_echo_times(te_s, n_echoes):
    """Validate echo times in seconds; return them as a float64 array.

    Raises DataError (a sidecar ``EchoTime`` problem) if they are not
    ``n_echoes`` finite positive values below 0.5 s.
    """
    te = np.atleast_1d(np.asarray(te_s, dtype=np.float64))
    if te.ndim != 1 or te.size != n_echoes:
        raise DataError(
            f"got {te.size} echo times for {n_echoes} echoes: give one EchoTime per echo in the JSON sidecars."
        )
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise DataError(f"echo times {te.tolist()} must be positive seconds: check EchoTime in the JSON sidecars.")
    if np.any(te > MAX_PLAUSIBLE_TE_S):
        raise DataError(f"echo times {te.tolist()} are not all gradient-echo times in seconds (at most "
                        f"{MAX_PLAUSIBLE_TE_S:g} s){milliseconds_hint(te.max())}: BIDS EchoTime is in seconds; fix the "
                        "JSON sidecars.")
    return te


def in_echo_time_order(te_s, phase):
    """Echo times (s, checked by ``check_echo_times``) ascending, ``phase`` with its last (echo) axis in that order,
    and the order itself (stable: equal times keep their input order), for the arrays that go with them."""
    te = check_echo_times(te_s, np.shape(phase)[-1])
    order = np.argsort(te, kind="stable")
    return te[order], phase[..., order], order


def echoes_4d(array, name):
    """``array`` as (i, j, k, echo): a 3D volume gets an echo axis of one; ``name`` names it in the ValueError
    raised for any other number of dimensions."""
    arr = np.asarray(array)
    if arr.ndim == 3:
        arr = arr[..., np.newaxis]
    if arr.ndim != 4:
        raise ValueError(f"{name} must be (i, j, k) or (i, j, k, echo), got shape {arr.shape}")
    return arr


def fit_total_field_hz(unwrapped_rad, te_s, magnitude=None, mask=None):
    """Weighted least-squares fit of phase(TE) = offset + 2 pi f TE per voxel.

    Weights are w_e = |m_e|^2, the inverse phase-noise variance of echo e
    (var(phase_e) = sigma^2 / |m_e|^2 at high SNR), which makes the fit the
    maximum-likelihood estimate under Gaussian phase noise. Without an offset
    (one echo) this equals averaging the per-echo fields phase_e / (2 pi TE_e)
    with weights |m_e|^2 TE_e^2, the weighting of Wu et al. (2012) and Robinson
    et al. (2017); with an offset, the TE lever arm enters through the fit.

    References: Wu B, Li W, Avram AV, Gho SM, Liu C. Fast and tissue-optimized
    mapping of magnetic susceptibility and T2* with multi-echo and multi-shot
    spirals. NeuroImage 2012;59:297-305. Robinson SD, Bredies K, Khabipova D,
    Dymerska B, Marques JP, Schweser F. An illustrated comparison of processing
    methods for MR phase imaging and QSM: combining array coil signals and
    phase unwrapping. NMR Biomed 2017;30:e3601.

    Parameters
    ----------
    unwrapped_rad : array (i, j, k, E) or (i, j, k)
        Temporally consistent unwrapped phase in rad per echo.
    te_s : sequence of E float
        Echo times in s, in the order of the last axis (any order; sorted here).
    magnitude : array like ``unwrapped_rad`` or None, default None
        Magnitude per echo for the weights; None weights all echoes equally.
    mask : bool array (i, j, k) or None, default None
        Voxels to fit; outputs are 0 elsewhere. None fits every voxel.

    Returns
    -------
    (field_hz, offset_rad, residual_rad): float32 arrays (i, j, k). The field
    in Hz, the phase at TE = 0 in rad (0 for one echo, fitted without an
    offset), and the weighted RMS phase residual in rad (0 when the model has
    as many parameters as echoes). Voxels with zero total weight give 0.
    """
    phase = echoes_4d(unwrapped_rad, "unwrapped phase").astype(np.float64)
    te, phase, order = in_echo_time_order(te_s, phase)
    if magnitude is None:
        weights = np.ones_like(phase)
    else:
        mag = echoes_4d(magnitude, "magnitude")
        if mag.shape != phase.shape:
            raise ValueError(f"magnitude shape {mag.shape} differs from phase shape {phase.shape}")
        weights = np.nan_to_num(mag[..., order].astype(np.float64)) ** 2
    weights = np.where(np.isfinite(phase), weights, 0.0)
    phase = np.nan_to_num(phase)

    s = weights.sum(-1)
    st = (weights * te).sum(-1)
    stt = (weights * te**2).sum(-1)
    sp = (weights * phase).sum(-1)
    stp = (weights * te * phase).sum(-1)
    det = s * stt - st**2
    # the offset model needs two distinct TEs with weight; otherwise fit through the origin
    with_offset = (len(np.unique(te)) > 1) & (det > 1e-9 * np.maximum(s * stt, np.finfo(float).tiny))
    safe_det = np.where(with_offset, det, 1.0)
    safe_stt = np.where(stt > 0, stt, 1.0)
    slope = np.where(with_offset, (s * stp - st * sp) / safe_det, stp / safe_stt)
    offset = np.where(with_offset, (stt * sp - st * stp) / safe_det, 0.0)
    slope = np.where(s > 0, slope, 0.0)
    offset = np.where(s > 0, offset, 0.0)

    model = offset[..., np.newaxis] + slope[..., np.newaxis] * te
    residual = np.sqrt((weights * (phase - model) ** 2).sum(-1) / np.where(s > 0, s, 1.0))
    field = slope / (2.0 * np.pi)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        field, offset, residual = (np.where(mask, a, 0.0) for a in (field, offset, residual))
    return field.astype(np.float32), offset.astype(np.float32), residual.astype(np.float32)


def first_echo_difference(phase_rad, te_s):
    """wrap(phi_2 - phi_1) of the first two distinct echo times.

    Besides the first echo, this is the phase ``total_field_hz`` unwraps
    spatially (and ``steep_phase_voxels`` tests). ``phase_rad`` (i, j, k, E)
    and ``te_s`` (E,) must be sorted by TE. Returns (difference_rad, index of
    the second echo), or (None, None) when all TEs are equal.
    """
    later = np.flatnonzero(np.asarray(te_s) > te_s[0])
    if not later.size:
        return None, None
    return wrap_to_pi(phase_rad[..., later[0]] - phase_rad[..., 0]), int(later[0])


def _circular_median_shift(values):
    """The multiple of 2 pi nearest to the median of ``values`` (rad)."""
    return nearest_multiple_of_2pi(np.median(values))


def total_field_hz(phase_rad, te_s, magnitude=None, mask=None, voxel_size_mm=(1.0, 1.0, 1.0), unwrap="laplacian"):
    """Multi-echo wrapped phase -> total field map in Hz.

    1. Echoes are sorted by TE (input order is not trusted).
    2. The first echo, which wraps least, is unwrapped spatially (``unwrap``:
       'laplacian' or 'quality') and made congruent with the measured phase,
       psi + 2 pi round((phi - psi) / 2 pi) (Ghiglia & Pritt, Two-Dimensional
       Phase Unwrapping, Wiley 1998), which keeps the measured values and
       removes the smooth least-squares error of Laplacian unwrapping
       wherever it is below pi. It is shifted so its median over the mask
       lies in [-pi, pi).
    3. The phase difference of the first two distinct echoes,
       wrap(phi_2 - phi_1), has no phase offset and wraps far less than any
       echo; it is unwrapped the same way. Every later echo is then unwrapped
       in time, voxel by voxel: it gets the 2 pi k nearest to the prediction
       phi_1 + dphi_21 (TE_e - TE_1) / (TE_2 - TE_1) (template-based temporal
       unwrapping as in ROMEO: Dymerska B et al., Magn Reson Med
       2021;85:2294-2308). Later echoes are never unwrapped spatially, so
       steep background gradients near sinuses, which alias in late echoes,
       do not cause 2 pi errors there. A constant 2 pi m error of the
       unwrapped difference adds only a constant m / (TE_2 - TE_1) Hz to the
       whole map, which background removal discards.
    4. ``fit_total_field_hz`` fits offset + 2 pi f TE with weights |m_e|^2
       (one echo: f = phi_1 / (2 pi TE_1), no offset).

    Parameters
    ----------
    phase_rad : array (i, j, k, E) or (i, j, k)
        Wrapped phase in rad per echo (see ``phase_to_rad``).
    te_s : sequence of E float
        Echo times in s, matching the last axis; any order, unequal spacing allowed.
    magnitude : array like ``phase_rad`` or None, default None
        Magnitude per echo, for the fit weights; None weights echoes equally.
    mask : bool array (i, j, k) or None, default None
        Region to unwrap and fit (a brain mask); None uses every finite voxel.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm (used by the Laplacian unwrapping).
    unwrap : {'laplacian', 'quality'}, default 'laplacian'
        Spatial unwrapping method, see ``qsmprep.phase.unwrap``.

    Returns
    -------
    float32 array (i, j, k): total field in Hz, 0 outside the mask. Defined up
    to a global constant (plus low-order error for 'laplacian').
    """
    if unwrap not in UNWRAPPERS:
        raise ValueError(f"unwrap must be one of {sorted(UNWRAPPERS)}, got {unwrap!r}")
    phase = echoes_4d(phase_rad, "phase").astype(np.float32)
    te, phase, order = in_echo_time_order(te_s, phase)
    mag = None if magnitude is None else echoes_4d(magnitude, "magnitude")[..., order]
    if mag is not None and mag.shape != phase.shape:
        raise ValueError(f"magnitude shape {mag.shape} differs from phase shape {phase.shape}")
    region = np.all(np.isfinite(phase), axis=-1)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != phase.shape[:3]:
            raise ValueError(f"mask shape {mask.shape} differs from phase shape {phase.shape[:3]}")
        region &= mask
    if not region.any():
        raise DataError("no voxel with valid phase inside the mask: check the mask and the phase images.")

    phase = np.where(region[..., np.newaxis], phase, 0.0).astype(np.float32)

    def unwrap_spatially(wrapped):
        spatial = UNWRAPPERS[unwrap](wrapped, mask=region, voxel_size_mm=voxel_size_mm)
        congruent = _congruent(spatial, wrapped)
        return congruent - _circular_median_shift(congruent[region])

    unwrapped = np.zeros(phase.shape, dtype=np.float32)
    unwrapped[..., 0] = unwrap_spatially(phase[..., 0])
    wrapped_difference, second = first_echo_difference(phase, te)
    if second is not None:
        difference = unwrap_spatially(wrapped_difference)
        for e in range(1, phase.shape[-1]):
            predicted = unwrapped[..., 0] + difference * ((te[e] - te[0]) / (te[second] - te[0]))
            unwrapped[..., e] = _congruent(predicted, phase[..., e])

    field, _, residual = fit_total_field_hz(unwrapped, te, magnitude=mag, mask=region)
    log.info("total field: %d echoes, %s unwrapping, median fit residual %.3f rad",
             phase.shape[-1], unwrap, float(np.median(residual[region])))
    return field


def temporal_fit_residual_rad(phase_rad, te_s, magnitude):
    """Median echo-fit residual (rad) of voxels unwrapped in time only: a measure of how well the phase images
    follow their echo times.

    Each voxel is unwrapped as ``total_field_hz`` unwraps the later echoes: every echo gets the 2 pi k nearest to
    the line through its first echo and the wrapped difference of the first two echo times, with no spatial
    unwrapping (a voxel whose field wraps between those two echo times is misfitted; the median is robust to a
    few). ``fit_total_field_hz`` then fits offset + 2 pi f TE with weights |m_e|^2.

    Parameters
    ----------
    phase_rad : array (N, E)
        Wrapped phase in rad of N voxels at E echo times.
    te_s : sequence of E float
        Echo times in s, in the order of the last axis (any order).
    magnitude : array (N, E)
        Magnitude of the same voxels, for the fit weights.

    Returns
    -------
    float: the median over the voxels of the weighted RMS fit residual, rad (0 with fewer than three echo times,
    which any line fits).
    """
    te, phase, order = in_echo_time_order(te_s, np.asarray(phase_rad, dtype=np.float64))
    difference, second = first_echo_difference(phase, te)
    if difference is None:
        return 0.0
    predicted = phase[:, :1] + difference[:, np.newaxis] * ((te - te[0]) / (te[second] - te[0]))
    unwrapped = _congruent(predicted, phase)[:, np.newaxis, np.newaxis, :]
    weights_from = np.asarray(magnitude)[:, order][:, np.newaxis, np.newaxis, :]
    return float(np.median(fit_total_field_hz(unwrapped, te, weights_from)[2]))


def best_phase_exchange(phase_rad, te_s, magnitude):
    """The two echoes whose phase images, exchanged, best follow the echo times (``temporal_fit_residual_rad``).

    A check for phase images paired with the wrong echo time: the phase of a correctly labelled acquisition
    evolves linearly with TE, and exchanging two of its echoes breaks that, so no exchange fits better than the
    given order; a mislabelled pair fits far better exchanged. Needs three echo times or more.

    Parameters are those of ``temporal_fit_residual_rad``.

    Returns
    -------
    (given_rad, (a, b), exchanged_rad): the residual of the images as given, the echoes (indices along the last
    axis) whose exchange fits best, and the residual with them exchanged.
    """
    given = temporal_fit_residual_rad(phase_rad, te_s, magnitude)
    n_echoes = np.shape(phase_rad)[-1]
    fits = {}
    for a, b in itertools.combinations(range(n_echoes), 2):
        order = list(range(n_echoes))
        order[a], order[b] = b, a
        fits[a, b] = temporal_fit_residual_rad(np.asarray(phase_rad)[:, order], te_s, magnitude)
    best = min(fits.values())
    # an exchange that reverses the series in time fits as well as undoing the real one (four echoes with the middle
    # two exchanged: exchanging the first and last gives them backwards, a line of opposite slope); of exchanges that
    # fit alike, that of the closest echoes is taken, the likelier labelling slip
    pair = min((pair for pair, fit in fits.items() if fit <= 1.05 * best + 1e-9), key=lambda p: (p[1] - p[0], p))
    return given, pair, fits[pair]


def _congruent(estimate, wrapped):
    """``wrapped`` plus the multiple of 2 pi that brings it nearest to ``estimate`` (rad), voxel by voxel."""
    return wrapped + nearest_multiple_of_2pi(estimate - wrapped)
