"""Brain masking: Otsu + morphology in mm, the mm ball, and user mask checks."""

import nibabel as nib
import numpy as np
import pytest

from conftest import require_shared
from qsmprep.errors import DataError
from qsmprep.masking import ball_mm, brain_mask, check_mask, dilation_mm, erosion_mm, largest_component


def test_ball_mm_is_a_sphere_in_mm():
    ball = ball_mm(2.0, (0.5, 0.5, 1.0))
    assert ball.shape == (9, 9, 5)
    assert ball[4, 4, 2] and ball[0, 4, 2] and ball[4, 4, 0]  # 2 mm along each axis
    assert not ball[0, 0, 2]  # corner at 2.83 mm
    np.testing.assert_array_equal(ball, ball[::-1, ::-1, ::-1])
    # volume close to 4/3 pi r^3 in mm^3
    assert abs(ball.sum() * 0.25 / (4 / 3 * np.pi * 8) - 1) < 0.1
    assert ball_mm(0.3, (1, 1, 1)).shape == (1, 1, 1)
    assert ball_mm(1.0).sum() == 7
    with pytest.raises(ValueError):
        ball_mm(-1)


def test_ball_mm_ignores_the_float32_noise_of_oblique_affines():
    """A 20-degree oblique 3 mm grid stored in a float32 sform reads back as 3.00000011 mm voxels (its qform as
    3.0): the 3 mm ball must hold the 6 neighbours either way, or the same data get different brain masks."""
    import nibabel as nib

    from qsmprep.physics import voxel_size_from_affine

    tilt = np.radians(20)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * 3.0
    header = nib.Nifti1Header()
    header.set_sform(affine, code="scanner")
    stored = voxel_size_from_affine(header.get_sform())
    assert stored != (3.0, 3.0, 3.0) and max(abs(v / 3 - 1) for v in stored) < 1e-6  # float32 noise
    assert ball_mm(3.0, stored).sum() == ball_mm(3.0, (3.0, 3.0, 3.0)).sum() == 7
    assert ball_mm(6.0, stored).sum() == ball_mm(6.0, (3.0, 3.0, 3.0)).sum() == 33


def _head(voxel_size_mm=(1.0, 1.0, 1.0), n=64, seed=1):
    """Ellipsoid 'head' of magnitude 1 with a dark hole, in Rician background noise."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * d for d in voxel_size_mm]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    head = (x / 26) ** 2 + (y / 22) ** 2 + (z / 20) ** 2 <= 1
    hole = (x / 6) ** 2 + (y / 5) ** 2 + (z / 5) ** 2 <= 1
    clean = np.where(head, 1.0, 0.0)
    clean[hole] = 0.05
    noisy = np.abs(clean + rng.normal(0, 0.1, clean.shape) + 1j * rng.normal(0, 0.1, clean.shape))
    return noisy.astype(np.float32), head, hole


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_brain_mask_of_noisy_ellipsoid_with_a_dark_hole():
    mag, head, hole = _head()
    mask = brain_mask(mag, erode_mm=0.0)
    assert mask.dtype == bool
    assert _dice(mask, head) > 0.95  # measured 0.9997
    assert mask[hole].all()  # the dark hole is filled
    # 4D input: RSS over echoes with T2* decay gives the same mask
    echoes = np.stack([mag * np.exp(-t / 0.03) for t in (0.005, 0.015, 0.025)], -1)
    assert _dice(brain_mask(echoes, erode_mm=0.0), head) > 0.95


def test_quality_map_excludes_low_quality_region():
    mag, head, _ = _head()
    quality = np.where(head, 0.9, 0.1)
    quality[:, :, 40:] = 0.1  # a slab with bad phase, though bright magnitude
    mask = brain_mask(mag, quality=quality, erode_mm=0.0)
    assert not mask[:, :, 41:].any()
    assert _dice(mask, head & (np.arange(64) < 40)[None, None, :]) > 0.95


def test_erosion_by_2mm_on_anisotropic_voxels_removes_2mm_per_side():
    vox = (0.5, 0.5, 2.0)
    mag, head, _ = _head(vox, n=96)
    full = brain_mask(mag, vox, erode_mm=0.0)
    eroded = brain_mask(mag, vox, erode_mm=2.0)
    centre = 48

    def extent(mask, axis):
        index = [centre, centre, centre]
        index[axis] = slice(None)
        return int(mask[tuple(index)].sum())

    # 2 mm on each side: 4 voxels of 0.5 mm along i and j, 1 voxel of 2 mm along k
    assert extent(full, 0) - extent(eroded, 0) == 8
    assert extent(full, 1) - extent(eroded, 1) == 8
    assert extent(full, 2) - extent(eroded, 2) == 2
    assert eroded.sum() < full.sum() and not (eroded & ~full).any()


@pytest.mark.parametrize(("radius", "voxel"), [(6.0, (0.7, 0.7, 0.7)), (3.0, (0.75, 0.75, 2.0)), (3.0, (3.0, 3.0, 3.0)),
                                               (1.0, (1.5, 1.5, 1.5)), (4.0, (0.5, 0.5, 0.5))])
def test_dilation_and_erosion_mm_are_scipys_by_ball_mm(radius, voxel):
    """Both paths (scipy's for small balls, the distance transform for large ones: 6 mm at 0.7 mm and 4 mm at 0.5 mm
    hold over 1000 voxels) give the voxels scipy's dilation and erosion by the same ball give, at the faces too."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    seeds = rng.random((40, 36, 30)) > 0.995
    seeds[0, 5, 5] = seeds[-1, -1, -1] = True  # seeds on the faces and a corner
    ball = ball_mm(radius, voxel)
    expected = ndimage.binary_dilation(seeds, ball)
    np.testing.assert_array_equal(dilation_mm(seeds, radius, voxel), expected)
    assert 0 < seeds.sum() <= expected.sum() < seeds.size  # equal where the ball is one voxel (1 mm at 1.5 mm)
    assert dilation_mm(np.ones((4, 4, 4), bool), radius, voxel).all()
    solid = ~seeds  # eroded from its holes and from the grid's faces, as binary_erosion's border counts as outside
    np.testing.assert_array_equal(erosion_mm(solid, radius, voxel), ndimage.binary_erosion(solid, ball))
    assert (ball.sum() >= 1000) == ((radius, voxel) in [(6.0, (0.7, 0.7, 0.7)), (4.0, (0.5, 0.5, 0.5))])


def test_a_threshold_above_the_brain_is_a_data_error_naming_it():
    magnitude = np.zeros((20, 20, 20))
    magnitude[5:15, 5:15, 5:15] = 100.0
    with pytest.raises(DataError, match=r"the brain mask is empty: the threshold 500 \(--parameters \[mask.quality\], "
                       r"or \[mask.magnitude\] with --mask magnitude\) is above"):
        brain_mask(magnitude, (2.0, 2.0, 2.0), threshold=500)
    with pytest.raises(DataError, match="check the magnitude images"):
        brain_mask(np.zeros((20, 20, 20)), (2.0, 2.0, 2.0))


def test_a_crop_inside_the_head_names_each_step_and_the_parameters_to_change():
    """A real crop that is all brain: the scalp separation, erosion and opening whittled it to nothing, and the
    message only said to check the magnitude images."""
    (mag_file,) = require_shared("romeo_small/Mag.nii.gz")
    img = nib.load(mag_file)
    voxel = img.header.get_zooms()[:3]  # 0.47 x 0.47 x 1 mm, 51 x 51 x 41
    with pytest.raises(DataError) as err:
        brain_mask(img.get_fdata(), voxel)
    assert str(err.value) == (
        "the brain mask is empty: of the field of view, the threshold kept 54 %, the scalp separation (separate_mm 4) "
        "3.4 %, the erosion (erode_mm 3) 0.24 %, the opening (smooth_mm 2) none: each step removes tissue thinner than "
        "twice its radius, and a field of view inside the head (a slab or a crop) has no scalp to separate; set "
        "separate_mm = 0 and lower erode_mm and smooth_mm in --parameters [mask.quality] ([mask.magnitude] with --mask "
        "magnitude), or give a brain mask with --mask.")
    # the advice gives a mask again, and each step it lowers keeps more: erode_mm 1 with the default 2 mm opening,
    # without the opening, and with neither (measured 11.4, 23.3 and 57.4 % of the field of view), each inside the next
    masks = [brain_mask(img.get_fdata(), voxel, separate_mm=0, erode_mm=erode, smooth_mm=smooth)
             for erode, smooth in ((1, 2), (1, 0), (0, 0))]
    assert [m.mean() for m in masks] == pytest.approx([0.114, 0.233, 0.574], abs=0.001)
    assert not (masks[0] & ~masks[1]).any() and not (masks[1] & ~masks[2]).any()


def test_largest_component_and_bridge_opening():
    cube = np.zeros((40, 40, 40), dtype=bool)
    cube[5:25, 5:25, 5:25] = True
    island = np.zeros_like(cube)
    island[29:37, 10:18, 10:18] = True
    assert largest_component(cube | island).sum() == 20**3
    mag = (cube | island).astype(np.float32) + 0.01
    mag[25:29, 14, 14] = 1.0  # a one-voxel-thin bridge from the cube to the island
    got = brain_mask(mag, erode_mm=0.0, separate_mm=0.0)
    # the opening cuts the bridge (a one-voxel stub may stay: the discrete ball's tip is one
    # voxel), the island is dropped; the cube's corners are rounded
    assert (got & ~cube).sum() <= 1
    assert not got[26:].any()
    assert got[7:23, 7:23, 7:23].all()
    assert got.sum() > 0.9 * 20**3


def test_brain_is_separated_from_scalp_before_hole_filling():
    # brain ball (r 45 mm), dark skull shell to 52 mm, bright 6 mm scalp shell, a 3 mm bridge
    # through the skull: hole filling first would fill the skull and keep the scalp
    shape, vox = (80, 80, 80), (1.5, 1.5, 1.5)
    x, y, z = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * d for n, d in zip(shape, vox)], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    brain = r <= 45
    scalp = (r > 52) & (r <= 58)
    bridge = (np.abs(y) <= 1.5) & (np.abs(z) <= 1.5) & (x > 0) & (r > 45) & (r <= 58)
    rng = np.random.default_rng(0)
    mag = np.where(brain | scalp | bridge, 1.0, 0.02) + rng.normal(0, 0.05, shape)
    got = brain_mask(np.abs(mag), vox, erode_mm=0.0)
    dice = 2 * (got & brain).sum() / (got.sum() + brain.sum())
    assert dice > 0.98
    assert not (got & scalp).any()
    assert (got & ~brain).sum() <= (got & bridge).sum() <= 30  # at most a stub of the bridge, 4 mm long
    # without separation the largest component is brain + bridge + scalp, and hole filling
    # then takes the skull as well
    merged = brain_mask(np.abs(mag), vox, erode_mm=0.0, separate_mm=0.0, smooth_mm=0.0)
    assert merged[r <= 58].mean() > 0.99


def test_check_mask_accepts_and_refuses():
    shape = (4, 5, 6)
    good = np.zeros(shape, dtype=np.uint8)
    good[1:3, 1:3, 1:3] = 1
    np.testing.assert_array_equal(check_mask(good, shape, "mask.nii.gz"), good > 0)
    np.testing.assert_array_equal(check_mask(good[..., None], shape, "mask.nii.gz"), good > 0)
    labels = good * 3  # whole numbers other than 1 (a label map): mask > 0
    np.testing.assert_array_equal(check_mask(labels, shape, "labels.nii.gz"), good > 0)
    np.testing.assert_array_equal(check_mask(labels.astype(np.float32)), good > 0)  # no grid to match: not checked
    with pytest.raises(DataError, match=r"prob.nii.gz has 8 voxels that are not whole numbers \(e.g. 0.7\): give a "
                                        r"binary mask \(threshold a probability map first\)"):
        check_mask(good * 0.7, shape, "prob.nii.gz")
    with pytest.raises(DataError, match="my_mask.nii.gz.*shape"):
        check_mask(good, (4, 5, 7), "my_mask.nii.gz")
    with pytest.raises(DataError, match="my_mask.nii.gz is empty"):
        check_mask(np.zeros(shape), shape, "my_mask.nii.gz")
    nan_mask = good.astype(float)
    nan_mask[0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"my_mask.nii.gz has 1 voxels that are not whole numbers \(e.g. nan\)"):
        check_mask(nan_mask, shape, "my_mask.nii.gz")
