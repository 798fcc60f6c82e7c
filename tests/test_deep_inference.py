"""Deep inversion engine: frames, tiling, refinement, and a checkpoint run end to end.

An untrained CFL2-prior U-Net returns exactly the CFL2 map (its correction
head starts at zero), which gives the engine a known answer to be tested on.
"""

import numpy as np
import pytest
import torch

from qsmprep.deep.models import build_model
from qsmprep.deep.registry import save_checkpoint
from qsmprep.inversion import cfl2
from qsmprep.inversion.deep import deep_invert, predict_tiled, refine_data_consistency
from qsmprep.metrics import nrmse
from qsmprep.physics import forward_field_ppm


def _phantom(shape=(48, 48, 40), voxel_size=(1.0, 1.0, 1.0), b0_dir=(0, 0, 1)):
    axes = [(np.arange(n) - n / 2) * d for n, d in zip(shape, voxel_size)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    mask = (x / 18) ** 2 + (y / 18) ** 2 + (z / 15) ** 2 < 1
    chi = 0.05 * ((x - 4) ** 2 + y**2 + z**2 < 30) - 0.04 * (x**2 + (y + 6) ** 2 + (z - 3) ** 2 < 16)
    chi = (chi * mask).astype(np.float32)
    return chi, forward_field_ppm(chi, voxel_size, b0_dir) * mask, mask


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("unet", width=4, depth=2, prior="cfl2", prior_lambda=0.1)
    path = tmp_path_factory.mktemp("model") / "untrained.safetensors"
    save_checkpoint(net, path, {"recipe": {"data": {"voxel_size_mm": [1.0, 1.0, 1.0]}}})
    return path


def test_axial_deep_inversion_equals_its_cfl2_prior(untrained_checkpoint):
    chi, field, mask = _phantom()
    out = deep_invert(field, mask, (1, 1, 1), (0, 0, 1), model=untrained_checkpoint, device="cpu", refine_iters=0)
    np.testing.assert_allclose(out, cfl2(field, mask, (1, 1, 1), lam=0.1), atol=1e-5)
    assert out.dtype == np.float32 and not out[~mask].any()


def test_oblique_field_is_inverted_in_a_b0_aligned_frame(untrained_checkpoint):
    tilt = np.radians(25)
    b0 = (0.0, np.sin(tilt), np.cos(tilt))
    chi, field, mask = _phantom(b0_dir=b0)
    out = deep_invert(field, mask, (1, 1, 1), b0, model=untrained_checkpoint, device="cpu", refine_iters=0)
    direct = cfl2(field, mask, (1, 1, 1), b0, lam=0.1)
    # the aligned-frame result matches CFL2 with the true tilt up to interpolation,
    # and is far better than ignoring the tilt
    assert nrmse(out, direct, mask) < 25
    assert nrmse(out, chi, mask) < nrmse(cfl2(field, mask, (1, 1, 1), (0, 0, 1)), chi, mask)


def test_anisotropic_voxels_are_resampled_to_the_training_resolution(untrained_checkpoint):
    chi, field, mask = _phantom(shape=(48, 48, 20), voxel_size=(1.0, 1.0, 2.0))
    out = deep_invert(field, mask, (1, 1, 2), (0, 0, 1), model=untrained_checkpoint, device="cpu", refine_iters=0)
    assert nrmse(out, cfl2(field, mask, (1, 1, 2)), mask) < 30


def test_tiles_cover_the_volume_without_seams():
    rng = np.random.default_rng(0)
    field = rng.normal(size=(70, 50, 45)).astype(np.float32)
    mask = np.ones_like(field)

    def local_mean(f, m):  # a 3x3x3 box filter: needs 1 voxel of context
        from scipy.ndimage import uniform_filter

        return uniform_filter(f, 3, mode="constant")

    whole = local_mean(field, mask)
    tiled = predict_tiled(local_mean, field, mask, tile_shape=(32, 32, 32), overlap=8)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_refinement_reduces_the_data_misfit():
    chi, field, mask = _phantom()
    start = 0.5 * chi  # an under-estimate, as networks often give
    refined = refine_data_consistency(start, field, mask, n_iter=10)
    misfit = [np.linalg.norm((forward_field_ppm(c, pad_factor=1.5) - field)[mask]) for c in (start, refined)]
    assert misfit[1] < 0.5 * misfit[0]
    assert nrmse(refined, chi, mask) < nrmse(start, chi, mask)
    np.testing.assert_array_equal(refine_data_consistency(start, field, mask, n_iter=0), start * mask)


def test_shipped_default_model_loads_and_inverts():
    from qsmprep.deep.registry import load_model
    from qsmprep.inversion.deep import DEFAULT_MODEL, default_model_path

    assert default_model_path().stat().st_size < 50e6
    net, meta = load_model(DEFAULT_MODEL)
    assert meta["arch"] == "unet" and meta["params"]["prior"] == "cfl2"
    chi, field, mask = _phantom()
    out = deep_invert(field, mask, (1, 1, 1), (0, 0, 1), device="cpu")
    assert np.corrcoef(out[mask], chi[mask])[0, 1] > 0.85
    np.testing.assert_array_equal(out, deep_invert(field, mask, (1, 1, 1), (0, 0, 1), device="cpu"))  # deterministic
