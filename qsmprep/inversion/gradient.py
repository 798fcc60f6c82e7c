"""Weighted forward-difference gradient and its adjoint, shared by iLSQR and the deep refinement's TV term."""

import numpy as np


def forward_gradient(u, weights):
    """Periodic forward differences of ``u`` along each axis, times ``weights[axis]``: a (3, ...) array.

    With ``weights[axis]`` = w / voxel size (mm) this is the weighted gradient in ppm/mm.
    """
    out = np.empty((3,) + u.shape, dtype=np.float32)
    for axis, w in enumerate(weights):
        n = u.shape[axis]
        g = np.moveaxis(out[axis], axis, 0)
        v = np.moveaxis(u, axis, 0)
        np.subtract(v[1:], v[: n - 1], out=g[: n - 1])
        np.subtract(v[0], v[n - 1], out=g[n - 1])
        out[axis] *= w
    return out


def forward_gradient_adjoint(g, weights):
    """Adjoint of ``forward_gradient``: minus the backward-difference divergence of ``weights * g``."""
    out = np.zeros(g.shape[1:], dtype=np.float32)
    for axis, w in enumerate(weights):
        n = out.shape[axis]
        t = g[axis] * w
        out -= t
        t = np.moveaxis(t, axis, 0)
        o = np.moveaxis(out, axis, 0)
        o[1:] += t[: n - 1]
        o[0] += t[n - 1]
    return out
