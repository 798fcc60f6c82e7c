"""Dipole inversion: local field (ppm) -> susceptibility (ppm)."""

from .solvers import cg, lsqr

__all__ = ["cg", "lsqr"]
