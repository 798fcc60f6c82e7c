"""Weighted forward-difference gradient and its adjoint, shared by iLSQR and the deep refinement's TV term.

Both take float32 numpy arrays or torch tensors (the refinement runs in torch on the network's device).
"""

import numpy as np

from ..physics import is_tensor


def _along(axis, start, stop):
    """Index of the slice start:stop along ``axis`` (all of the other axes)."""
    return (slice(None),) * axis + (slice(start, stop),)


def forward_gradient(u, weights):
    """Periodic forward differences of ``u`` along each axis, times ``weights[axis]``: a (3, ...) array.

    With ``weights[axis]`` = w / voxel size (mm) this is the weighted gradient in ppm/mm.
    """
    shape = (3,) + tuple(u.shape)
    out = u.new_empty(shape) if is_tensor(u) else np.empty(shape, dtype=np.float32)
    for axis, w in enumerate(weights):
        n = u.shape[axis]
        g = out[axis]
        g[_along(axis, 0, n - 1)] = u[_along(axis, 1, n)] - u[_along(axis, 0, n - 1)]
        g[_along(axis, n - 1, n)] = u[_along(axis, 0, 1)] - u[_along(axis, n - 1, n)]
        g *= w
    return out


def inner_edge_weights(mask, voxel_size_mm):
    """Per-axis weights for ``forward_gradient``: 1 / voxel size (mm) where a voxel and its next one are both in
    ``mask``, else 0 (float32 arrays), so the drop to zero at the mask's edge, and the grid's wrap, are no edges.
    ``forward_gradient_adjoint`` of ``forward_gradient`` with them is minus the Laplacian over neighbours inside
    the mask (``masked_laplacian``)."""
    mask = np.asarray(mask, dtype=np.float32)
    weights = []
    for axis, v in enumerate(voxel_size_mm):
        both = mask * np.roll(mask, -1, axis=axis)
        np.moveaxis(both, axis, 0)[-1] = 0
        weights.append(both / np.float32(v))
    return weights


def masked_laplacian(u, mask, voxel_size_mm):
    """7-point Laplacian of ``u`` (per mm^2) over neighbours inside ``mask`` only; 0 outside the mask."""
    weights = inner_edge_weights(mask, voxel_size_mm)
    return np.where(mask, -forward_gradient_adjoint(forward_gradient(u, weights), weights), np.float32(0))


def forward_gradient_adjoint(g, weights):
    """Adjoint of ``forward_gradient``: minus the backward-difference divergence of ``weights * g``."""
    out = g.new_zeros(g.shape[1:]) if is_tensor(g) else np.zeros(g.shape[1:], dtype=np.float32)
    for axis, w in enumerate(weights):
        n = out.shape[axis]
        t = g[axis] * w
        out -= t
        out[_along(axis, 1, n)] += t[_along(axis, 0, n - 1)]
        out[_along(axis, 0, 1)] += t[_along(axis, n - 1, n)]
    return out
