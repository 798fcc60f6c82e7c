"""Unit conversions between phase (rad), field (Hz) and field (ppm of B0).

Defined once for the whole package. Conventions: TE in seconds, B0 in tesla,
gamma-bar = gamma / (2 pi) of the proton = 42.57747892 MHz/T (CODATA 2018).

    field_hz  = phase_rad / (2 pi TE)
    field_ppm = field_hz / (gamma_bar B0) * 1e6
"""

import numpy as np

GAMMA_BAR_MHZ_PER_T = 42.57747892
"""Proton gyromagnetic ratio over 2 pi, in MHz/T."""


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
