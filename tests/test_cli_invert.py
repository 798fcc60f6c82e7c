"""qsmprep-invert: success paths equal the library; every user error exits cleanly."""

import nibabel as nib
import numpy as np
import pytest

from qsmprep.cli import invert
from qsmprep.cli.invert import main
from qsmprep.inversion import cfl2, ilsqr, tkd, tv
from qsmprep.physics import (
    MAX_PLAUSIBLE_LOCAL_FIELD_PPM,
    TYPICAL_LOCAL_FIELD_PPM,
    b0_dir_from_affine,
    forward_field_ppm,
    ppm_to_hz,
    ppm_to_rad,
    voxel_size_from_affine,
)

SHAPE = (24, 22, 20)
VOXEL = (1.0, 1.2, 1.5)
B0_TESLA, TE_S = 3.0, 0.02


def _tilted_affine():
    """Voxel axes rotated 20 degrees about world x, anisotropic voxels, some translation."""
    t = np.radians(20)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array(VOXEL)
    affine[:3, 3] = (-12, -13, -15)
    return affine


@pytest.fixture
def inputs(tmp_path):
    affine = _tilted_affine()
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    mask = (x**2 + y**2 + z**2 < 0.6).astype(np.float32)
    chi = (0.1 * np.exp(-((x - 0.2) ** 2 + y**2 + z**2) / 0.05) * mask).astype(np.float32)
    field = forward_field_ppm(chi, VOXEL, b0_dir_from_affine(affine))
    paths = {"field": tmp_path / "field.nii.gz", "mask": tmp_path / "mask.nii.gz"}
    paths["out"] = tmp_path / "out" / "chi.nii.gz"
    nib.save(nib.Nifti1Image(field, affine), paths["field"])
    nib.save(nib.Nifti1Image(mask, affine), paths["mask"])
    return paths, field, mask > 0, affine


def _run(paths, *options):
    return main([str(paths["field"]), str(paths["mask"]), str(paths["out"]), *options])


@pytest.mark.parametrize(
    "options,library",
    [
        (["--method", "tkd"], lambda f, m, v, b: tkd(f, m, v, b)),
        (["--method", "tkd", "--threshold", "0.1"], lambda f, m, v, b: tkd(f, m, v, b, threshold=0.1)),
        (["--method", "cfl2", "--lambda", "0.03"], lambda f, m, v, b: cfl2(f, m, v, b, lam=0.03)),
        (["--method", "ilsqr"], lambda f, m, v, b: ilsqr(f, m, v, b)),
        (["--method", "tv", "--alpha", "0.004"], lambda f, m, v, b: tv(f, m, v, b, alpha=0.004)),
        # the pipeline's TV compares high-passed fields: the same map from the CLI needs the same radius
        (["--method", "tv", "--harmonic-radius", "3"], lambda f, m, v, b: tv(f, m, v, b, harmonic_radius_mm=3)),
    ],
)
def test_output_equals_the_library_call(inputs, options, library):
    paths, field, mask, affine = inputs
    assert _run(paths, *options) == 0
    img = nib.load(paths["out"])
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert img.get_data_dtype() == np.float32
    # the geometry as stored (the NIfTI affine is float32) and read back by the CLI
    stored = nib.load(paths["field"]).affine
    expected = library(field, mask, voxel_size_from_affine(stored), b0_dir_from_affine(stored))
    np.testing.assert_allclose(img.get_fdata(), expected, rtol=1e-5, atol=1e-7)
    # the high-pass leaves a small part of this small phantom's field (its mask eroded by the radius)
    assert np.abs(expected).max() > (0.001 if "--harmonic-radius" in options else 0.01)
    if "--harmonic-radius" in options:  # not the plain TV map: the option reached the library
        plain = tv(field, mask, voxel_size_from_affine(stored), b0_dir_from_affine(stored))
        assert np.abs(expected - plain).max() > 0.01 * np.abs(plain).max()


def test_units_and_b0_direction_override(inputs):
    paths, field, mask, affine = inputs
    b0 = b0_dir_from_affine(affine)
    expected = tkd(field, mask, VOXEL, b0)
    for units, values, extra in [
        ("hz", ppm_to_hz(field, B0_TESLA), ["--b0-tesla", "3"]),
        ("rad", ppm_to_rad(field, TE_S, B0_TESLA), ["--b0-tesla", "3", "--te", "0.02"]),
        ("hz", ppm_to_hz(field, 7.0), ["--b0-tesla", "7"]),  # the field strength is read, not assumed
        ("rad", ppm_to_rad(field, 0.01, 7.0), ["--b0-tesla", "7", "--te", "0.01"]),
    ]:
        nib.save(nib.Nifti1Image(values.astype(np.float32), affine), paths["field"])
        assert _run(paths, "--method", "tkd", "--units", units, *extra) == 0
        np.testing.assert_allclose(nib.load(paths["out"]).get_fdata(), expected, rtol=1e-4, atol=1e-6)
    # an explicit --b0-dir replaces the affine's direction
    nib.save(nib.Nifti1Image(field, affine), paths["field"])
    assert _run(paths, "--method", "tkd", "--b0-dir", "0", "0", "1") == 0
    expected = tkd(field, mask, VOXEL, (0, 0, 1))
    np.testing.assert_allclose(nib.load(paths["out"]).get_fdata(), expected, rtol=1e-5, atol=1e-7)
    assert abs(b0[2]) < 0.95  # the affine's direction is really tilted


def test_a_field_stored_lps_gives_the_map_it_gives_stored_ras(inputs, tmp_path):
    """iLSQR's finite differences depend on the array order; the CLI inverts in RAS order and writes in the input's."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    paths, field, mask, affine = inputs
    assert _run(paths, "--method", "ilsqr") == 0
    ras_map = nib.load(paths["out"]).get_fdata()
    lps = {"field": tmp_path / "field_lps.nii.gz", "mask": tmp_path / "mask_lps.nii.gz", "out": tmp_path / "chi_lps.nii"}
    for name in ("field", "mask"):
        image = nib.load(paths[name])
        nib.save(image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt("LPS"))), lps[name])
    assert _run(lps, "--method", "ilsqr") == 0
    out = nib.load(lps["out"])
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")  # written in the input's order
    np.testing.assert_allclose(nib.as_closest_canonical(out).get_fdata(), ras_map, rtol=1e-4, atol=1e-6)
    # inverted in the stored order the two differ: the test would catch a CLI that skipped the reordering
    in_lps_order = ilsqr(np.asarray(nib.load(lps["field"]).dataobj), np.asarray(nib.load(lps["mask"]).dataobj) > 0,
                         voxel_size_from_affine(out.affine), b0_dir_from_affine(out.affine))
    assert np.abs(in_lps_order[::-1, ::-1] - ras_map).max() > 1e-3 * np.abs(ras_map).max()


def _expect_error(capsys, paths, code, names, *options):
    assert _run(paths, *options) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("qsmprep-invert: error: ")
    for name in names:
        assert name in err[-1]
    assert not paths["out"].exists()
    assert not paths["out"].parent.exists() or not any(paths["out"].parent.iterdir())
    return err


def test_a_field_in_hz_read_as_ppm_is_refused(inputs, capsys):
    """A total field map qsmprep wrote (Units Hz) inverted without --units made a map 128 times too strong, exit 0."""
    import json

    paths, field, mask, affine = inputs
    hz = ppm_to_hz(field, B0_TESLA)
    nib.save(nib.Nifti1Image(hz.astype(np.float32), affine), paths["field"])
    assert np.percentile(np.abs(field[mask]), 99) < MAX_PLAUSIBLE_LOCAL_FIELD_PPM < np.percentile(
        np.abs(hz[mask]), 99)  # the fixture's field is plausible in ppm, implausible in Hz read as ppm
    err = _expect_error(capsys, paths, 65, [str(paths["field"]), "--units hz --b0-tesla T"], "--method", "tkd")
    assert f"beyond {np.percentile(np.abs(hz[mask]), 99):.3g} ppm (read with --units ppm)" in err[-1]
    # the sidecar's units, where it states them, must agree with --units (checked before the data are read)
    sidecar = paths["field"].with_name("field.json")
    sidecar.write_text(json.dumps({"Units": "Hz"}))
    err = _expect_error(capsys, paths, 64, [str(sidecar), '"Units": "Hz"', "add --units hz --b0-tesla T"],
                        "--method", "tkd")
    assert _run(paths, "--method", "tkd", "--units", "hz", "--b0-tesla", "3") == 0
    np.testing.assert_allclose(nib.load(paths["out"]).get_fdata(), tkd(field, mask, VOXEL, b0_dir_from_affine(affine)),
                               rtol=1e-4, atol=1e-6)
    nib.save(nib.Nifti1Image(field, affine), paths["field"])
    sidecar.write_text(json.dumps({"Units": "ppm"}))
    paths["out"].unlink()
    _expect_error(capsys, paths, 64, ["remove --units"], "--method", "tkd", "--units", "hz", "--b0-tesla", "3")
    assert _run(paths, "--method", "tkd") == 0


def test_a_field_outside_the_usual_range_is_inverted_with_a_warning(inputs, caplog):
    """A phase in rad read as ppm (16 times too strong at 3 T and 20 ms) passed the 1 ppm refusal, and a field in ppm
    read as Hz (128 times too weak) passed everything: maps wrong in scale, exit 0, no word."""
    paths, field, mask, affine = inputs
    low, high = TYPICAL_LOCAL_FIELD_PPM
    typical = np.percentile(np.abs(field[mask]), 99)  # 0.0099 ppm: the fixture's field is a tissue field
    assert low < typical < high
    cases = ((field, [], None),
             (16 * field, [], None),  # 0.16 ppm: a strong tissue field, no word
             (64 * field, [], "--units rad --b0-tesla T --te S"),  # 0.64 ppm: a phase in rad read as ppm
             (field, ["--units", "hz", "--b0-tesla", "3"], "far too weak"))  # 0.00008 ppm: ppm read as Hz
    for data, units, words in cases:
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), paths["field"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="qsmprep.cli.invert"):
            assert _run(paths, "--method", "tkd", *units) == 0
        warned = [r.getMessage() for r in caplog.records if r.name == "qsmprep.cli.invert"]
        if words is None:
            assert not warned, warned
        else:
            assert len(warned) == 1 and str(paths["field"]) in warned[0] and words in warned[0], warned


def test_a_qsmprep_total_field_is_refused_with_the_local_field_named(inputs, capsys):
    """The unit check's advice (--units hz) on qsmprep's total field at 3 mm voxels passed the 1 ppm check and gave
    a map ten times too strong, exit 0."""
    paths, field, mask, affine = inputs
    total = paths["field"].with_name("sub-01_desc-total_fieldmap.nii.gz")
    nib.save(nib.Nifti1Image(ppm_to_hz(field, B0_TESLA).astype(np.float32), affine), total)
    paths["field"] = total
    local = total.with_name("sub-01_desc-local_fieldmap.nii.gz")
    for units in (["--units", "hz", "--b0-tesla", "3"], []):
        _expect_error(capsys, paths, 64, [str(total), "qsmprep's total field", f"invert the local field beside it, {local}"],
                      "--method", "tkd", *units)
    nib.save(nib.Nifti1Image(field, affine), local)
    paths["field"] = local
    assert _run(paths, "--method", "tkd") == 0


def test_missing_and_unreadable_inputs_exit_66(inputs, capsys):
    paths, *_ = inputs
    paths["mask"].unlink()
    _expect_error(capsys, paths, 66, [str(paths["mask"])], "--method", "tkd")
    paths["mask"].write_bytes(b"not a nifti file")
    err = _expect_error(capsys, paths, 66, [str(paths["mask"])], "--method", "tkd")
    assert len(err) == 1


def test_degenerate_affine_exits_65_naming_the_file(inputs, capsys):
    paths, field, mask, affine = inputs
    flat = affine.copy()
    flat[:3, 2] = flat[:3, 1]  # the k axis repeats the j axis
    for name, data in (("field", field), ("mask", mask.astype(np.float32))):
        nib.save(nib.Nifti1Image(data, flat), paths[name])
    _expect_error(capsys, paths, 65, [str(paths["field"]), "degenerate affine"], "--method", "tkd")


def test_grid_mismatch_nan_and_empty_mask_exit_65(inputs, capsys):
    paths, field, mask, affine = inputs
    nib.save(nib.Nifti1Image(mask[:-1].astype(np.float32), affine), paths["mask"])
    _expect_error(capsys, paths, 65, [str(paths["mask"]), str(paths["field"])], "--method", "tkd")
    shifted = affine.copy()
    shifted[0, 3] += 2
    nib.save(nib.Nifti1Image(mask.astype(np.float32), shifted), paths["mask"])
    _expect_error(capsys, paths, 65, [str(paths["mask"])], "--method", "cfl2")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine), paths["mask"])
    _expect_error(capsys, paths, 65, [str(paths["mask"]), "empty"], "--method", "ilsqr")
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), paths["mask"])
    bad = field.copy()
    bad[np.nonzero(mask)[0][0], np.nonzero(mask)[1][0], np.nonzero(mask)[2][0]] = np.nan
    nib.save(nib.Nifti1Image(bad, affine), paths["field"])
    _expect_error(capsys, paths, 65, [str(paths["field"]), "NaN"], "--method", "tkd")
    # NaN outside the mask is fine
    outside = field.copy()
    outside[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(outside, affine), paths["field"])
    assert _run(paths, "--method", "tkd") == 0 and np.isfinite(nib.load(paths["out"]).get_fdata()).all()
    paths["out"].unlink()
    # FIELD and MASK swapped: a mask that is not whole numbers is refused, not inverted everywhere
    nib.save(nib.Nifti1Image(field, affine), paths["mask"])
    _expect_error(capsys, paths, 65, [str(paths["mask"]), "not whole numbers", "perhaps a field or susceptibility map"], "--method", "tkd")
    # a complex field is refused, not cast to its real part
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), paths["mask"])
    nib.save(nib.Nifti1Image((field * (1 + 1j)).astype(np.complex64), affine), paths["field"])
    _expect_error(capsys, paths, 65, [str(paths["field"]), "holds complex values"], "--method", "tkd")


@pytest.mark.parametrize(
    "options,words",
    [
        (["--method", "tkd", "--units", "hz"], ["--b0-tesla"]),
        (["--method", "tkd", "--units", "rad", "--b0-tesla", "3"], ["--te"]),
        (["--method", "tkd", "--b0-tesla", "3", "--te", "0.02"], ["--b0-tesla applies to --units hz or rad"]),
        (["--method", "tkd", "--units", "hz", "--b0-tesla", "3", "--te", "0.02"], ["--te applies to --units rad"]),
        (["--method", "tkd", "--units", "hz", "--b0-tesla", "-3"], ["--b0-tesla", "positive"]),
        (["--method", "tkd", "--units", "rad", "--b0-tesla", "3", "--te", "10"], ["--te", "milliseconds"]),
        (["--method", "tkd", "--units", "rad", "--b0-tesla", "3", "--te", "0"], ["--te", "seconds"]),
        (["--method", "cfl2", "--threshold", "0.2"], ["--threshold", "tkd"]),
        (["--method", "tkd", "--lambda", "0.2"], ["--lambda", "cfl2"]),
        (["--method", "tkd", "--threshold", "0.5"], ["--threshold"]),
        (["--method", "cfl2", "--lambda", "-1"], ["--lambda"]),
        (["--method", "cfl2", "--alpha", "0.002"], ["--alpha", "tv"]),
        (["--method", "tv", "--alpha", "0"], ["--alpha"]),
        (["--method", "tkd", "--harmonic-radius", "8"], ["--harmonic-radius applies to --method tv"]),
        (["--method", "tv", "--harmonic-radius", "-1"], ["--harmonic-radius must be a number >= 0"]),
        (["--method", "tv", "--harmonic-radius", "0.9"], ["--harmonic-radius", "a 0.9 mm sphere reaches no "
                                                          "neighbouring voxel"]),
        (["--method", "tkd", "--b0-dir", "0", "0", "0"], ["--b0-dir must be a non-zero vector"]),
        (["--method", "tkd", "--b0-dir", "1e200", "0", "0"], ["--b0-dir must be a non-zero vector"]),  # its norm: inf
        (["--method", "tkd", "--model", "x"], ["--model", "deep"]),
        (["--method", "ilsqr", "--refine", "3"], ["--refine", "deep"]),
        (["--method", "deep", "--refine", "-1"], ["--refine"]),
        (["--method", "cfl2", "--refine-lambda", "0.1"], ["--refine-lambda", "deep"]),
        (["--method", "deep", "--refine-lambda", "0"], ["--refine-lambda", "> 0"]),
        (["--method", "tkd", "--refine-radius", "8"], ["--refine-radius", "deep"]),
        (["--method", "deep", "--refine-radius", "-1"], ["--refine-radius"]),
        (["--method", "deep", "--refine-radius", "0.9"], ["--refine-radius", "a 0.9 mm sphere reaches no neighbouring "
                                                          "voxel at 1 x 1.2 x 1.5 mm voxels", "give at least 1 mm"]),
        (["--method", "ilsqr", "--refine-tv", "3e-4"], ["--refine-tv", "deep"]),
        (["--method", "deep", "--refine-tv", "-1"], ["--refine-tv", "ppm mm"]),
        (["--method", "tkd", "--tile", "128"], ["--tile", "deep"]),
        (["--method", "deep", "--tile", "32"], ["--tile", "64"]),
    ],
)
def test_usage_errors_exit_64(inputs, capsys, options, words):
    paths, *_ = inputs
    _expect_error(capsys, paths, 64, words, *options)


def test_argparse_errors_exit_64(inputs, capsys):
    paths, *_ = inputs
    _expect_error(capsys, paths, 64, ["--method"])  # required option missing
    _expect_error(capsys, paths, 64, ["invalid choice"], "--method", "nope")
    paths["out"] = paths["out"].with_name("chi.img")
    _expect_error(capsys, paths, 64, ["chi.img"], "--method", "tkd")


def test_unwritable_output_exits_73_before_inverting(inputs, capsys, monkeypatch):
    paths, *_ = inputs
    blocker = paths["out"].parent.parent / "blocker"
    blocker.write_text("a file where the output directory should be")
    paths["out"] = blocker / "chi.nii.gz"
    inverted = []
    monkeypatch.setattr(invert, "library_function", lambda step, method: lambda *a, **k: inverted.append(1))
    assert _run(paths, "--method", "tkd") == 73
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qsmprep-invert: error: output folder {blocker} cannot be created")
    assert f"{blocker} is a file" in err[0] and not inverted  # refused before any inversion
    assert blocker.read_text().startswith("a file")


def test_deep_method_runs_a_checkpoint_and_refuses_a_missing_one(inputs, capsys, tmp_path, monkeypatch):
    import torch

    from qsmprep.deep.models import build_model
    from qsmprep.deep.registry import save_checkpoint
    from qsmprep.inversion import deep, deep_invert

    paths, field, mask, affine = inputs
    torch.manual_seed(0)
    checkpoint = tmp_path / "net.safetensors"
    save_checkpoint(build_model("unet", width=4, depth=2, prior="cfl2"), checkpoint,
                    {"recipe": {"data": {"voxel_size_mm": [1.0, 1.2, 1.5]}}})
    tiles = []
    real = deep.predict_tiled
    monkeypatch.setattr(deep, "predict_tiled",
                        lambda predict, f, m, tile, *a, **kw: tiles.append(tile) or real(predict, f, m, tile, *a, **kw))
    assert _run(paths, "--method", "deep", "--model", str(checkpoint), "--device", "cpu", "--refine", "2",
                "--refine-lambda", "0.3", "--refine-radius", "3", "--refine-tv", "1e-3", "--tile", "96") == 0
    assert tiles == [(96, 96, 96)]
    stored = nib.load(paths["field"]).affine

    def library(**options):
        return deep_invert(field, mask, voxel_size_from_affine(stored), b0_dir_from_affine(stored),
                           model=checkpoint, device="cpu", refine_iters=2, **options)

    written = nib.load(paths["out"]).get_fdata()
    options = {"refine_lambda": 0.3, "refine_radius_mm": 3.0, "refine_tv_weight": 1e-3}
    np.testing.assert_allclose(written, library(**options), atol=1e-6)
    for left_out in options:  # each option reached the refinement
        assert np.abs(written - library(**{k: v for k, v in options.items() if k != left_out})).max() > 1e-4
    paths["out"].unlink()
    _expect_error(capsys, paths, 66, ["nothere.safetensors"], "--method", "deep", "--model", str(tmp_path / "nothere.safetensors"))


@pytest.mark.parametrize("name", ["chi.txt", ".nii.gz", ".nii"])
def test_output_that_is_not_a_nifti_file_name_exits_64(inputs, capsys, name):
    """An OUT named only ".nii.gz" ended in nibabel's traceback (its suffix read as ".gz")."""
    paths, *_ = inputs
    paths["out"] = paths["out"].parent / name
    _expect_error(capsys, paths, 64, [f"output {paths['out']} must be a file name ending in .nii or .nii.gz"],
                  "--method", "tkd")


@pytest.mark.parametrize("which", ["field", "mask"])
def test_output_that_is_an_input_exits_64_and_leaves_it_intact(inputs, capsys, which):
    paths, *_ = inputs
    before = paths[which].read_bytes()
    paths["out"] = paths[which].parent / ".." / paths[which].parent.name / paths[which].name  # same file, other spelling
    assert _run(paths, "--method", "tkd") == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qsmprep-invert: error: ")
    assert f"is the input {which.upper()}, which it would overwrite" in err[0]
    assert paths[which].read_bytes() == before


def test_deep_uses_every_core_even_when_omp_says_one(inputs):
    import torch

    from qsmprep.resources import available_cores

    paths, *_ = inputs
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 (set in the container) gives torch
    assert _run(paths, "--method", "deep", "--refine", "0") == 0
    assert torch.get_num_threads() == available_cores()
