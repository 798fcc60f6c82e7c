"""Unit conversions between phase (rad), field (Hz) and field (ppm of B0).

Defined once for the whole package. Conventions: TE in seconds, B0 in tesla,
gamma-bar = gamma / (2 pi) of the proton = 42.57747892 MHz/T (CODATA 2018).

    field_hz  = phase_rad / (2 pi TE)
    field_ppm = field_hz / (gamma_bar B0) * 1e6
"""

import numpy as np

GAMMA_BAR_MHZ_PER_T = 42.57747892
"""Proton gyromagnetic ratio over 2 pi, in MHz/T."""

MAX_PLAUSIBLE_LOCAL_FIELD_PPM = 1.0
"""Largest 99th percentile of |local field| (ppm) inside the mask that is taken as a field in ppm. Tissue fields are
hundredths of a ppm (0.038 ppm on the 2016 challenge data), at most tenths near a haemorrhage; the same field in Hz is
64-300 times larger at 1.5-7 T, so a field in Hz read as ppm made a map 128 times too strong at 3 T with exit 0."""

TYPICAL_LOCAL_FIELD_PPM = (0.002, 0.2)
"""Range of the 99th percentile of |local field| (ppm) inside the mask outside which a field is used with a warning:
0.038 ppm on the 2016 challenge data, 0.030 on a real 3-echo crop, 0.057 on a simulated head. A phase in rad read as
ppm is 16 times stronger at 3 T and 20 ms (0.6-0.9), under the 1 ppm refusal; a field in ppm read as Hz is 128 times
weaker at 3 T (0.0003-0.0004): both gave maps wrong in scale with exit 0 and no word."""


def _larmor_hz_per_ppm(b0_tesla):
    """Frequency offset in Hz that one ppm of ``b0_tesla`` corresponds to."""
    if not b0_tesla or b0_tesla <= 0:
        raise ValueError(f"B0 must be a positive field strength in tesla, got {b0_tesla!r}")
    return GAMMA_BAR_MHZ_PER_T * b0_tesla  # MHz/T * T * 1e-6 -> Hz per ppm


def rad_to_hz(phase_rad, te_s):
    """Phase (rad) accrued at echo time ``te_s`` (s) -> frequency offset (Hz)."""
    if not te_s or te_s <= 0:
        raise ValueError(f"echo time must be positive, in seconds, got {te_s!r}")
    return np.asarray(phase_rad) / (2 * np.pi * te_s)


def hz_to_rad(field_hz, te_s):
    """Frequency offset (Hz) -> phase (rad) accrued at echo time ``te_s`` (s)."""
    return np.asarray(field_hz) * (2 * np.pi * te_s)


def hz_to_ppm(field_hz, b0_tesla):
    """Frequency offset (Hz) -> field perturbation in ppm of B0 (``b0_tesla``, T)."""
    return np.asarray(field_hz) / _larmor_hz_per_ppm(b0_tesla)


def ppm_to_hz(field_ppm, b0_tesla):
    """Field perturbation in ppm of B0 (``b0_tesla``, T) -> frequency offset (Hz)."""
    return np.asarray(field_ppm) * _larmor_hz_per_ppm(b0_tesla)


def rad_to_ppm(phase_rad, te_s, b0_tesla):
    """Phase (rad) at echo time ``te_s`` (s) -> field in ppm of ``b0_tesla`` (T)."""
    return hz_to_ppm(rad_to_hz(phase_rad, te_s), b0_tesla)


def ppm_to_rad(field_ppm, te_s, b0_tesla):
    """Field in ppm of ``b0_tesla`` (T) -> phase (rad) at echo time ``te_s`` (s)."""
    return hz_to_rad(ppm_to_hz(field_ppm, b0_tesla), te_s)


def local_field_scale(field_ppm, inside):
    """How a local field read in ppm compares with tissue fields, to catch a unit mistake before it scales a map.

    Parameters
    ----------
    field_ppm : ndarray
        Local (tissue) field, read as ppm of B0.
    inside : ndarray of bool
        Brain mask, the field's shape.

    Returns
    -------
    level : float
        99th percentile of |field_ppm| inside the mask (ppm).
    verdict : str or None
        ``"implausible"`` above ``MAX_PLAUSIBLE_LOCAL_FIELD_PPM`` (a field in Hz, or a total field), ``"strong"``
        or ``"weak"`` beyond ``TYPICAL_LOCAL_FIELD_PPM`` (a phase in rad read as ppm, a field in ppm scaled as Hz; or
        a large haemorrhage), None within it.
    """
    level = float(np.percentile(np.abs(field_ppm[inside]), 99))
    low, high = TYPICAL_LOCAL_FIELD_PPM
    if level > MAX_PLAUSIBLE_LOCAL_FIELD_PPM:
        return level, "implausible"
    return level, "strong" if level > high else "weak" if level < low else None
