"""Spatial unwrapping of wrapped smooth fields: Laplacian (least squares) and quality-guided."""

import numpy as np
import pytest

from qsmprep.phase import unwrap_laplacian, unwrap_quality

N = 64
TWO_PI = 2 * np.pi


def _wrapped_scene(voxel_size_mm):
    """A Gaussian bump of 6 cycles plus a quadratic of 3 cycles, its wrap, and an ellipsoid mask."""
    axes = [(np.arange(N) - N / 2) * d for d in voxel_size_mm]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    half = np.asarray(voxel_size_mm) * N / 2
    r2 = (x / half[0]) ** 2 + (y / half[1]) ** 2 + (z / half[2]) ** 2
    true = 6 * TWO_PI * np.exp(-r2 / 0.3) + 3 * TWO_PI * (x / half[0]) ** 2
    wrapped = np.angle(np.exp(1j * true)).astype(np.float32)
    mask = r2 < 0.7
    return true, wrapped, mask


VOXELS = [(1.0, 1.0, 1.0), (0.5, 0.8, 1.6)]


@pytest.mark.parametrize("voxel_size_mm", VOXELS)
def test_laplacian_unwrapping_reproduces_the_field_up_to_a_constant(voxel_size_mm):
    true, wrapped, mask = _wrapped_scene(voxel_size_mm)
    assert np.abs(wrapped - true).max() > 5 * TWO_PI  # many wraps
    for region in (None, mask):
        got = unwrap_laplacian(wrapped, voxel_size_mm, mask=region)
        assert got.dtype == np.float32
        error = (got - true)[mask]
        error -= error.mean()
        assert np.abs(error).max() < 1e-3  # measured <= 5e-4 rad
        if region is not None:
            assert not got[~mask].any()


def test_laplacian_constant_makes_result_nearly_congruent_and_handles_nan():
    true, wrapped, mask = _wrapped_scene(VOXELS[1])
    wrapped = wrapped.copy()
    wrapped[~mask] = np.nan
    got = unwrap_laplacian(wrapped, VOXELS[1])  # NaN = outside, no mask given
    cycles = (got - wrapped)[mask] / TWO_PI
    assert np.abs(cycles - np.round(cycles)).max() < 1e-3
    error = (got - true)[mask]  # unwrapped, not just congruent (the wrapped input is congruent too)
    error -= error.mean()
    assert np.abs(error).max() < 1e-3  # measured 4.5e-4 rad
    assert not got[~mask].any()


def test_laplacian_with_noise_errors_stay_small_and_smooth():
    true, wrapped, mask = _wrapped_scene(VOXELS[0])
    rng = np.random.default_rng(0)
    noisy = np.angle(np.exp(1j * (wrapped + rng.normal(0, 0.3, wrapped.shape)))).astype(np.float32)
    got = unwrap_laplacian(noisy, VOXELS[0], mask=mask)
    error = (got - true)[mask]
    error -= np.median(error)
    # the error is the added noise (mean |N(0, 0.3)| = 0.24 rad), with no 2 pi jumps
    assert np.percentile(np.abs(error), 99) < 0.9  # measured 0.78
    assert np.abs(error).mean() < 0.26  # measured 0.240


@pytest.mark.parametrize("voxel_size_mm", VOXELS)
def test_quality_unwrapping_is_exact_and_congruent(voxel_size_mm):
    true, wrapped, mask = _wrapped_scene(voxel_size_mm)
    got = unwrap_quality(wrapped, mask=mask, voxel_size_mm=voxel_size_mm)
    cycles = (got - wrapped)[mask] / TWO_PI
    assert np.abs(cycles - np.round(cycles)).max() < 1e-4  # congruent
    offset = (got - true)[mask]
    assert np.ptp(offset) < 1e-4  # one constant...
    assert abs(offset[0] / TWO_PI - round(offset[0] / TWO_PI)) < 1e-4  # ... a multiple of 2 pi
    assert -np.pi <= np.median(got[mask]) < np.pi
    assert not got[~mask].any()


def test_quality_unwrapping_separate_regions_each_get_their_median_in_range():
    true, wrapped, mask = _wrapped_scene(VOXELS[0])
    two = mask.copy()
    two[N // 2 - 2:N // 2 + 2] = False  # cut the mask in two halves
    got = unwrap_quality(wrapped, mask=two)
    for half in (slice(0, N // 2), slice(N // 2, N)):
        region = np.zeros_like(two)
        region[half] = two[half]
        offset = (got - true)[region]
        assert np.ptp(offset) < 1e-4
        assert -np.pi <= np.median(got[region]) < np.pi


def test_bad_input_shapes_are_refused():
    with pytest.raises(ValueError, match="3D"):
        unwrap_laplacian(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="mask shape"):
        unwrap_quality(np.zeros((4, 4, 4)), mask=np.ones((4, 4, 3), bool))
    with pytest.raises(ValueError, match="voxel size"):
        unwrap_laplacian(np.zeros((4, 4, 4)), voxel_size_mm=(1, 0, 1))
