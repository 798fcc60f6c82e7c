"""Dipole inversion: solvers on known systems, TKD / CFL2 / iLSQR on simulated chi."""

import numpy as np
import pytest

from qsmprep.inversion import cg, lsqr


def _spd_matrix(n, seed):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    return (m @ m.T + n * np.eye(n)).astype(np.float64)


def test_cg_solves_spd_system():
    a = _spd_matrix(30, 0)
    x_true = np.random.default_rng(1).standard_normal(30)
    b = a @ x_true
    x = cg(lambda v: a @ v, b, tol=1e-10, max_iter=200)
    np.testing.assert_allclose(x, x_true, rtol=1e-7, atol=1e-8)


def test_cg_keeps_volume_shape_uses_x0_and_calls_back():
    # diagonal SPD operator on a 3D float32 volume: x = b / diag
    rng = np.random.default_rng(2)
    diag = rng.uniform(1.0, 4.0, (6, 7, 5)).astype(np.float32)
    b = rng.standard_normal((6, 7, 5)).astype(np.float32)
    seen = []
    x = cg(lambda v: diag * v, b, x0=np.ones_like(b), tol=1e-6, max_iter=100, callback=lambda x, i: seen.append(i))
    assert x.shape == b.shape and x.dtype == np.float32
    np.testing.assert_allclose(x, b / diag, rtol=1e-4, atol=1e-5)
    assert seen and seen == list(range(1, len(seen) + 1))


def test_cg_stops_at_max_iter():
    a = _spd_matrix(40, 3)
    b = np.ones(40)
    x1 = cg(lambda v: a @ v, b, tol=0, max_iter=1)
    # one CG step from zero is the steepest-descent step along b
    alpha = b @ b / (b @ a @ b)
    np.testing.assert_allclose(x1, alpha * b)


def test_lsqr_solves_overdetermined_least_squares():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((50, 20))
    b = rng.standard_normal(50)
    x = lsqr(lambda v: a @ v, lambda y: a.T @ y, b, tol=1e-12, max_iter=200)
    np.testing.assert_allclose(x, np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-6, atol=1e-8)


def test_lsqr_damped_and_with_x0():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((40, 25))
    b = rng.standard_normal(40)
    damp = 0.7
    x = lsqr(lambda v: a @ v, lambda y: a.T @ y, b, tol=1e-12, max_iter=300, damp=damp)
    expected = np.linalg.solve(a.T @ a + damp**2 * np.eye(25), a.T @ b)
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-8)
    # undamped, from a starting guess: the same least-squares solution
    x0 = rng.standard_normal(25)
    x = lsqr(lambda v: a @ v, lambda y: a.T @ y, b, x0=x0, tol=1e-12, max_iter=300)
    np.testing.assert_allclose(x, np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-6, atol=1e-8)


def test_lsqr_operator_between_different_shapes_stops_early_with_loose_tol():
    # A maps a (4, 5) image to a (20, 3) array; consistent system
    rng = np.random.default_rng(6)
    m = rng.standard_normal((60, 20))
    x_true = rng.standard_normal((4, 5))
    apply_a = lambda v: (m @ v.ravel()).reshape(20, 3)  # noqa: E731
    apply_at = lambda y: (m.T @ y.ravel()).reshape(4, 5)  # noqa: E731
    b = apply_a(x_true)
    x = lsqr(apply_a, apply_at, b, tol=1e-10, max_iter=100)
    assert x.shape == (4, 5)
    np.testing.assert_allclose(x, x_true, rtol=1e-6, atol=1e-7)
    calls = []
    lsqr(lambda v: calls.append(1) or apply_a(v), apply_at, b, tol=0.1, max_iter=100)
    assert len(calls) < 20
