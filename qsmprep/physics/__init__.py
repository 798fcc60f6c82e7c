"""MRI susceptibility physics: units, dipole kernel, forward model, orientation."""

from .arrays import fft_module, is_tensor, resolve_device, to_device, to_numpy, zero_outside
from .forward import filter_padded, forward_field_ppm, padded_shape
from .kernel import dipole_kernel, kspace_grid
from .orientation import (
    b0_dir_from_affine,
    b0_dir_given_or_from_affine,
    b0_tilt_deg,
    call_in_ras_order,
    checked_voxel_size_mm,
    from_ras,
    invert_in_ras_order,
    ras_voxel_size,
    to_ras,
    voxel_rotation,
    voxel_size_from_affine,
)
from .resample import b0_aligned_grid, from_b0_aligned, resample_to_grid, to_b0_aligned
from .units import (
    GAMMA_BAR_MHZ_PER_T,
    hz_to_ppm,
    hz_to_rad,
    ppm_to_hz,
    ppm_to_rad,
    rad_to_hz,
    rad_to_ppm,
)

__all__ = [
    "GAMMA_BAR_MHZ_PER_T",
    "b0_aligned_grid",
    "b0_dir_from_affine",
    "b0_dir_given_or_from_affine",
    "b0_tilt_deg",
    "call_in_ras_order",
    "checked_voxel_size_mm",
    "invert_in_ras_order",
    "dipole_kernel",
    "fft_module",
    "filter_padded",
    "forward_field_ppm",
    "from_b0_aligned",
    "from_ras",
    "hz_to_ppm",
    "hz_to_rad",
    "is_tensor",
    "kspace_grid",
    "padded_shape",
    "ras_voxel_size",
    "ppm_to_hz",
    "ppm_to_rad",
    "rad_to_hz",
    "rad_to_ppm",
    "resample_to_grid",
    "resolve_device",
    "to_b0_aligned",
    "to_device",
    "to_numpy",
    "to_ras",
    "voxel_rotation",
    "voxel_size_from_affine",
    "zero_outside",
]
