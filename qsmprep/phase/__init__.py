"""Phase preparation: scaling to radians, unwrapping, echo combination, quality maps."""

from .combine import (
    best_phase_exchange,
    check_echo_times,
    fit_total_field_hz,
    temporal_fit_residual_rad,
    total_field_hz,
)
from .quality import noise_std_hz, phase_quality_map, steep_phase_voxels
from .scaling import invert_phase, phase_to_rad, wrap_to_pi
from .unwrap import unwrap_laplacian, unwrap_quality

__all__ = [
    "best_phase_exchange",
    "check_echo_times",
    "fit_total_field_hz",
    "noise_std_hz",
    "phase_quality_map",
    "invert_phase",
    "phase_to_rad",
    "steep_phase_voxels",
    "temporal_fit_residual_rad",
    "total_field_hz",
    "unwrap_laplacian",
    "unwrap_quality",
    "wrap_to_pi",
]
