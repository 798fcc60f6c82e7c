"""Nipype interfaces run on files: each output equals the library call on the same arrays.

The inputs are a small simulated head (``qsmprep.sim``), written to NIfTI and
read back, so interface and library see the same stored (float32) values and
the same stored affine.
"""

import nibabel as nib
import numpy as np
import pytest

from qsmprep.errors import DataError
from qsmprep.physics import hz_to_ppm, voxel_size_from_affine

TE_S = (0.004, 0.008, 0.012)
B0_TESLA = 3.0
TILTED_B0 = (0.0, float(np.sin(np.radians(20))), float(np.cos(np.radians(20))))


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return str(path)


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def gre(tmp_path_factory):
    """A 40 x 48 x 40 head at 4 mm, 3 echoes, SNR 100, written as 4D magnitude/phase and the true brain mask."""
    from qsmprep.sim.gre import simulate_gre
    from qsmprep.sim.phantom import head_phantom

    sim = simulate_gre(head_phantom((40, 48, 40), (4.0, 4.0, 4.0), seed=0), te_s=TE_S, snr=100, seed=0)
    folder = tmp_path_factory.mktemp("gre")
    files = {
        "magnitude": _save(folder / "magnitude.nii.gz", sim.magnitude, sim.affine),
        "phase_rad": _save(folder / "phase.nii.gz", sim.phase_rad, sim.affine),
        "mask": _save(folder / "mask.nii.gz", sim.brain_mask, sim.affine),
    }
    return files


def _stored(files, key):
    return _load(files[key])[0]


# ---------------------------------------------------------------- user mask


def test_user_mask_on_another_grid_is_a_data_error_naming_the_file(gre, tmp_path):
    from qsmprep.interfaces.field import UserMask

    magnitude, affine = _load(gre["magnitude"])
    shape = magnitude.shape[:3]
    wrong_shape = _save(tmp_path / "small_mask.nii.gz", np.ones((shape[0] - 1,) + shape[1:]), affine)
    with pytest.raises(DataError, match=r"small_mask\.nii\.gz has shape \(39, 48, 40\) but .* has \(40, 48, 40\)"):
        UserMask(in_file=wrong_shape, reference=gre["magnitude"]).run(cwd=str(tmp_path))
    shifted = affine.copy()
    shifted[:3, 3] += 2.0  # half a voxel off
    wrong_affine = _save(tmp_path / "shifted_mask.nii.gz", np.ones(shape), shifted)
    with pytest.raises(DataError, match=r"shifted_mask\.nii\.gz and .*magnitude\.nii\.gz have different affines"):
        UserMask(in_file=wrong_affine, reference=gre["magnitude"]).run(cwd=str(tmp_path))


def test_matching_user_mask_comes_back_binary_uint8(gre, tmp_path):
    from qsmprep.interfaces.field import UserMask

    magnitude, affine = _load(gre["magnitude"])
    labels = np.zeros(magnitude.shape[:3], np.float32)
    labels[5:20, 10:30, 8:25] = 1.0
    labels[22:30, 10:20, 8:12] = 3.0  # a label image: every value > 0 is brain
    res = UserMask(in_file=_save(tmp_path / "labels.nii.gz", labels, affine), reference=gre["magnitude"]).run(
        cwd=str(tmp_path))
    img = nib.load(res.outputs.out_file)
    out = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8 and out.dtype == np.uint8
    np.testing.assert_array_equal(out, (labels > 0).astype(np.uint8))
    assert set(np.unique(out)) == {0, 1} and int(out.sum()) == 15 * 20 * 17 + 8 * 10 * 4
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)


# ---------------------------------------------------------------- interface == library


def test_brain_mask_quality_strategy_equals_the_library(gre, tmp_path):
    from qsmprep.interfaces.field import BrainMask
    from qsmprep.masking import brain_mask
    from qsmprep.phase.quality import phase_quality_map, steep_phase_voxels

    magnitude, affine = _load(gre["magnitude"])
    phase = _stored(gre, "phase_rad")
    params = {"erode_mm": 4.0, "smooth_mm": 4.0}
    res = BrainMask(magnitude=gre["magnitude"], phase_rad=gre["phase_rad"], te_s=list(TE_S), strategy="quality",
                    parameters=params).run(cwd=str(tmp_path))
    out = np.asarray(nib.load(res.outputs.out_file).dataobj)
    vs = voxel_size_from_affine(affine)
    exclude = steep_phase_voxels(phase, list(TE_S))
    expected = brain_mask(magnitude, vs, quality=phase_quality_map(phase, magnitude, list(TE_S)), exclude=exclude,
                          **params)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    # the strategy and the parameters are honoured: magnitude-only or default-parameter masks differ
    assert expected.sum() > 1000
    assert (brain_mask(magnitude, vs, exclude=exclude, **params) != expected).sum() > 20
    assert (brain_mask(magnitude, vs, quality=phase_quality_map(phase, magnitude, list(TE_S)),
                       exclude=exclude) != expected).sum() > 20


@pytest.mark.parametrize("codes", [("A", "S", "R"), ("L", "P", "S")])
def test_brain_mask_does_not_depend_on_storage_order(gre, tmp_path, codes):
    """The same isotropic data stored sagittally (ASR) had its holes filled in sagittal slices, not axial ones: the
    mask, and the Chimaps within it, differed (245 voxels on a simulated subject at 3 mm)."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    from qsmprep.interfaces.field import BrainMask

    def mask(folder, transform=None):
        folder.mkdir()
        files = {}
        for name in ("magnitude", "phase_rad"):
            img = nib.load(gre[name])
            files[name] = str(folder / f"{name}.nii.gz")
            nib.save(img.as_reoriented(transform) if transform is not None else img, files[name])
        res = BrainMask(**files, te_s=list(TE_S), strategy="quality").run(cwd=str(folder))
        return nib.load(res.outputs.out_file)

    ras = mask(tmp_path / "ras")
    stored = mask(tmp_path / "stored", ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes)))
    assert nib.aff2axcodes(stored.affine) == codes
    back = np.asarray(nib.as_closest_canonical(stored).dataobj)
    assert np.asarray(ras.dataobj).sum() > 1000
    np.testing.assert_array_equal(back, np.asarray(ras.dataobj))


def test_total_field_quality_unwrap_equals_the_library(gre, tmp_path):
    from qsmprep.interfaces.field import TotalField
    from qsmprep.phase.combine import total_field_hz

    magnitude, affine = _load(gre["magnitude"])
    phase, mask = _stored(gre, "phase_rad"), _stored(gre, "mask") > 0
    res = TotalField(phase_rad=gre["phase_rad"], magnitude=gre["magnitude"], mask=gre["mask"], te_s=list(TE_S),
                     unwrap="quality").run(cwd=str(tmp_path))
    out = _load(res.outputs.out_file)[0]
    kwargs = {"magnitude": magnitude, "mask": mask, "voxel_size_mm": voxel_size_from_affine(affine)}
    expected = total_field_hz(phase, list(TE_S), unwrap="quality", **kwargs)
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert np.abs(expected[mask]).max() > 20  # Hz: a real field, not zeros
    # and the unwrapper was honoured: the default (laplacian) differs
    assert np.abs(total_field_hz(phase, list(TE_S), **kwargs) - expected)[mask].max() > 1e-3


@pytest.fixture(scope="module")
def total_field(gre, tmp_path_factory):
    """The total field (Hz) of the simulated head, as TotalField writes it."""
    from qsmprep.interfaces.field import TotalField

    cwd = tmp_path_factory.mktemp("total_field")
    res = TotalField(phase_rad=gre["phase_rad"], magnitude=gre["magnitude"], mask=gre["mask"], te_s=list(TE_S)).run(
        cwd=str(cwd))
    return res.outputs.out_file


@pytest.mark.parametrize(
    ("method", "params"),
    [("pdf", {"tol": 1e-4, "max_iter": 30}), ("resharp", {"radius_mm": 8.0, "lam": 1e-2, "max_iter": 50})],
)
def test_background_removal_equals_the_library(gre, total_field, tmp_path, method, params):
    from qsmprep.config import library_function
    from qsmprep.interfaces.field import BackgroundRemoval

    field_hz, affine = _load(total_field)
    mask = _stored(gre, "mask") > 0
    b0_tesla = 7.0  # not the data's 3 T: the interface must convert with the field strength it is given
    res = BackgroundRemoval(total_field=total_field, mask=gre["mask"], method=method, parameters=params,
                            b0_tesla=b0_tesla, b0_dir=list(TILTED_B0)).run(cwd=str(tmp_path))
    local, valid = _load(res.outputs.local_field)[0], _load(res.outputs.mask)[0]
    extra = {"b0_dir": TILTED_B0} if method == "pdf" else {}
    expected, expected_valid = library_function("bgremove", method)(hz_to_ppm(field_hz, b0_tesla), mask,
                                                        voxel_size_from_affine(affine), **params, **extra)
    np.testing.assert_allclose(local, expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(valid, expected_valid.astype(np.uint8))
    assert 0 < valid.sum() <= mask.sum() and np.abs(expected[expected_valid]).max() > 0.01  # ppm
    if method == "pdf":  # the B0 direction reached the fit: along k, at the same field strength, the field differs
        along_k = library_function("bgremove", method)(hz_to_ppm(field_hz, b0_tesla), mask, voxel_size_from_affine(affine),
                                           **params)[0]
        assert np.abs(along_k - expected)[mask].max() > 1e-3


def test_background_removal_refuses_an_empty_mask(total_field, tmp_path):
    from qsmprep.errors import DataError
    from qsmprep.interfaces.field import BackgroundRemoval

    _, affine = _load(total_field)
    empty = tmp_path / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(nib.load(total_field).shape, np.uint8), affine), empty)
    with pytest.raises(DataError, match="the brain mask is empty"):
        BackgroundRemoval(total_field=total_field, mask=str(empty), method="pdf", b0_tesla=B0_TESLA,
                          b0_dir=[0.0, 0.0, 1.0]).run(cwd=str(tmp_path))
    assert not list(tmp_path.glob("local_field*"))


@pytest.fixture
def untrained_checkpoint(tmp_path):
    """An untrained CFL2-prior U-Net declared as trained at 4 mm (the test grid), so no resampling to 1 mm."""
    import torch

    from qsmprep.deep.models import build_model
    from qsmprep.deep.registry import save_checkpoint

    torch.manual_seed(0)
    net = build_model("unet", width=4, depth=2, prior="cfl2", prior_lambda=0.1)
    path = tmp_path / "untrained.safetensors"
    save_checkpoint(net, path, {"recipe": {"data": {"voxel_size_mm": [4.0, 4.0, 4.0]}}})
    return path


def test_deep_inversion_equals_the_library(gre, one_torch_thread, untrained_checkpoint, tmp_path):
    from qsmprep.interfaces.inversion import DipoleInversion
    from qsmprep.inversion.deep import deep_invert
    from qsmprep.physics import forward_field_ppm

    _, affine = _load(gre["magnitude"])
    mask = _stored(gre, "mask") > 0
    vs = voxel_size_from_affine(affine)
    # a local field from a known source, B0 tilted so the aligned-frame path runs
    idx = np.indices(mask.shape)
    source = 0.1 * (((idx - np.array([20, 24, 20])[:, None, None, None]) ** 2).sum(0) < 16)
    field = (forward_field_ppm(source.astype(np.float32), vs, TILTED_B0) * mask).astype(np.float32)
    field_file = _save(tmp_path / "local.nii.gz", field, affine)
    params = {"model": str(untrained_checkpoint), "refine_iters": 3, "refine_lambda": 0.1}
    # the file input names the model the node runs, whatever the parameters' name (the pipeline sets both)
    res = DipoleInversion(local_field=field_file, mask=gre["mask"], method="deep",
                          parameters={**params, "model": "qsmprep-cfl2unet"}, model_file=str(untrained_checkpoint),
                          b0_dir=list(TILTED_B0), device="cpu").run(cwd=str(tmp_path))
    out = _load(res.outputs.out_file)[0]
    assert res.outputs.inference_device == {"Device": "cpu", "Name": "CPU", "NetworkPrecision": "float32"}
    assert res.outputs.fitted_parameters == {}  # no high-pass asked for
    expected = deep_invert(field, mask, vs, TILTED_B0, device="cpu", **params)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(expected).max() > 0.02 and not expected[~mask].any()
    # the parameters reached the library: without refinement the map differs
    unrefined = deep_invert(field, mask, vs, TILTED_B0, device="cpu", model=params["model"], refine_iters=0)
    assert np.abs(unrefined - expected).max() > 1e-3


@pytest.fixture
def fft_threads_used(monkeypatch):
    """Record how many threads each scipy.fft transform the library calls runs with."""
    from scipy import fft

    used = []
    for name in ("rfftn", "irfftn", "fftn", "dctn", "idctn"):
        def counted(*args, _transform=getattr(fft, name), **kwargs):
            used.append(kwargs.get("workers") or fft.get_workers())
            return _transform(*args, **kwargs)

        monkeypatch.setattr(fft, name, counted)
    return used


def test_fft_threads_follow_num_threads(gre, tmp_path, fft_threads_used):
    """--omp-nthreads reaches every FFT of unwrapping and background removal (the library once forced all cores)."""
    from qsmprep.interfaces.field import BackgroundRemoval, TotalField

    res = TotalField(phase_rad=gre["phase_rad"], magnitude=gre["magnitude"], mask=gre["mask"], te_s=list(TE_S),
                     num_threads=3).run(cwd=str(tmp_path))
    BackgroundRemoval(total_field=res.outputs.out_file, mask=gre["mask"], method="vsharp", b0_tesla=B0_TESLA,
                      b0_dir=[0.0, 0.0, 1.0], num_threads=3).run(cwd=str(tmp_path))
    assert len(fft_threads_used) > 4 and set(fft_threads_used) == {3}


def test_command_line_tools_give_the_library_every_usable_core(fft_threads_used):
    from scipy import fft

    from qsmprep.cli.common import ArgumentParser, run_cli
    from qsmprep.physics import forward_field_ppm
    from qsmprep.resources import available_cores

    def run(args):
        forward_field_ppm(np.ones((8, 8, 8), np.float32), (1, 1, 1), (0, 0, 1))

    with fft.set_workers(1):
        assert run_cli(ArgumentParser(prog="t"), run, []) == 0
        forward_field_ppm(np.ones((8, 8, 8), np.float32), (1, 1, 1), (0, 0, 1))
    assert fft_threads_used == [available_cores()] * 2 + [1] * 2


@pytest.mark.parametrize("command", [
    "from qsmprep.cli.eval import main; sys.exit(main(['a.nii', 'b.nii', 'm.nii', '--json', '-']))",
    # qsmprep prints its summary last; a stand-in run prints a long one
    "import qsmprep.cli.run as r; r.resolve_config = lambda args, argv: None; "
    "r.run = lambda config, bids_filter: print('run summary ' * 10000) or 0; sys.exit(r.main(['in', 'out', 'participant']))",
])
def test_a_closed_output_pipe_ends_the_command_quietly(tmp_path, command):
    """``qsmprep-eval ... | head -1``: the reader closes the pipe; no traceback, the SIGPIPE exit code."""
    import os
    import subprocess
    import sys

    from qsmprep.cli.common import BROKEN_PIPE_EXIT

    chi = np.linspace(-0.1, 0.1, 512, dtype=np.float32).reshape(8, 8, 8)  # a map, its reference and mask
    for name, data in (("a", chi), ("b", chi[::-1].copy()), ("m", np.ones_like(chi))):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii"))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone: every write fails with EPIPE
    result = subprocess.run([sys.executable, "-c", f"import sys; {command}"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    os.close(write_end)
    assert result.returncode == BROKEN_PIPE_EXIT, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert "internal error" not in result.stderr


def test_the_smallest_erosion_sphere_is_the_one_the_method_used():
    """Named when a mask erodes to nothing: V-SHARP's smallest radius (given, or its voxel-size default), RESHARP's."""
    from qsmprep.interfaces.field import smallest_sphere_mm

    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    assert smallest_sphere_mm("vsharp", {"radii_mm": [10, 6]}, affine) == 6
    assert smallest_sphere_mm("vsharp", {"radii_mm": None}, affine) == 4.0  # twice the largest voxel dimension
    assert smallest_sphere_mm("resharp", {}, affine) == 4.0 and smallest_sphere_mm("resharp", {"radius_mm": 7}, affine) == 7
