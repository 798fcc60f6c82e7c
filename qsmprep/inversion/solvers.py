"""Matrix-free iterative solvers on arrays: conjugate gradients and LSQR.

Operators are Python callables mapping an array to an array (typically FFT
convolutions), so no matrix is ever formed. Vectors keep their shape (3D
volumes stay 3D) and their own dtype (float32 for images); inner products
use BLAS in that dtype and the scalar recurrences run in Python floats.
``cg`` also takes real torch tensors, and then runs on their device (the
deep refinement on a GPU).
"""

import logging
import math

import numpy as np

from ..physics import is_tensor

log = logging.getLogger(__name__)


def _dot(a, b):
    """Real inner product <a, b> as a Python float (real part for complex numpy arrays; real torch tensors)."""
    if isinstance(a, np.ndarray):
        return float(np.real(np.vdot(a.ravel(), b.ravel())))
    return float(a.reshape(-1).dot(b.reshape(-1)))


def _zeros_like(a):
    return a.new_zeros(a.shape) if is_tensor(a) else np.zeros_like(a)


def _copy(a, like):
    """A copy of ``a`` in ``like``'s dtype (a torch tensor stays on its device)."""
    return a.to(like.dtype, copy=True) if is_tensor(a) else np.array(a, dtype=like.dtype, copy=True)


def _norm(a):
    return math.sqrt(_dot(a, a))


def cg(apply_A, b, x0=None, tol=1e-6, max_iter=100, callback=None, precondition=None):
    """Solve A x = b by (preconditioned) conjugate gradients for symmetric positive (semi)definite A.

    Hestenes MR, Stiefel E. Methods of conjugate gradients for solving linear
    systems. J Res Natl Bur Stand 1952;49:409-436. With a preconditioner M ~ A^-1,
    the search directions follow z = M r (Golub GH, Van Loan CF. Matrix
    Computations, 4th ed., Algorithm 11.5.1).

    Parameters
    ----------
    apply_A : callable
        ``apply_A(x)`` returns A x, an array shaped like ``x``. A must be
        symmetric positive definite (or semidefinite with ``b`` in its range).
    b : array or real torch tensor
        Right-hand side, any shape (e.g. a 3D volume); float32 recommended.
    x0 : array, tensor or None, default None
        Initial guess, of ``b``'s kind; zeros if None.
    tol : float, default 1e-6
        Stop when the residual norm ||b - A x|| <= tol * ||b||.
    max_iter : int, default 100
        Maximum number of iterations.
    callback : callable or None, default None
        Called as ``callback(x, iteration)`` after each iteration.
    precondition : callable or None, default None
        ``precondition(r)`` returns M r for a symmetric positive definite M close to A^-1 (e.g. a fast Poisson
        solver for a masked Laplacian); None is the identity, plain CG.

    Returns
    -------
    x : array (or tensor) shaped like ``b``, in ``b``'s dtype.
    """
    b = b if is_tensor(b) else np.asarray(b)
    x = _zeros_like(b) if x0 is None else _copy(x0, like=b)
    r = b - apply_A(x) if x0 is not None else _copy(b, like=b)
    b_norm = _norm(b)
    if b_norm == 0:
        return _zeros_like(b)
    z = r if precondition is None else precondition(r)
    p = _copy(z, like=z)
    rr = _dot(r, r)
    rz = rr if precondition is None else _dot(r, z)
    for it in range(1, max_iter + 1):
        if math.sqrt(rr) <= tol * b_norm:
            break
        ap = apply_A(p)
        p_ap = _dot(p, ap)
        if p_ap <= 0:  # A is only semidefinite and p lies in its null space
            log.debug("cg: stopped at iteration %d, p'Ap = %g", it, p_ap)
            break
        alpha = rz / p_ap
        x += alpha * p
        r -= alpha * ap
        rr = _dot(r, r)
        z = r if precondition is None else precondition(r)
        rz_new = rr if precondition is None else _dot(r, z)
        p *= rz_new / rz
        p += z
        rz = rz_new
        if callback is not None:
            callback(x, it)
    log.debug("cg: relative residual %.3g after %d iterations", math.sqrt(rr) / b_norm, it)
    return x


def lsqr(apply_A, apply_At, b, x0=None, tol=1e-6, max_iter=100, damp=0.0):
    """Least-squares solution of A x ~ b (optionally damped) by LSQR.

    Minimises ||A x - b||^2 + damp^2 ||x||^2 by Golub-Kahan bidiagonalisation.
    Paige CC, Saunders MA. LSQR: An algorithm for sparse linear equations and
    sparse least squares. ACM Trans Math Softw 1982;8:43-71.

    Parameters
    ----------
    apply_A : callable
        ``apply_A(x)`` returns A x (an array shaped like ``b``).
    apply_At : callable
        ``apply_At(y)`` returns A^T y (an array shaped like ``x``); it must
        be the exact adjoint of ``apply_A``.
    b : array
        Data, any shape.
    x0 : array or None, default None
        Initial guess; zeros if None (LSQR then solves for the correction).
    tol : float, default 1e-6
        Stopping tolerance, Paige & Saunders' ATOL = BTOL = ``tol``: stop
        when ||r|| <= tol (||b|| + ||A|| ||x||) (a consistent system is
        solved) or ||A^T r|| <= tol ||A|| ||r|| (the least-squares optimum
        is reached), with ||A|| the running Frobenius-norm estimate.
    max_iter : int, default 100
        Maximum number of iterations.
    damp : float, default 0.0
        Tikhonov damping weight (>= 0).

    Returns
    -------
    x : array shaped like ``apply_At(b)``.
    """
    b = np.asarray(b)
    if x0 is None:
        u = b.copy()
        x = None
    else:
        x = np.array(x0, copy=True)
        u = b - apply_A(x)
    beta = _norm(u)
    b_norm = beta
    if beta > 0:
        u /= beta
    v = apply_At(u)
    if x is None:
        x = np.zeros_like(v)
    alpha = _norm(v)
    if alpha == 0 or beta == 0:
        return x
    v /= alpha
    w = v.copy()
    phibar, rhobar = beta, alpha
    a_norm2 = 0.0
    residual_damp2 = 0.0
    for it in range(1, max_iter + 1):
        # Golub-Kahan bidiagonalisation step
        u *= -alpha
        u += apply_A(v)
        beta = _norm(u)
        if beta > 0:
            u /= beta
        a_norm2 += alpha**2 + beta**2 + damp**2
        v *= -beta
        v += apply_At(u)
        alpha = _norm(v)
        if alpha > 0:
            v /= alpha
        # eliminate the damping term, then the subdiagonal, by plane rotations
        if damp > 0:
            rhobar1 = math.hypot(rhobar, damp)
            psi = damp / rhobar1 * phibar
            phibar = rhobar / rhobar1 * phibar
            residual_damp2 += psi**2
        else:
            rhobar1 = rhobar
        rho = math.hypot(rhobar1, beta)
        cs, sn = rhobar1 / rho, beta / rho
        theta = sn * alpha
        rhobar = -cs * alpha
        phi = cs * phibar
        phibar = sn * phibar
        # update the solution and the search direction
        x += (phi / rho) * w
        w *= -theta / rho
        w += v
        r_norm = math.sqrt(phibar**2 + residual_damp2)
        at_r_norm = alpha * abs(sn * phi)
        a_norm = math.sqrt(a_norm2)
        if r_norm <= tol * (b_norm + a_norm * _norm(x)) or at_r_norm <= tol * a_norm * r_norm:
            break
    log.debug("lsqr: |r|/|b| = %.3g after %d iterations", r_norm / b_norm, it)
    return x
