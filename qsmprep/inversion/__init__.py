"""Dipole inversion: local field (ppm) -> susceptibility (ppm). See docs/methods/inversion.md.

Each method is called as f(local_field_ppm, mask, voxel_size_mm, b0_dir, ...); ``qsmprep.config.library_function``
finds one by the name the pipeline and CLIs use. ``deep_invert`` imports torch only when called."""

from .cfl2 import cfl2
from .deep import deep_invert
from .ilsqr import ilsqr
from .reference import reference_to_mask
from .solvers import cg, lsqr
from .tkd import tkd
from .tv import tv

__all__ = ["cfl2", "cg", "deep_invert", "ilsqr", "lsqr", "reference_to_mask", "tkd", "tv"]
