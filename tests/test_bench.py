"""The benchmark scripts' own arithmetic (bench/ is plain Python, loaded here by path)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch


def _bench_module(name):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy():
    return _bench_module("accuracy")


class _ScaledTruth(torch.nn.Module):
    """Stand-in network: answers ``scale`` x chi + ``offset`` of each sample, in the order given."""

    crop_margin = 0

    def __init__(self, samples, scale, offset):
        super().__init__()
        self.answers = iter([scale * s["chi"] + offset for s in samples])

    def forward(self, field, mask=None, voxel_size=None, domain=0):
        return next(self.answers)[None]


def test_held_out_scores_per_sample_against_known_answers():
    validation = _bench_module("validation")
    from qsmprep.deep.data import build_validation_set
    from qsmprep.deep.recipes import load_recipe

    samples = build_validation_set(load_recipe("smoke")["data"], 3, seed=5)
    # demeaned in the mask, 1.5 chi + 0.2 is 50 % off chi and 0 chi 100 %, whatever the sample
    nrmse, hfen = validation.per_sample_scores(_ScaledTruth(samples, 1.5, 0.2), samples)
    np.testing.assert_allclose(nrmse, 50.0, rtol=1e-4)
    np.testing.assert_allclose(hfen, 50.0, rtol=1e-4)
    nrmse, _ = validation.per_sample_scores(_ScaledTruth(samples, 0.0, 0.0), samples)
    np.testing.assert_allclose(nrmse, 100.0, rtol=1e-6)
    assert validation.standard_error(np.array([1.0, 3.0, 5.0])) == pytest.approx(2 / np.sqrt(3))


def test_error_split_at_a_frequency_keeps_only_the_slow_part(accuracy):
    n = 64
    x, y, _ = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    slow = 0.03 * np.cos(2 * np.pi * 4 * x / n)  # 4 / 64 mm = 0.0625 cycles/mm
    fast = 0.04 * np.cos(2 * np.pi * 24 * y / n)  # 0.375 cycles/mm
    truth, mask = np.zeros((n, n, n)), np.ones((n, n, n), bool)
    below = accuracy.rmse_below_ppm(slow + fast, truth, mask, 1.0, 0.2)
    assert below == pytest.approx(0.03 / np.sqrt(2), rel=1e-5)
    # a cutoff above every frequency gives the whole RMSE (Parseval)
    assert accuracy.rmse_below_ppm(slow + fast, truth, mask, 1.0, 1.0) == pytest.approx(0.05 / np.sqrt(2), rel=1e-5)


def test_seam_score_finds_a_step_between_planes(accuracy):
    """A smooth difference map scores about 1; the same map with a step across one plane scores the step over
    the median plane's mean step."""
    n = 40
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float)] * 3, indexing="ij")
    smooth = 0.001 * (x + 2 * y + 3 * z)  # plane steps 0.001, 0.002, 0.003 along the three axes
    mask = np.ones((n, n, n), bool)
    assert accuracy.seam_score(smooth, mask) == pytest.approx(1.0)
    stepped = smooth + 0.05 * (y >= 20)  # a tile face at j = 20
    assert accuracy.seam_score(stepped, mask) == pytest.approx(0.052 / 0.002)


def test_coarse_maps_are_enlarged_by_repeating_voxels(accuracy):
    coarse = np.arange(8, dtype=float).reshape(2, 2, 2)
    fine = accuracy.enlarged(coarse, 4)
    assert fine.shape == (4, 4, 4)
    np.testing.assert_array_equal(fine[::2, ::2, ::2], coarse)
    np.testing.assert_array_equal(fine[1::2, 1::2, 1::2], coarse)


def test_detail_kept_per_kernel_band(accuracy):
    n = 64
    x, _, z = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    along_x = np.cos(2 * np.pi * 24 * x / n)  # k along x: D = 1/3, outside the weak band
    near_cone = np.cos(2 * np.pi * (17 * x + 12 * z) / n)  # 12^2 / (17^2 + 12^2) = 0.33: |D| < 0.001
    slow = np.cos(2 * np.pi * 2 * z / n)  # under the cutoff: not counted
    truth, mask = 0.01 * (along_x + near_cone), np.ones((n, n, n), bool)
    assert accuracy.detail_kept(truth, truth, mask, 1.0, 0.15) == pytest.approx((1.0, 1.0))
    recon = 0.01 * (along_x + 0.25 * near_cone + slow)
    assert accuracy.detail_kept(recon, truth, mask, 1.0, 0.15) == pytest.approx((0.25, 1.0), abs=1e-6)
    assert accuracy.detail_kept(0.01 * slow, truth, mask, 1.0, 0.15) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_phantom_scaling_averages_or_samples_a_thin_slab(accuracy):
    chi = np.zeros((64, 64, 64), np.float32)
    chi[29:31] = 1.0  # a 2 mm slab of 1 ppm; the 4 mm grid's 8th voxel centre lies in it
    mask = np.ones(chi.shape, bool)
    averaged, mask_n, voxel = accuracy.scaled_phantom(chi, mask, np.eye(4), 16)
    sampled, _, _ = accuracy.scaled_phantom(chi, mask, np.eye(4), 16, antialias=False)
    assert voxel == (4.0, 4.0, 4.0) and mask_n.all()
    # plain: the slab keeps its 1 ppm on the one voxel that samples it
    np.testing.assert_allclose(sampled[:, 5, 5], np.eye(16)[7], atol=1e-6)
    # anti-aliased: spread over the neighbours at under half the contrast, its moment kept within 5 %
    assert averaged[:, 5, 5].max() < 0.5
    assert averaged.sum() * 64 == pytest.approx(chi.sum(), rel=0.05)


def test_speed_profile_names_where_the_first_call_went():
    """``bench/speed.py --profile N`` prints the first call's costliest functions above the table."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "speed.py"
    out = subprocess.run([sys.executable, str(script), "--methods", "tkd", "--sizes", "32", "--profile", "3"],
                         capture_output=True, text=True, check=True).stdout
    profile, table = out.split("load average at the end")
    assert "tkd at 32^3, first call:" in profile and "restriction <3>" in profile
    assert "inversion/tkd.py" in profile  # the inversion itself heads the cumulative list
    assert "| tkd | 32^3 | cpu |" in table


def test_speed_times_the_refinement_with_the_pipelines_high_pass():
    """``--refine-radius R`` times the deep inversion as the pipeline's node runs it (SMV set-up included)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "speed.py"
    out = subprocess.run([sys.executable, str(script), "--methods", "deep", "--sizes", "32", "--devices", "cpu",
                          "--refine", "2", "--refine-radius", "4", "--profile", "1000"],
                         capture_output=True, text=True, check=True).stdout
    profile, table = out.split("load average at the end")
    assert "bgremove/smv.py" in profile and "(smv_kernel)" in profile  # the high-pass was built in the timed call
    assert "| deep qsmprep-cfl2unet + refine 2 radius 4 | 32^3 | cpu |" in table


def test_storage_part_rewrites_a_dataset_in_another_order_losslessly(accuracy, tmp_path):
    import nibabel as nib

    image = tmp_path / "sub-01" / "anat" / "sub-01_echo-1_part-phase_MEGRE.nii.gz"
    image.parent.mkdir(parents=True)
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0])), image)
    accuracy.stored_as(tmp_path, "PSL")
    stored = nib.load(image)
    assert nib.aff2axcodes(stored.affine) == ("P", "S", "L") and stored.shape == (3, 4, 2)
    np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(stored).dataobj), data)
    np.testing.assert_allclose(nib.as_closest_canonical(stored).affine, np.diag([1.0, 2.0, 3.0, 1.0]))
