"""Dipole inversion: local field (ppm) -> susceptibility (ppm). See docs/methods/inversion.md."""

from .cfl2 import cfl2
from .deep import deep_invert
from .ilsqr import ilsqr
from .solvers import cg, lsqr
from .tkd import tkd
from .tv import tv

INVERSION_METHODS = {"tkd": tkd, "cfl2": cfl2, "ilsqr": ilsqr, "tv": tv, "deep": deep_invert}
"""Inversions by name; each is called as f(local_field_ppm, mask, voxel_size_mm, b0_dir, ...).
``deep`` imports torch only when called."""

__all__ = ["INVERSION_METHODS", "cfl2", "cg", "deep_invert", "ilsqr", "lsqr", "tkd", "tv"]
