"""qsmprep-eval: table and JSON output, errors and exit codes."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from qsmprep.cli.eval import main
from qsmprep.io import save_nifti
from qsmprep.metrics import evaluate

AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


@pytest.fixture(scope="module")
def maps():
    """Reference, reconstruction (0.8 ref + noise), mask, labels with a calcification."""
    shape = (28, 28, 24)
    rng = np.random.default_rng(0)
    ref = 0.05 * gaussian_filter(rng.standard_normal(shape), 2.0) / 0.05
    labels = np.zeros(shape, np.uint8)
    labels[4:9, 4:9, 4:9] = 4
    labels[4:9, 18:23, 4:9] = 5
    labels[18:23, 4:9, 14:19] = 6
    ref[labels == 4] += 0.05
    ref[labels == 5] += 0.1
    ref[labels == 6] += 0.2
    offsets = np.indices(shape) - np.array([14, 14, 12])[:, None, None, None]
    calc = (offsets**2).sum(axis=0) <= 4
    ref[calc] = -1.5
    labels[calc] = 11
    recon = 0.8 * ref + 0.01 * rng.standard_normal(shape)
    mask = np.zeros(shape, np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    return recon.astype(np.float32), ref.astype(np.float32), mask, labels


@pytest.fixture()
def files(tmp_path, maps):
    recon, ref, mask, labels = maps
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("chi", "ref", "mask", "labels")}
    for name, data in zip(("chi", "ref", "mask", "labels"), maps):
        save_nifti(paths[name], data, AFFINE, dtype=np.float32 if name in ("chi", "ref") else np.uint8)
    tsv = tmp_path / "dseg.tsv"
    tsv.write_text("index\tname\n4\tcaudate\n5\tputamen\n6\tglobus_pallidus\n11\tcalcification\n")
    paths["tsv"] = tsv
    return paths


def _args(files, *extra):
    return [str(files["chi"]), str(files["ref"]), str(files["mask"]), *map(str, extra)]


def _expected(maps, **kwargs):
    recon, ref, mask, labels = maps
    names = {4: "caudate", 5: "putamen", 6: "globus_pallidus", 11: "calcification"}
    return evaluate(recon, ref, mask, labels=labels, label_names=names, **kwargs)


def test_table_has_the_numbers(files, maps, capsys):
    assert main(_args(files, "--labels", files["labels"], "--label-names", files["tsv"], "--calc-label", 11)) == 0
    out = capsys.readouterr().out
    expected = _expected(maps, calc_label=11)
    # the reconstruction is 0.8 ref + noise: NRMSE about 20 %, slope about 0.8
    assert 19 < expected["nrmse_pct"] < 25 and abs(expected["deep_gm_slope"] - 0.8) < 0.01
    for name, key in [
        ("NRMSE (demeaned)", "nrmse_pct"),
        ("NRMSE (detrended)", "nrmse_detrended_pct"),
        ("HFEN", "hfen_pct"),
        ("XSIM", "xsim"),
        ("Deep GM slope", "deep_gm_slope"),
        ("Calcification moment error", "calcification_moment_error"),
        ("Calcification streaking", "calcification_streak"),
    ]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert float(line.split()[len(name.split())]) == pytest.approx(expected[key], abs=1e-4)
    # the labels the slope was fitted over, found by name (the calcification is none of them)
    assert "\nDeep GM slope labels: caudate, putamen, globus_pallidus\n" in out
    # per-label rows: name, voxel count, means
    putamen = next(line for line in out.splitlines() if line.startswith("putamen"))
    _, voxels, chi_mean, ref_mean = putamen.split()
    assert int(voxels) == 125
    assert float(chi_mean) == pytest.approx(maps[0][maps[3] == 5].mean(), abs=1e-4)
    assert float(ref_mean) == pytest.approx(maps[1][maps[3] == 5].mean(), abs=1e-4)
    # the value column is aligned
    starts = {m.start() for m in (re.search(r"-?\d+\.\d{4}", line) for line in out.splitlines()[:7]) if m}
    assert len(starts) <= 2


def test_label_names_with_a_byte_order_mark_or_not_utf8(files, tmp_path, capsys):
    """Excel's byte-order mark hid the 'index' column; Latin-1 text raised a traceback."""
    argv = _args(files, "--labels", files["labels"], "--label-names", files["tsv"], "--calc-label", 11)
    assert main(argv) == 0
    plain = capsys.readouterr().out
    files["tsv"].write_bytes(b"\xef\xbb\xbf" + files["tsv"].read_bytes())
    assert main(argv) == 0
    assert capsys.readouterr().out == plain
    files["tsv"].write_bytes("index\tname\n4\tnoyau caudé\n".encode("latin-1"))
    assert main(argv) == 65
    assert f"label names {files['tsv']} is not UTF-8 text (byte 0xe9 at offset 23)" in capsys.readouterr().err


def test_json_equals_evaluate(files, maps, tmp_path, capsys):
    out_json = tmp_path / "out" / "metrics.json"
    argv = _args(files, "--labels", files["labels"], "--label-names", files["tsv"], "--calc-label", 11)
    assert main([*argv, "--json", str(out_json)]) == 0
    expected = _expected(maps, calc_label=11)
    loaded = json.loads(out_json.read_text())
    assert loaded.keys() == expected.keys()
    assert loaded["deep_gm_labels"] == ["caudate", "putamen", "globus_pallidus"]
    for key, value in expected.items():
        if key == "deep_gm_labels":
            assert loaded[key] == value
        elif key == "label_means_ppm":
            assert loaded[key].keys() == value.keys()
            for label, means in value.items():
                assert loaded[key][label]["voxels"] == means["voxels"]
                assert loaded[key][label]["recon"] == pytest.approx(means["recon"], rel=1e-6)
                assert loaded[key][label]["ref"] == pytest.approx(means["ref"], rel=1e-6)
        else:
            assert loaded[key] == pytest.approx(value, rel=1e-6)
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == loaded


def test_explicit_deep_gm_labels_without_names(files, maps, capsys):
    assert main(_args(files, "--labels", files["labels"], "--deep-gm-labels", 4, 5, 6, "--json", "-")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["deep_gm_slope"] == pytest.approx(_expected(maps)["deep_gm_slope"], rel=1e-6)
    assert set(result["label_means_ppm"]) == {"4", "5", "6", "11"}
    assert "calcification_moment_error" not in result


def _error_run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_grid_mismatch_is_a_data_error(files, tmp_path, capsys):
    other = tmp_path / "small_mask.nii.gz"
    save_nifti(other, np.ones((10, 10, 10)), AFFINE)
    code, err = _error_run([str(files["chi"]), str(files["ref"]), str(other)], capsys)
    assert code == 65
    assert "small_mask.nii.gz" in err and "shape" in err and len(err.splitlines()) == 1
    shifted = tmp_path / "shifted.nii.gz"
    save_nifti(shifted, np.ones((28, 28, 24)), np.diag([1.0, 1.0, 1.0, 1.0]))
    code, err = _error_run([str(files["chi"]), str(files["ref"]), str(shifted)], capsys)
    assert code == 65 and "affine" in err


def test_empty_mask_missing_file_and_usage_errors(files, tmp_path, capsys):
    empty = tmp_path / "empty.nii.gz"
    save_nifti(empty, np.zeros((28, 28, 24)), AFFINE)
    code, err = _error_run([str(files["chi"]), str(files["ref"]), str(empty)], capsys)
    assert code == 65 and "empty" in err and len(err.splitlines()) == 1
    code, err = _error_run([str(tmp_path / "nope.nii.gz"), str(files["ref"]), str(files["mask"])], capsys)
    assert code == 66 and "nope.nii.gz" in err
    code, err = _error_run(_args(files, "--calc-label", 11), capsys)
    assert code == 64 and "--labels" in err
    code, err = _error_run(_args(files, "--labels", files["labels"], "--calc-label", 3), capsys)
    assert code == 65 and "calc" in err.lower()
    code, err = _error_run(_args(files, "--labels", files["labels"], "--calc-label", 0), capsys)  # said "fills its image"
    assert code == 64 and "--calc-label 0 is the label map's background: give the calcification's own label" in err


def test_nan_in_mask_is_refused(files, maps, tmp_path, capsys):
    recon = maps[0].copy()
    recon[10, 10, 10] = np.nan
    bad = tmp_path / "nan.nii.gz"
    save_nifti(bad, recon, AFFINE)
    code, err = _error_run([str(bad), str(files["ref"]), str(files["mask"])], capsys)
    assert code == 65 and "NaN" in err


def test_json_output_that_is_a_folder_or_unwritable(files, tmp_path, capsys):
    code, err = _error_run(_args(files, "--json", tmp_path), capsys)
    assert code == 64 and len(err.splitlines()) == 1
    assert f"--json {tmp_path} is a folder" in err and "metrics.json" in err
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    code, err = _error_run(_args(files, "--json", blocker / "metrics.json"), capsys)
    assert code == 73 and len(err.splitlines()) == 1 and err.startswith("qsmprep-eval: error: cannot write")
    assert str(blocker / "metrics.json") in err and "Traceback" not in err
    assert blocker.read_text().startswith("a file") and not list(tmp_path.glob(".tmp-*"))


def test_json_output_that_is_an_input_is_refused(files, capsys):
    """--json MASK overwrote the mask with the metrics (exit 0)."""
    before = files["mask"].read_bytes()
    code, err = _error_run(_args(files, "--json", files["mask"]), capsys)
    assert code == 64 and f"--json {files['mask']} is the input MASK, which it would overwrite" in err
    assert files["mask"].read_bytes() == before
    # the label names too (they were overwritten, exit 0)
    before = files["tsv"].read_bytes()
    argv = _args(files, "--labels", files["labels"], "--label-names", files["tsv"], "--json", files["tsv"])
    code, err = _error_run(argv, capsys)
    assert code == 64 and f"--json {files['tsv']} is the input --label-names, which it would overwrite" in err
    assert files["tsv"].read_bytes() == before


@pytest.mark.parametrize("rows, message", [
    # each of these left a label out of the table and JSON (keyed by name) with exit 0
    ("4\tcaudate\n5\tcaudate\n", "labels 4 and 5 are both named 'caudate', so one would hide the other"),
    ("4\tcaudate\n5\tputamen\n4\tthalamus\n", "index 4 is on lines 2 ('caudate') and 4 ('thalamus'): give "
                                                 "each label one row"),
    ("4\t5\n6\tputamen\n", "label 4 is named '5', which is how label 5 is reported when it has no name"),
    # reported as label "None", and "" for an empty name
    ("4\tcaudate\n5\n", ", line 3: label 5 has no name: write it after the index, separated by a tab"),
    ("4\t \n", ", line 2: label 4 has no name"),
])
def test_label_names_that_would_hide_a_label_are_refused(files, capsys, rows, message):
    files["tsv"].write_text("index\tname\n" + rows)
    code, err = _error_run(_args(files, "--labels", files["labels"], "--label-names", files["tsv"]), capsys)
    assert code == 65 and len(err.splitlines()) == 1
    assert err.startswith(f"qsmprep-eval: error: label names {files['tsv']}") and message in err


def test_slope_skipped_when_the_names_give_fewer_than_two_nuclei(files, maps, capsys, caplog):
    """Names with one deep grey matter nucleus aborted the whole evaluation (exit 65, "found [4]"); names with
    "dentate_gyrus" or "Left-Hypothalamus" put those into the slope."""
    files["tsv"].write_text("index\tname\n4\tLeft-Caudate\n5\tdentate_gyrus\n6\tLeft-Hypothalamus\n")
    argv = _args(files, "--labels", files["labels"], "--label-names", files["tsv"], "--calc-label", 11)
    assert main([*argv, "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["deep_gm_slope"] is None and result["deep_gm_labels"] == ["Left-Caudate"]
    expected = _expected(maps, calc_label=11)  # every other metric is still given
    for key in ("nrmse_pct", "hfen_pct", "xsim", "calcification_moment_error", "calcification_streak"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6)
    assert "deep grey matter slope skipped: it needs at least two deep grey matter labels with voxels in the mask, " \
           "and the label names mark 1 (Left-Caudate)" in caplog.text and "--deep-gm-labels ID" in caplog.text
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"\nDeep GM slope +skipped\n", out)
    assert "\nDeep GM slope labels: Left-Caudate (it needs at least two)\n" in out


def test_label_ids_beyond_float32_are_kept_apart(files, maps, tmp_path, capsys):
    """IDs were read as float32: 2**24 and 2**24 + 1 merged into one row of 250 voxels, and 2**31 - 1 was reported
    as 2147483648; np.bincount over the IDs allocated 16 GiB for the latter (MemoryError on smaller machines)."""
    labels = maps[3].astype(np.int32)
    ids = {4: 2**24, 5: 2**24 + 1, 6: 2**31 - 1}
    for old, new in ids.items():
        labels[maps[3] == old] = new
    big = tmp_path / "big_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels, AFFINE), str(big))
    argv = _args(files, "--labels", big, "--deep-gm-labels", *ids.values(), "--json", "-")
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["label_means_ppm"]) == ["11", "16777216", "16777217", "2147483647"]
    for old, new in ids.items():
        means = result["label_means_ppm"][str(new)]
        assert means["voxels"] == 125
        assert means["ref"] == pytest.approx(maps[1][maps[3] == old].mean(), rel=1e-6)
    assert result["deep_gm_labels"] == ["16777216", "16777217", "2147483647"]
    assert result["deep_gm_slope"] == pytest.approx(_expected(maps)["deep_gm_slope"], rel=1e-6)


def test_negative_labels_are_refused_and_a_repeated_gm_label_counts_once(files, tmp_path, capsys):
    """Negative labels ended in a traceback (np.bincount); --deep-gm-labels 4 4 fitted a line through one point."""
    img = nib.load(files["labels"])
    negative = tmp_path / "negative_dseg.nii.gz"
    nib.save(nib.Nifti1Image(-np.asarray(img.dataobj, dtype=np.int16), img.affine), str(negative))
    code, err = _error_run(_args(files, "--labels", negative), capsys)
    assert code == 65 and f"label map {negative} holds negative labels" in err
    code, err = _error_run(_args(files, "--labels", files["labels"], "--deep-gm-labels", 4, 4), capsys)
    assert code == 65 and err == ("qsmprep-eval: error: --deep-gm-labels: the deep grey matter slope needs at least "
                                  "two of its labels with voxels in the mask; found 1 (4): give two or more of the "
                                  "labels the label map has inside the mask (4, 5, 6, 11).")


def test_a_map_given_as_mask_is_refused(files, capsys):
    """A field or probability map as MASK was thresholded at 0 silently (54.5 % NRMSE instead of 41.1 %)."""
    code, err = _error_run([str(files["chi"]), str(files["ref"]), str(files["ref"])], capsys)
    assert code == 65 and f"mask {files['ref']} has" in err and "not whole numbers" in err


def test_non_integer_label_map_is_refused(files, capsys):
    code, err = _error_run(_args(files, "--labels", files["chi"]), capsys)
    assert code == 65 and len(err.splitlines()) == 1
    assert f"label map {files['chi']} holds non-integer values" in err and "dseg" in err


def test_constant_reference_is_refused_and_a_single_volume_4d_file_is_read(files, maps, tmp_path, capsys):
    flat = tmp_path / "flat_ref.nii.gz"
    save_nifti(flat, np.full((28, 28, 24), 0.05), AFFINE)
    code, err = _error_run([str(files["chi"]), str(flat), str(files["mask"])], capsys)
    assert code == 65 and "flat_ref.nii.gz is constant inside the mask" in err and len(err.splitlines()) == 1
    one_voxel = tmp_path / "one_voxel.nii.gz"
    single = np.zeros((28, 28, 24))
    single[14, 14, 12] = 1
    save_nifti(one_voxel, single, AFFINE)
    code, err = _error_run([str(files["chi"]), str(files["ref"]), str(one_voxel)], capsys)
    assert code == 65 and "constant inside the mask (1 voxels)" in err
    four_d = tmp_path / "chi_4d.nii.gz"
    save_nifti(four_d, maps[0][..., None], AFFINE)  # (x, y, z, 1), as some tools write
    assert main([str(four_d), str(files["ref"]), str(files["mask"]), "--json", "-"]) == 0
    from_4d = json.loads(capsys.readouterr().out)
    assert main([str(files["chi"]), str(files["ref"]), str(files["mask"]), "--json", "-"]) == 0
    assert from_4d == json.loads(capsys.readouterr().out)


def test_calcification_without_surroundings_is_refused(files, maps, tmp_path, capsys):
    """A calcification label reaching every edge left no rim: NaN went into the JSON with exit 0."""
    labels = maps[3].copy()
    labels[1:-1, 1:-1, 1:-1] = 11
    big = tmp_path / "big_calc_dseg.nii.gz"
    save_nifti(big, labels, AFFINE, dtype=np.uint8)
    out = tmp_path / "metrics.json"
    code, err = _error_run(_args(files, "--labels", big, "--calc-label", 11, "--json", out), capsys)
    assert code == 65 and "no surrounding tissue" in err and not out.exists()


def test_maps_in_different_units_are_warned_about(files, maps, capsys, caplog):
    """A map in ppb scored against one in ppm gave NRMSE 102027 % without a word."""
    recon, ref, mask, labels = maps
    assert main(_args(files)) == 0 and "are both in ppm" not in caplog.text  # 0.8 ref + noise: one unit
    capsys.readouterr()
    save_nifti(files["chi"], 1000 * recon, AFFINE, dtype=np.float32)
    assert main(_args(files, "--json", "-")) == 0
    assert json.loads(capsys.readouterr().out)["nrmse_pct"] > 1e4  # the metrics are still given
    warning = caplog.records[-1]
    assert warning.levelname == "WARNING" and re.match(  # 0.8 x 1000, and the noise
        rf"{re.escape(str(files['chi']))} spreads 8\d\d times as far as {re.escape(str(files['ref']))} inside the mask "
        r"\(1st to 99th percentile: 2\d\d against 0.3\d+\): are both in ppm\?", warning.getMessage())
    save_nifti(files["chi"], recon / 200, AFFINE, dtype=np.float32)  # the other way round
    caplog.clear()
    assert main(_args(files)) == 0 and re.search(r"spreads 0.004\d* times as far", caplog.text)
    # both flat but for under 1 % of the mask (a calcification in a sparse map): no scale to compare, no warning
    flat = np.zeros(np.shape(ref), np.float32)
    flat[tuple(np.argwhere(np.asarray(mask) > 0)[:3].T)] = -1.5
    for name in ("chi", "ref"):
        save_nifti(files[name], flat, AFFINE, dtype=np.float32)
    caplog.clear()
    assert main(_args(files)) == 0 and "spreads" not in caplog.text
