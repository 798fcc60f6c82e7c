"""Background field removal: SMV kernel, V-SHARP, RESHARP, PDF against simulated fields."""

import re

import numpy as np
import pytest
from scipy import ndimage
from scipy import fft as spfft

from qsmprep import config
from qsmprep.bgremove import pdf, resharp, smv_kernel, vsharp
from qsmprep.bgremove.smv import check_high_pass_radius, largest_fitting_radius, smv_padded_shape, sphere_fits
from qsmprep.bgremove.vsharp import default_radii_mm
from qsmprep.masking import ball_mm
from qsmprep.physics import forward_field_ppm, kspace_grid

AIR_PPM = 9.4  # air relative to tissue


def _head(n, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0)):
    """Ellipsoidal 'brain', two air-like spheres outside it, three small sources inside.

    Returns mask, background field (ppm) and local field (ppm), both computed
    with the padded forward model.
    """
    centre = (n - 1) / 2
    x, y, z = np.meshgrid(*[(np.arange(n) - centre) * d for d in voxel_size_mm], indexing="ij")
    mask = (x / 22) ** 2 + (y / 18) ** 2 + (z / 20) ** 2 <= 1
    air = np.zeros(mask.shape, np.float32)
    air[x**2 + y**2 + (z - 26) ** 2 <= 5**2] = AIR_PPM
    air[(x - 27) ** 2 + (y + 5) ** 2 + z**2 <= 4**2] = AIR_PPM
    assert not np.any(mask & (air > 0))
    tissue = np.zeros(mask.shape, np.float32)
    tissue[(x - 6) ** 2 + (y - 4) ** 2 + z**2 <= 4**2] = 0.2
    tissue[(x + 8) ** 2 + (y + 2) ** 2 + (z - 5) ** 2 <= 3**2] = -0.1
    tissue[(x + 3) ** 2 + (y - 6) ** 2 + (z + 7) ** 2 <= 3**2] = 0.15
    background = forward_field_ppm(air, voxel_size_mm, b0_dir)
    local = forward_field_ppm(tissue, voxel_size_mm, b0_dir)
    return mask, background, local


def _demeaned(a, m):
    return a[m].astype(np.float64) - a[m].mean()


def _residual_fraction(result, background, m):
    """RMS of what is left of a pure background field, over its RMS, both demeaned in m."""
    return np.linalg.norm(_demeaned(result, m)) / np.linalg.norm(_demeaned(background, m))


def _correlation(a, b, m):
    return np.corrcoef(_demeaned(a, m), _demeaned(b, m))[0, 1]


# --- SMV kernel -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32, 32), (33, 30, 27)])
def test_smv_kernel_is_a_normalised_sphere(shape):
    kernel = smv_kernel(shape, (1.0, 1.0, 1.0), 3.0)
    assert kernel.dtype == np.float32
    assert kernel[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    sphere = spfft.ifftn(kernel).real
    assert sphere.sum() == pytest.approx(1.0, abs=1e-5)
    n_ball = int(ball_mm(3.0, (1, 1, 1)).sum())  # 123 voxels within 3 mm
    assert n_ball == 123
    assert np.count_nonzero(np.abs(sphere) > 0.5 / n_ball) == n_ball
    assert sphere[3, 0, 0] == pytest.approx(1 / n_ball, rel=1e-4)
    assert sphere[-3, 0, 0] == pytest.approx(1 / n_ball, rel=1e-4)  # wrapped around the origin
    assert abs(sphere[4, 0, 0]) < 1e-6 and abs(sphere[2, 2, 2]) < 1e-6  # |(2,2,2)| = 3.46 mm
    half_spectrum = smv_kernel(shape, (1, 1, 1), 3.0, rfft=True)
    np.testing.assert_allclose(half_spectrum, kernel[:, :, : shape[2] // 2 + 1], atol=1e-6)
    # built as a torch tensor on a device (the deep refinement's high-pass on a GPU), the same kernels
    torch = pytest.importorskip("torch")
    for rfft, expected in ((False, kernel), (True, half_spectrum)):
        on_device = smv_kernel(shape, (1, 1, 1), 3.0, rfft=rfft, device=torch.device("cpu"))
        assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float32
        np.testing.assert_allclose(on_device.numpy(), expected, atol=1e-6)


def test_smv_kernel_anisotropic_voxels_make_a_sphere_in_mm():
    shape, vox, radius = (48, 40, 36), (0.8, 1.0, 1.5), 5.0
    sphere = spfft.ifftn(smv_kernel(shape, vox, radius)).real > 1e-7
    assert sphere[6, 0, 0] and not sphere[7, 0, 0]  # 4.8 mm in, 5.6 mm out
    assert sphere[0, 5, 0] and not sphere[0, 6, 0]
    assert sphere[0, 0, 3] and not sphere[0, 0, 4]  # 4.5 mm in, 6 mm out
    # Its spectrum follows the continuous sphere's, 3 (sin x - x cos x) / x^3, x = 2 pi |k| r.
    kx, ky, kz = kspace_grid(shape, vox)
    k = np.sqrt(kx**2 + ky**2 + kz**2)
    x = np.maximum(2 * np.pi * k * radius, 1e-6)
    analytic = 3 * (np.sin(x) - x * np.cos(x)) / x**3
    analytic[0, 0, 0] = 1.0
    low = k < 0.1  # cycles/mm
    assert np.abs(smv_kernel(shape, vox, radius) - analytic)[low].max() < 0.04


def test_smv_kernel_refuses_a_sphere_larger_than_the_grid():
    with pytest.raises(ValueError, match="does not fit"):
        smv_kernel((16, 16, 16), (1, 1, 1), 9.0)


@pytest.mark.parametrize("voxel,smallest", [((1, 1, 1), 1.0), ((0.75, 0.75, 2), 0.75), ((2, 1.5, 3), 1.5),
                                            ((0.859375, 0.859375, 1.2), 0.859375)])
def test_a_radius_that_reaches_no_neighbour_is_refused_by_every_high_pass(voxel, smallest):
    """A sphere smaller than the smallest voxel dimension is its centre alone: its high-pass is zero, and V-SHARP and
    RESHARP returned a local field of zeros. The smallest voxel dimension is the smallest radius accepted, and it
    gives a field that is not zero."""
    mask, background, local = _head(24, voxel)
    field = background + local
    below = 0.99 * smallest
    for remove in (lambda r: vsharp(field, mask, voxel, radii_mm=[r]),
                   lambda r: resharp(field, mask, voxel, radius_mm=r, max_iter=5)):
        with pytest.raises(ValueError, match=f"a {below:.10g} mm sphere reaches no neighbouring voxel") as refused:
            remove(below)
        result, eroded = remove(smallest)
        assert eroded.any() and np.abs(result[eroded]).max() > 1e-4
    check_high_pass_radius(smallest, voxel)
    assert ball_mm(below, voxel).sum() == 1 and ball_mm(smallest, voxel).sum() > 1
    # the smallest radius the message names (rounded for reading) is accepted, not refused in turn
    named = float(re.search(r"give at least ([0-9.]+) mm", str(refused.value)).group(1))
    assert smallest <= named < smallest + 0.001
    check_high_pass_radius(named, voxel)


def test_sphere_fits_is_erosion_by_the_ball_in_mm():
    rng = np.random.default_rng(1)
    vox, radius = (1.0, 1.0, 2.0), 3.0
    mask = ndimage.gaussian_filter(rng.standard_normal((30, 28, 20)), 3) > -0.05
    mask[:2] = True  # touching the grid edge: padding must stop wrap-around
    shape = smv_padded_shape(mask.shape, vox, radius)
    kernel = smv_kernel(shape, vox, radius, rfft=True)
    fits = sphere_fits(spfft.rfftn(mask.astype(np.float32), s=shape), kernel, shape, vox, radius)
    expected = ndimage.binary_erosion(mask, ball_mm(radius, vox), border_value=0)
    np.testing.assert_array_equal(fits[:30, :28, :20], expected)
    assert 0 < expected.sum() < mask.sum()
    # from torch.fft's spectrum and a kernel on a torch device: the same voxels, as a tensor there
    torch = pytest.importorskip("torch")
    mask_t, cpu = torch.tensor(mask, dtype=torch.float32), torch.device("cpu")
    fits_t = sphere_fits(torch.fft.rfftn(mask_t, shape), smv_kernel(shape, vox, radius, rfft=True, device=cpu),
                         shape, vox, radius)
    assert isinstance(fits_t, torch.Tensor)
    np.testing.assert_array_equal(fits_t.numpy(), fits)


def test_padded_shape_holds_the_whole_sphere_on_a_small_grid():
    # 8 voxels + 8 of padding would be 16, under the 17-voxel width of an 8 mm ball at 1 mm
    shape = smv_padded_shape((8, 8, 8), (1.0, 1.0, 1.0), 8.0)
    assert all(n >= 17 for n in shape)
    assert smv_kernel(shape, (1.0, 1.0, 1.0), 8.0, rfft=True)[0, 0, 0] == pytest.approx(1.0)
    assert smv_padded_shape((64, 64, 64), (1.0, 1.0, 1.0), 8.0) == (72, 72, 72)  # large grids: as before


# --- V-SHARP ----------------------------------------------------------------


def test_default_radii_go_from_12_mm_to_twice_the_voxel_size():
    assert default_radii_mm((1, 1, 1)) == pytest.approx(tuple(range(12, 1, -1)))
    radii = default_radii_mm((0.5, 0.5, 2.0))
    assert radii == pytest.approx((12, 10, 8, 6, 4))
    assert default_radii_mm((7, 7, 7)) == (14.0,)


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (1.0, 1.0, 1.5)])
def test_vsharp_removes_background_and_keeps_local_field(vox):
    mask, background, local = _head(64, vox)
    result, eroded = vsharp(background, mask, vox)
    # Eroded by the smallest default radius, twice the largest voxel dimension.
    np.testing.assert_array_equal(eroded, ndimage.binary_erosion(mask, ball_mm(2 * max(vox), vox)))
    assert _residual_fraction(result, background, eroded) < 0.05  # measured 0.009 / 0.024
    assert np.all(result[~eroded] == 0)
    result, eroded = vsharp(background + local, mask, vox)
    assert _correlation(result, local, eroded) > 0.9  # measured 0.96 / 0.92


def test_vsharp_single_large_radius_recovers_local_field_closely():
    mask, _, local = _head(64, (1.0, 1.0, 1.0))
    result, eroded = vsharp(local, mask, radii_mm=[10.0])
    np.testing.assert_array_equal(eroded, ndimage.binary_erosion(mask, ball_mm(10.0, (1, 1, 1))))
    assert _correlation(result, local, eroded) > 0.99  # measured 0.9988
    slope = _demeaned(result, eroded) @ _demeaned(local, eroded) / np.sum(_demeaned(local, eroded) ** 2)
    assert slope == pytest.approx(1.0, abs=0.02)  # measured 1.007


def test_vsharp_is_linear_in_the_field_unit():
    mask, background, local = _head(48, (1.3, 1.3, 1.3))
    field = background + local
    ppm, _ = vsharp(field, mask, (1.3, 1.3, 1.3), radii_mm=[8, 4])
    hz, _ = vsharp(field * 127.7, mask, (1.3, 1.3, 1.3), radii_mm=[8, 4])
    np.testing.assert_allclose(hz, ppm * 127.7, rtol=1e-3, atol=1e-4 * np.abs(hz).max())


# --- RESHARP ----------------------------------------------------------------


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (1.0, 1.0, 1.5)])
def test_resharp_removes_background_and_keeps_local_field(vox):
    mask, background, local = _head(64, vox)
    result, eroded = resharp(background, mask, vox, radius_mm=4.0)
    np.testing.assert_array_equal(eroded, ndimage.binary_erosion(mask, ball_mm(4.0, vox)))
    assert _residual_fraction(result, background, eroded) < 0.05  # measured 0.005 / 0.018
    assert np.all(result[~eroded] == 0)
    result, eroded = resharp(background + local, mask, vox, radius_mm=4.0)
    assert _correlation(result, local, eroded) > 0.95  # measured 0.983 / 0.973


def test_resharp_regularisation_shrinks_the_solution():
    mask, background, local = _head(48, (1.3, 1.3, 1.3))
    weak, eroded = resharp(background + local, mask, (1.3, 1.3, 1.3), lam=1e-4)
    strong, _ = resharp(background + local, mask, (1.3, 1.3, 1.3), lam=1.0)
    assert np.linalg.norm(strong[eroded]) < 0.7 * np.linalg.norm(weak[eroded])


# --- PDF --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vox", "b0_dir"), [((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)), ((1.0, 1.0, 1.5), (0.0, np.sin(0.35), np.cos(0.35)))]
)
def test_pdf_removes_background_and_keeps_local_field(vox, b0_dir):
    mask, background, local = _head(64, vox, b0_dir)
    result, kept = pdf(background, mask, vox, b0_dir)
    np.testing.assert_array_equal(kept, mask)
    # measured 0.002 / 0.0035; the tilted case with an axial kernel leaves 0.03
    assert _residual_fraction(result, background, mask) < 0.015
    assert np.all(result[~mask] == 0)
    result, _ = pdf(background + local, mask, vox, b0_dir)
    assert _correlation(result, local, mask) > 0.9  # measured 0.959 / 0.958


def test_pdf_weights_exclude_corrupt_voxels():
    vox = (1.3, 1.3, 1.3)
    mask, background, _ = _head(48, vox)
    first = np.argwhere(mask)[np.argmin(np.argwhere(mask)[:, 0])]
    corrupt = np.zeros_like(mask)
    corrupt[first[0] : first[0] + 5, first[1] - 2 : first[1] + 3, first[2] - 2 : first[2] + 3] = True
    corrupt &= mask
    field = background + 2.0 * corrupt
    good = mask & ~corrupt
    unweighted, _ = pdf(field, mask, vox)
    weighted, _ = pdf(field, mask, vox, weights=(~corrupt).astype(np.float32))
    assert _residual_fraction(weighted, background, good) < 0.02  # measured 0.003
    assert _residual_fraction(unweighted, background, good) > 0.1  # measured 0.34


# --- package ----------------------------------------------------------------


@pytest.mark.parametrize("method", config.BGREMOVE_METHODS)
def test_each_method_refuses_a_mask_of_another_shape(method):
    with pytest.raises(ValueError, match="same shape"):
        config.library_function("bgremove", method)(np.zeros((20, 20, 20)), np.ones((20, 20, 19)))


@pytest.mark.parametrize(("thickness", "voxel", "radius", "expected"), [
    (40, 1.0, 8.0, 8.0),  # fits: kept
    (14, 1.0, 8.0, 6.0),  # a sphere of radius r spans 2r + 1 voxels: 6 mm is the largest in 14 slices
    (14, 1.0, 5.0, 5.0),
    (5, 1.0, 8.0, 2.0),   # down to two voxels, V-SHARP's smallest radius
    (4, 1.0, 8.0, 0.0),   # none fits: no high-pass
    (7, 2.0, 8.0, 6.0),   # 14 mm at 2 mm voxels: steps of one voxel, 8 -> 6 mm
])
def test_largest_fitting_radius_of_a_slab(thickness, voxel, radius, expected):
    """A slab-shaped mask ``thickness`` voxels thick: the largest radius, in steps of one voxel below the one wanted,
    whose sphere fits, the answer counted by hand (a ball of radius r holds 2r / voxel + 1 voxels along an axis)."""
    mask = np.zeros((40, 40, thickness + 8), bool)
    mask[4:36, 4:36, 4:4 + thickness] = True
    assert largest_fitting_radius(mask, (voxel,) * 3, radius) == expected

