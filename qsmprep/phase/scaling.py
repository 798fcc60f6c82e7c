"""Phase images to radians: vendor units, wrapping, and the phase of the opposite polarity.

BIDS sidecars give the phase ``Units``: 'rad' (already radians) or
'arbitrary' (vendor integers, e.g. Siemens -4096..4095 for -pi..pi). The
integer range is mapped linearly; the observed min..max is used only as a
logged fallback when the data exceed that range, because min-max rescaling of
data that fit it shifts and stretches the phase and produces the random-dot
artefacts reported in QSMxT issues #149 and #160. See docs/methods/phase.md.
"""

import logging

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

_TWO_PI = 2.0 * np.pi

SPAN_WARNING_FRACTION = 0.5
"""Warn when 'arbitrary' data span less than this fraction of the vendor range."""


def nearest_multiple_of_2pi(phase_rad):
    """The multiple of 2 pi nearest to ``phase_rad`` (rad), element by element: the whole turns a wrapped phase
    differs by."""
    return _TWO_PI * np.round(np.asarray(phase_rad) / _TWO_PI)


def wrap_to_pi(phase_rad, dtype=np.float32):
    """Wrap phase (rad) into [-pi, pi) (NaN stays NaN), computed in float64.

    ``dtype`` (default float32) is that of the result; the unwrappers keep float64, whose sums of wrapped
    differences would otherwise gather float32 rounding.
    """
    wrapped = np.mod(np.asarray(phase_rad, dtype=np.float64) + np.pi, _TWO_PI) - np.pi
    out = wrapped.astype(dtype)
    out[out >= out.dtype.type(np.pi)] = -out.dtype.type(np.pi)  # rounding of values just below pi
    return out


def phase_to_rad(phase, units, vendor_range=(-4096, 4095), source="phase image"):
    """Convert a phase image to float32 radians in [-pi, pi).

    Parameters
    ----------
    phase : array
        Phase image as stored (any shape); NaN is kept as NaN.
    units : str
        The BIDS sidecar ``Units`` of the phase image: 'rad' (kept, wrapped
        into [-pi, pi)) or 'arbitrary' (vendor integers). Case-insensitive.
    vendor_range : (float, float), default (-4096, 4095)
        Lowest and highest level of 'arbitrary' phase. Integer bounds are
        integer levels lo..hi covering [-pi, pi): rad = -pi + 2 pi (x - lo) /
        (hi - lo + 1), so -4096 -> -pi and 4095 -> pi - 2 pi / 8192 (Siemens
        convention); e.g. (0, 4095) for unsigned 12-bit data. Non-integer
        bounds are a continuous scale: rad = -pi + 2 pi (x - lo) / (hi - lo).
    source : str, default "phase image"
        The file the data came from, named in errors and warnings.

    Returns
    -------
    float32 array, same shape, phase in rad in [-pi, pi).

    Raises
    ------
    DataError if ``units`` is missing or not one of 'rad', 'arbitrary'.

    Notes
    -----
    If 'arbitrary' data exceed ``vendor_range``, the observed min..max is
    mapped onto [-pi, pi] instead (continuous scale) and a warning is logged.
    If they fit but span less than half of it, a warning suggests checking
    ``vendor_range``; the data are still mapped with the vendor range.
    """
    unit = str(units).strip().lower() if units is not None else ""
    data = np.asarray(phase, dtype=np.float64)
    if unit in ("rad", "radian", "radians"):
        return wrap_to_pi(data)
    if unit != "arbitrary":
        raise DataError(
            f"{source}: phase Units is {units!r}, which qsmprep cannot interpret: set \"Units\" to "
            "\"rad\" or \"arbitrary\" in its JSON sidecar."
        )
    lo, hi = (float(v) for v in vendor_range)
    if not hi > lo:
        raise ValueError(f"vendor_range must be (low, high) with high > low, got {vendor_range!r}")
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        raise DataError(f"{source}: the phase image holds no finite values: re-export it from the scanner.")
    obs_lo, obs_hi = float(finite.min()), float(finite.max())
    if obs_lo < lo or obs_hi > hi:
        log.warning(
            "%s: phase values %g..%g exceed the vendor range %g..%g; mapping the observed range onto "
            "[-pi, pi] instead. Check the phase is raw vendor data or pass its vendor range.",
            source, obs_lo, obs_hi, lo, hi,
        )
        if obs_hi == obs_lo:
            return wrap_to_pi(np.where(np.isfinite(data), 0.0, np.nan))
        return wrap_to_pi(-np.pi + _TWO_PI * (data - obs_lo) / (obs_hi - obs_lo))
    if obs_hi - obs_lo < SPAN_WARNING_FRACTION * (hi - lo):
        log.warning(
            "%s: phase values %g..%g span less than half of the vendor range %g..%g; mapping with the "
            "vendor range. If the phase looks compressed, pass the right vendor range.",
            source, obs_lo, obs_hi, lo, hi,
        )
    integer_levels = float(lo).is_integer() and float(hi).is_integer()
    span = hi - lo + 1.0 if integer_levels else hi - lo
    return wrap_to_pi(-np.pi + _TWO_PI * (data - lo) / span)


def invert_phase(phase_rad):
    """The phase of the opposite polarity, -phase wrapped into [-pi, pi) as float32 (NaN stays NaN).

    qsmprep takes the phase to grow with the field, phase = 2 pi gamma_bar dB TE
    (as ``qsmprep.physics.ppm_to_rad``, the simulator and the 2016 challenge
    data have it). Scanners and reconstructions differ in the sign they store;
    phase of the opposite polarity gives every field and susceptibility with
    the wrong sign, veins and iron-rich nuclei negative (docs/methods/phase.md).
    ``qsmprep --invert-phase`` applies this to every echo.
    """
    return wrap_to_pi(-np.asarray(phase_rad, dtype=np.float64))
