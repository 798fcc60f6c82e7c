"""Resampling onto a B0-aligned grid and back."""

import numpy as np
import pytest

from qsmprep.physics.orientation import b0_dir_from_affine, voxel_size_from_affine
from qsmprep.physics.resample import (
    antialias_sigma_vox,
    b0_aligned_grid,
    from_b0_aligned,
    resample_to_grid,
    to_b0_aligned,
)


def _rot_x(deg):
    t = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def _rot_y(deg):
    t = np.radians(deg)
    return np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])


def _rot_z(deg):
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def _interior(native_shape, native_affine, shape, affine, margin_vox):
    """Voxels of (shape, affine) whose centre lies at least ``margin_vox``
    native voxels inside the native grid's outer voxel centres."""
    world = _world(shape, affine).reshape(3, -1)
    idx = np.linalg.solve(native_affine[:3, :3], world - native_affine[:3, 3:4])
    ok = np.all((idx >= margin_vox) & (idx <= np.array(native_shape)[:, None] - 1 - margin_vox), axis=0)
    return ok.reshape(shape)


def _affine(rotation, voxel_size, shape):
    """Affine with the FOV centre at the world origin."""
    a = np.eye(4)
    a[:3, :3] = rotation * np.asarray(voxel_size)
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def _world(shape, affine):
    idx = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape((3,) + tuple(shape))


def _smooth_field(world):
    """A smooth field in world coordinates (mm): Gaussian blob plus a gradient."""
    x, y, z = world
    return np.exp(-((x - 3) ** 2 + (y + 2) ** 2 + z**2) / (2 * 7.0**2)) + 0.01 * x - 0.02 * z


@pytest.mark.parametrize("tilt_deg", [20.0, 45.0])
def test_aligned_affine_has_b0_along_third_axis_and_covers_fov(tilt_deg):
    shape = (40, 36, 30)
    affine = _affine(_rot_x(tilt_deg) @ _rot_z(10), (1.0, 1.0, 1.5), shape)
    assert abs(b0_dir_from_affine(affine)[2]) < 0.99
    new_shape, new_affine = b0_aligned_grid(shape, affine)
    np.testing.assert_allclose(b0_dir_from_affine(new_affine), (0, 0, 1), atol=1e-12)
    # voxel sizes kept (the slab axis stays third)
    np.testing.assert_allclose(voxel_size_from_affine(new_affine), (1.0, 1.0, 1.5), atol=1e-12)
    # every native voxel centre lies inside the new grid
    idx = np.linalg.inv(new_affine) @ np.vstack([_world(shape, affine).reshape(3, -1), np.ones((1, np.prod(shape)))])
    assert (idx[:3].min(axis=1) >= -0.5).all()
    assert (idx[:3].max(axis=1) <= np.array(new_shape) - 0.5).all()


@pytest.mark.parametrize("shape", [(40, 36, 30), (41, 37, 31)])
def test_aligned_grid_keeps_the_parity_of_the_acquisition_grid(shape):
    """A bounding box an odd number of voxels larger put the centred grid half a voxel off the acquisition's, the
    worst case for interpolation, paid twice (docs/methods/resampling.md). At a small tilt the two grids' central
    voxel centres now coincide."""
    affine = _affine(_rot_x(5.0), (1.0, 1.0, 1.0), shape)  # the box grows by 2.5-3 voxels along j and k
    new_shape, new_affine = b0_aligned_grid(shape, affine)
    assert all((n - s) % 2 == 0 for n, s in zip(new_shape, shape)) and new_shape != tuple(shape)
    central_voxel = np.array([s // 2 for s in shape] + [1.0])  # under 0.9 voxels from the centre of rotation
    index = (np.linalg.inv(new_affine) @ affine @ central_voxel)[:3]
    # on a voxel centre of the new grid, but for the tilt's displacement (0.9 x sin 5 deg = 0.08 voxels), not 0.5 off
    np.testing.assert_allclose(index, np.round(index), atol=0.1)


def test_axial_grid_rotated_in_plane_is_unchanged():
    shape = (20, 22, 10)
    affine = _affine(np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]]) @ _rot_y(0), (0.8, 0.8, 2.0), shape)
    new_shape, new_affine = b0_aligned_grid(shape, affine)
    assert new_shape == shape
    np.testing.assert_allclose(new_affine, affine, atol=1e-9)
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(resample_to_grid(data, affine, new_shape, new_affine), data, atol=1e-5)


def test_sagittal_acquisition_puts_b0_axis_third():
    # voxel axis j along world z: it becomes the third axis, with its voxel size
    shape = (30, 40, 20)
    rotation = np.array([[0, 0, 1.0], [1, 0, 0], [0, 1, 0]])
    affine = _affine(rotation, (1.0, 0.5, 2.0), shape)
    new_shape, new_affine = b0_aligned_grid(shape, affine)
    assert new_shape == (30, 20, 40)
    np.testing.assert_allclose(voxel_size_from_affine(new_affine), (1.0, 2.0, 0.5), atol=1e-12)
    np.testing.assert_allclose(b0_dir_from_affine(new_affine), (0, 0, 1), atol=1e-12)


@pytest.mark.parametrize("tilt_deg", [20.0, 45.0])
@pytest.mark.parametrize("order, margin_vox, tol", [(1, 0, 0.012), (3, 2, 0.002)])
def test_round_trip_of_smooth_field_through_oblique_grid(tilt_deg, order, margin_vox, tol):
    shape = (40, 40, 32)
    affine = _affine(_rot_x(tilt_deg), (1.0, 1.0, 1.0), shape)
    field = _smooth_field(_world(shape, affine)).astype(np.float32)
    aligned, aligned_affine = to_b0_aligned(field, affine, order=order)
    # on the aligned grid the data are the same field at the new positions
    inside = _interior(shape, affine, aligned.shape, aligned_affine, margin_vox)
    expected = _smooth_field(_world(aligned.shape, aligned_affine))
    assert np.abs(aligned[inside] - expected[inside]).max() < tol
    back = from_b0_aligned(aligned, aligned_affine, shape, affine, order=order)
    # back on the native grid, away from the FOV corners the aligned grid cut
    interior = (slice(4, -4),) * 3
    assert np.abs(back[interior] - field[interior]).max() < tol


def test_constant_stays_constant():
    shape = (24, 24, 20)
    affine = _affine(_rot_x(30) @ _rot_y(15), (0.75, 0.75, 2.0), shape)
    const = np.full(shape, 0.37, np.float32)
    for order in (1, 3):
        aligned, aligned_affine = to_b0_aligned(const, affine, voxel_size_mm=1.0, order=order)
        inside = _interior(shape, affine, aligned.shape, aligned_affine, -0.49)
        assert inside.sum() > 5000
        np.testing.assert_allclose(aligned[inside], 0.37, rtol=1e-5)
        # outside the native FOV (beyond the outer voxel edges) the aligned grid is zero
        assert np.abs(aligned[~_interior(shape, affine, aligned.shape, aligned_affine, -0.51)]).max() == 0


def test_complex_resampling_of_wrapped_phase_creates_no_wraps():
    shape = (40, 40, 32)
    affine = _affine(_rot_x(25), (1.0, 1.0, 1.0), shape)
    # a smooth phase of +-12 rad: wrapped many times
    x, y, z = _world(shape, affine)
    phase = 0.5 * x + 0.02 * y**2 - 0.3 * z
    signal = np.exp(1j * phase).astype(np.complex64)
    aligned, aligned_affine = to_b0_aligned(signal, affine)
    inside = _interior(shape, affine, aligned.shape, aligned_affine, 0)
    xa, ya, za = _world(aligned.shape, aligned_affine)
    expected = 0.5 * xa + 0.02 * ya**2 - 0.3 * za
    error = np.angle(aligned * np.exp(-1j * expected))[inside]
    assert np.abs(error).max() < 0.1
    # interpolating the wrapped phase as a real image instead breaks it at every wrap
    naive = resample_to_grid(np.angle(signal), affine, aligned.shape, aligned_affine)
    naive_error = np.angle(np.exp(1j * (naive - expected)))[inside]
    assert np.abs(naive_error).max() > 1.0
    # magnitude_phase keeps unit magnitude where real/imag interpolation dephases
    kept = resample_to_grid(signal, affine, aligned.shape, aligned_affine, complex_mode="magnitude_phase")
    np.testing.assert_allclose(np.abs(kept[inside]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.angle(kept[inside]), np.angle(aligned[inside]), atol=1e-5)


def test_anisotropic_to_isotropic():
    shape = (48, 48, 18)
    affine = _affine(np.eye(3), (0.75, 0.75, 2.0), shape)
    field = _smooth_field(_world(shape, affine)).astype(np.float32)
    iso, iso_affine = to_b0_aligned(field, affine, voxel_size_mm=1.0, order=3)
    # 36 x 36 x 36 mm FOV at 1 mm
    assert iso.shape == (36, 36, 36)
    np.testing.assert_allclose(voxel_size_from_affine(iso_affine), (1, 1, 1))
    inside = _interior(shape, affine, iso.shape, iso_affine, 2)
    expected = _smooth_field(_world(iso.shape, iso_affine))
    # measured 6.4e-4 (in-plane anti-aliasing sigma 0.375 voxel included)
    assert np.abs(iso[inside] - expected[inside]).max() < 0.002


def test_antialiasing_sigma_and_effect():
    shape = (32, 32, 8)
    affine = _affine(np.eye(3), (1.0, 1.0, 1.0), shape)
    coarse = _affine(np.eye(3), (2.0, 1.0, 0.5), (16, 32, 16))
    sigma = antialias_sigma_vox(affine, coarse)
    np.testing.assert_allclose(sigma, (np.sqrt(3) / 2.3548200450309493, 0.0, 0.0), rtol=1e-9)
    # a Nyquist pattern along i aliases to a large constant without the filter
    nyquist = np.where(np.indices(shape)[0] % 2 == 0, 1.0, -1.0).astype(np.float32)
    # sample at i = 0, 2, 4, ... (all +1) with the coarse grid on the same origin
    coarse[:3, 3] = affine[:3, 3]
    plain = resample_to_grid(nyquist, affine, (16, 32, 8), coarse, antialias=False)
    filtered = resample_to_grid(nyquist, affine, (16, 32, 8), coarse)
    assert np.allclose(plain[1:-1, 1:-1, 1:-1], 1.0)
    # response of the sampled, normalised Gaussian (scipy truncates at 4 sigma)
    # at the Nyquist frequency: sum_k (-1)^k w_k
    k = np.arange(-int(4 * sigma[0] + 0.5), int(4 * sigma[0] + 0.5) + 1)
    w = np.exp(-(k**2) / (2 * sigma[0] ** 2))
    expected = np.sum(w * (-1.0) ** k) / w.sum()
    assert 0.1 < expected < 0.2
    np.testing.assert_allclose(filtered[2:-2, 2:-2, 2:-2], expected, rtol=1e-4)


def test_four_dimensional_data_resampled_per_volume():
    shape = (20, 20, 16)
    affine = _affine(_rot_x(20), (1.0, 1.0, 1.0), shape)
    field = _smooth_field(_world(shape, affine)).astype(np.float32)
    stacked = np.stack([field, 2 * field], axis=-1)
    aligned, _ = to_b0_aligned(stacked, affine)
    single, _ = to_b0_aligned(field, affine)
    assert aligned.shape == single.shape + (2,)
    np.testing.assert_allclose(aligned[..., 1], 2 * single, rtol=1e-5, atol=1e-6)
