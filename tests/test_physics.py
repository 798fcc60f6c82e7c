"""Physics: dipole kernel, forward model against analytic fields, units, B0 direction."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from qsmprep.physics import (
    b0_dir_from_affine,
    dipole_kernel,
    forward_field_ppm,
    hz_to_ppm,
    ppm_to_hz,
    ppm_to_rad,
    rad_to_hz,
    rad_to_ppm,
)


def _grid(shape, voxel_size):
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, voxel_size)]
    return np.meshgrid(*axes, indexing="ij")


@pytest.mark.parametrize("shape", [(16, 16, 16), (15, 17, 13), (8, 9, 10)])
def test_dipole_kernel_dc_zero_symmetric_and_zero_mean(shape):
    d = dipole_kernel(shape, (1.0, 0.8, 1.5), (0.2, -0.3, 0.9))
    assert d[0, 0, 0] == 0
    # D(k) = D(-k) on the periodic grid (the image-space kernel is real and
    # even), the Nyquist planes of even axes included
    flipped = np.roll(d[::-1, ::-1, ::-1], 1, axis=(0, 1, 2))
    np.testing.assert_allclose(d, flipped, atol=1e-7)
    assert d.max() <= 1 / 3 + 1e-6 and d.min() >= -2 / 3 - 1e-6
    # zero mean in image space: the kernel's value at DC
    assert abs(np.real(np.fft.ifftn(d)).sum()) < 1e-5


def test_dipole_kernel_at_nyquist_is_the_mean_over_both_signs():
    # on an 8^3 grid of 1 mm voxels, k = (-0.5, 0.25, 0.125) cycles/mm sits on the
    # first axis's Nyquist plane, where +0.5 is the same sample
    b = np.array([0.6, 0.0, 0.8])
    k_minus, k_plus = np.array([-0.5, 0.25, 0.125]), np.array([0.5, 0.25, 0.125])
    expected = np.mean([1 / 3 - (k @ b) ** 2 / (k @ k) for k in (k_minus, k_plus)])
    assert dipole_kernel((8, 8, 8), (1, 1, 1), b)[4, 2, 1] == pytest.approx(expected, abs=1e-7)
    assert dipole_kernel((8, 8, 8), (1, 1, 1), b)[3, 2, 1] == pytest.approx(1 / 3 - (3 / 8 * 0.6 + 0.1) ** 2 / (
        (3 / 8) ** 2 + 1 / 16 + 1 / 64), abs=1e-7)


def test_rfft_kernel_matches_full_kernel():
    shape = (10, 11, 9)
    full = dipole_kernel(shape, (1, 1, 2), (0, 0.5, 1))
    half = dipole_kernel(shape, (1, 1, 2), (0, 0.5, 1), rfft=True)
    np.testing.assert_allclose(full[:, :, : half.shape[2]], half)
    # built as a torch tensor on a device (the GPU refinement), the same kernel
    torch = pytest.importorskip("torch")
    on_device = dipole_kernel(shape, (1, 1, 2), (0, 0.5, 1), rfft=True, device=torch.device("cpu"))
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float32
    np.testing.assert_allclose(on_device.numpy(), half, atol=1e-7)


@pytest.mark.parametrize("voxel_size", [(1.0, 1.0, 1.0), (0.8, 0.8, 1.6)])
@pytest.mark.parametrize("tilt_deg", [0.0, 30.0])
def test_sphere_field_matches_analytic_outside(voxel_size, tilt_deg):
    shape = (64, 64, 64) if voxel_size[2] == 1.0 else (80, 80, 40)
    x, y, z = _grid(shape, voxel_size)
    radius = 7.0
    # a sharp voxelised sphere aliases; an isotropic blur (1 mm) keeps the
    # sphere's exterior field and makes the source band-limited
    sphere = (x**2 + y**2 + z**2 <= radius**2).astype(np.float32)
    chi = gaussian_filter(sphere, sigma=[1.0 / d for d in voxel_size])
    t = np.radians(tilt_deg)
    b = (0.0, np.sin(t), np.cos(t))
    field = forward_field_ppm(chi, voxel_size, b)
    # outside, a spherically symmetric source is a point dipole of its volume
    volume = chi.sum() * np.prod(voxel_size)
    r = np.sqrt(x**2 + y**2 + z**2)
    cos_theta = (x * b[0] + y * b[1] + z * b[2]) / np.maximum(r, 1e-9)
    analytic = volume / (4 * np.pi) * (3 * cos_theta**2 - 1) / np.maximum(r, 1e-9) ** 3
    ring = (r > radius + 6) & (r < radius + 16)
    err = np.abs(field[ring] - analytic[ring])
    assert err.max() < 0.08 * np.abs(analytic[ring]).max()
    # inside (Lorentz-corrected) the field of a uniform sphere vanishes
    # up to the staircase error of the voxelised surface
    # (discrete-kernel ringing of a few % of chi, zero on average)
    inside = field[r < radius - 2]
    assert abs(inside.mean()) < 0.01 and np.abs(inside).max() < 0.08


@pytest.mark.parametrize("theta_deg", [0.0, 30.0, 54.7356, 90.0])
def test_infinite_cylinder_field_matches_analytic(theta_deg):
    # cylinder along k (long axis), B0 tilted by theta from it in the (j, k) plane
    shape = (96, 96, 16)
    x, y, _ = _grid(shape, (1, 1, 1))
    radius = 6.0
    chi = (x**2 + y**2 <= radius**2).astype(np.float32)
    t = np.radians(theta_deg)
    b = (0.0, np.sin(t), np.cos(t))
    # periodic along the cylinder axis makes it infinite: no padding on k
    from scipy import fft as spfft

    big = (512, 512, 16)  # wide transverse padding: D(0) = 0 offsets the field by area/total
    field = spfft.ifftn(spfft.fftn(chi, s=big) * dipole_kernel(big, (1, 1, 1), b)).real[:96, :96]
    rho = np.sqrt(x**2 + y**2)
    phi = np.arctan2(y, x)  # angle from the axis orthogonal to the B0 projection
    area_radius2 = chi[:, :, 0].sum() / np.pi
    outside = area_radius2 / 2 * np.sin(t) ** 2 * (-np.cos(2 * phi)) / np.maximum(rho, 1e-9) ** 2
    inside = (3 * np.cos(t) ** 2 - 1) / 6
    ring = (rho > radius + 3) & (rho < radius + 12)
    scale = max(np.sin(t) ** 2 / 2, 1e-3)
    assert np.abs(field[ring] - outside[ring]).max() < 0.06 * scale + 3e-4
    core = rho < radius - 2
    assert np.abs(field[core] - inside).max() < 0.03


def test_forward_model_is_linear_and_padding_matters():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12, 12)).astype(np.float32)
    b = rng.normal(size=(12, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(
        forward_field_ppm(a + 2 * b), forward_field_ppm(a) + 2 * forward_field_ppm(b), atol=1e-4
    )
    assert not np.allclose(forward_field_ppm(a, pad_factor=1), forward_field_ppm(a), atol=1e-3)


def test_unit_round_trips_and_known_values():
    # 1 ppm at 3 T is 127.73 Hz
    assert ppm_to_hz(1.0, 3.0) == pytest.approx(127.73243676)
    assert hz_to_ppm(ppm_to_hz(0.37, 7.0), 7.0) == pytest.approx(0.37)
    # pi rad at 10 ms is 50 Hz
    assert rad_to_hz(np.pi, 0.010) == pytest.approx(50.0)
    assert rad_to_ppm(ppm_to_rad(0.05, 0.02, 3.0), 0.02, 3.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        rad_to_hz(1.0, 0.0)
    with pytest.raises(ValueError):
        hz_to_ppm(1.0, -3)


def _affine(rotation, voxel_size):
    a = np.eye(4)
    a[:3, :3] = rotation @ np.diag(voxel_size)
    return a


def _rot_x(deg):
    t = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


@pytest.mark.parametrize("tilt", [0.0, 20.0, 45.0])
@pytest.mark.parametrize("voxel_size", [(1, 1, 1), (0.75, 0.75, 2.0), (0.5, 1.0, 3.0)])
def test_b0_dir_from_affine(tilt, voxel_size):
    b = b0_dir_from_affine(_affine(_rot_x(tilt), voxel_size))
    t = np.radians(tilt)
    # world z expressed in axes rotated by +tilt about x
    np.testing.assert_allclose(b, (0.0, np.sin(t), np.cos(t)), atol=1e-12)


def test_b0_dir_identity_flip_and_override():
    assert b0_dir_from_affine(np.eye(4)) == pytest.approx((0, 0, 1))
    flipped = np.diag([-1.0, 1.0, -2.0, 1.0])  # LPS-like flips
    assert b0_dir_from_affine(flipped) == pytest.approx((0, 0, -1))
    assert b0_dir_from_affine(np.eye(4), b0_world=(0, 1, 0)) == pytest.approx((0, 1, 0))
    # sagittal slab: voxel k axis along world x
    sag = np.array([[0, 0, 1.2, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert b0_dir_from_affine(sag) == pytest.approx((0, 1, 0))


def test_a_given_b0_dir_is_normalised_and_none_reads_the_affine():
    from qsmprep.physics import b0_dir_given_or_from_affine

    sag = np.array([[0, 0, 1.2, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert b0_dir_given_or_from_affine((0, 3, 4), sag) == pytest.approx((0, 0.6, 0.8))
    assert b0_dir_given_or_from_affine(None, sag) == pytest.approx((0, 1, 0))


def _oblique_blobs(shape=(32, 30, 24), seed=0):
    """Smooth random chi (ppm) and an ellipsoidal mask on an even grid."""
    chi = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 1.5).astype(np.float32)
    i, j, k = np.indices(shape)
    mask = ((i - 16) / 14) ** 2 + ((j - 15) / 13) ** 2 + ((k - 12) / 10) ** 2 < 1
    return chi, mask


@pytest.mark.parametrize("method", ["forward", "tkd", "cfl2"])
def test_kspace_filters_commute_with_axis_flips(method):
    from qsmprep.inversion import cfl2, tkd

    # B0 oblique to every axis of an even grid: the case where the Nyquist planes
    # break the symmetry unless the kernel is averaged there (8 % apart before)
    chi, mask = _oblique_blobs()
    voxel_size, b0 = (1.0, 1.2, 2.0), np.array([0.2, 0.34, 0.92]) / np.linalg.norm([0.2, 0.34, 0.92])
    filters = {"forward": lambda a, m, b: forward_field_ppm(a, voxel_size, b),
               "tkd": lambda a, m, b: tkd(a, m, voxel_size, b),
               "cfl2": lambda a, m, b: cfl2(a, m, voxel_size, b)}  # fmt: skip
    flip = (slice(None, None, -1), slice(None), slice(None, None, -1))  # i and k reversed: LPS-like storage
    direct = filters[method](chi, mask, b0)
    flipped = filters[method](chi[flip], mask[flip], b0 * [-1, 1, -1])[flip]
    assert np.linalg.norm(flipped - direct) / np.linalg.norm(direct) < 1e-6


@pytest.mark.parametrize("method", ["ilsqr", "deep"])
def test_inversion_in_ras_order_does_not_depend_on_storage_order(method):
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    from qsmprep.config import library_function
    from qsmprep.physics import invert_in_ras_order, voxel_size_from_affine

    chi, mask = _oblique_blobs()
    ras_affine = _affine(_rot_x(20.0), (1.0, 1.2, 2.0))
    field = forward_field_ppm(chi, (1.0, 1.2, 2.0), b0_dir_from_affine(ras_affine)) * mask
    # the same data stored P-S-L (axes permuted, two of them reversed)
    to_psl = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("PSL"))
    stored = nib.Nifti1Image(field, ras_affine).as_reoriented(to_psl)
    stored_field, psl_affine = np.asarray(stored.dataobj), stored.affine
    stored_mask = np.asarray(nib.Nifti1Image(mask.astype(np.uint8), ras_affine).as_reoriented(to_psl).dataobj) > 0
    assert nib.aff2axcodes(psl_affine) == ("P", "S", "L") and stored_field.shape == (30, 24, 32)
    invert = library_function("inversion", method)
    calls = []

    def spy(f, m, voxel_size, b0, **params):
        calls.append((voxel_size, b0))
        return invert(f, m, voxel_size, b0, **params)

    in_ras = invert_in_ras_order(spy, field, mask, ras_affine, b0_dir_from_affine(ras_affine))
    in_psl = invert_in_ras_order(spy, stored_field, stored_mask, psl_affine, b0_dir_from_affine(psl_affine))
    def ras_order(volume):  # a P-S-L volume stored R-A-S
        return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(volume, psl_affine)).dataobj)

    assert in_psl.shape == stored_field.shape
    # the method saw the same voxel size and B0 direction (RAS order) both times, and gave the same map
    np.testing.assert_allclose(calls[1][0], (1.0, 1.2, 2.0))
    np.testing.assert_allclose(calls[1][1], calls[0][1], atol=1e-12)
    assert np.linalg.norm(ras_order(in_psl) - in_ras) / np.linalg.norm(in_ras) < 1e-5
    # while the method called on the stored order directly does depend on it
    direct = invert(stored_field, stored_mask, voxel_size_from_affine(psl_affine), b0_dir_from_affine(psl_affine))
    assert np.linalg.norm(ras_order(direct) - in_ras) / np.linalg.norm(in_ras) > 0.02


def test_inversion_in_ras_order_reorders_parameters_on_the_grid_with_the_field():
    from qsmprep.physics import invert_in_ras_order

    lps_affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    field = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    seen = {}

    def spy(f, m, voxel_size, b0, magnitude=None, tol=None):
        seen.update(field=f, magnitude=magnitude, tol=tol)
        return f

    out = invert_in_ras_order(spy, field, field > 0, lps_affine, (0.0, 0.0, 1.0), magnitude=2 * field, tol=0.01)
    np.testing.assert_array_equal(seen["field"], field[::-1, ::-1])  # L->R and P->A flipped
    np.testing.assert_array_equal(seen["magnitude"], 2 * seen["field"])
    assert seen["tol"] == 0.01
    np.testing.assert_array_equal(out, field)  # and back in the input's order


@pytest.mark.parametrize("bad", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0)])
def test_voxel_sizes_are_three_positive_lengths(bad):
    """One check for the masking balls, the unwrapper and the training data (three copies before; NaN passed)."""
    from qsmprep.masking import ball_mm
    from qsmprep.physics import checked_voxel_size_mm

    np.testing.assert_array_equal(checked_voxel_size_mm((0.75, 0.75, 2)), [0.75, 0.75, 2.0])
    with pytest.raises(ValueError, match="voxel size must be 3 positive values in mm"):
        checked_voxel_size_mm(bad)
    with pytest.raises(ValueError, match="voxel size must be 3 positive values in mm"):
        ball_mm(2.0, bad)
