"""GRE forward simulation, oblique/anisotropic acquisition, BIDS writer and qsmprep-simulate."""

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmprep.cli import simulate
from qsmprep.cli.simulate import main
from qsmprep.errors import DataError
from qsmprep.physics import b0_dir_from_affine, b0_tilt_deg, forward_field_ppm, ppm_to_rad, voxel_size_from_affine
from qsmprep.sim import LABELS, acquire, head_phantom, phase_to_vendor_units, simulate_gre, write_bids_dataset
from qsmprep.sim.bids_writer import acquisition_bytes

TE = (0.004, 0.008, 0.012)


def wrap(phase):
    return np.angle(np.exp(1j * phase))


@pytest.fixture(scope="module")
def phantom():
    return head_phantom((64, 64, 64), (3.0, 3.0, 3.0), seed=0)


@pytest.fixture(scope="module")
def noiseless(phantom):
    return simulate_gre(phantom, te_s=TE, snr=None, seed=1)


def test_local_field_is_the_forward_model_of_the_brain_chi(phantom, noiseless):
    mask = phantom.brain_mask
    expected = forward_field_ppm(np.where(mask, phantom.chi_ppm, 0), (3.0, 3.0, 3.0), (0, 0, 1), pad_factor=2)
    np.testing.assert_allclose(noiseless.local_field_ppm[mask], expected[mask], atol=1e-5)
    assert not noiseless.local_field_ppm[~mask].any()
    # total = local + background inside the brain; the background (air, skull) is the larger part
    np.testing.assert_allclose(
        noiseless.total_field_ppm[mask], (noiseless.local_field_ppm + noiseless.background_field_ppm)[mask], atol=1e-5
    )
    assert noiseless.background_field_ppm[mask].std() > 3 * noiseless.local_field_ppm[mask].std()
    assert abs(noiseless.total_field_ppm[mask].mean()) < 1e-5  # centre frequency on the brain
    np.testing.assert_array_equal(noiseless.chi_ppm, phantom.chi_ppm * mask)


def test_noiseless_signal_follows_the_model(phantom, noiseless):
    signal = phantom.proton_density > 0.1
    for n, te in enumerate(TE):
        expected_phase = noiseless.phase_offset_rad + ppm_to_rad(noiseless.total_field_ppm, te, 3.0)
        error = wrap(noiseless.phase_rad[..., n] - expected_phase)
        assert np.abs(error[signal]).max() < 1e-3
        expected_mag = phantom.proton_density * np.exp(-phantom.r2star_hz * te)
        np.testing.assert_allclose(noiseless.magnitude[..., n], expected_mag, rtol=1e-5, atol=1e-6)
    assert noiseless.phase_rad.min() >= -np.pi and noiseless.phase_rad.max() < np.pi
    assert np.ptp(noiseless.phase_offset_rad) > 1.0  # a spatially varying receive phase is there
    # R2* scales with B0 (given at 3 T)
    at7 = simulate_gre(phantom, te_s=(0.01,), b0_tesla=7.0, snr=None)
    np.testing.assert_allclose(at7.magnitude[..., 0], phantom.proton_density * np.exp(-phantom.r2star_hz * 7 / 3 * 0.01),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # and the phase evolves 7/3 times faster: the field in ppm is the same, in rad it scales with B0
    error = wrap(at7.phase_rad[..., 0] - at7.phase_offset_rad - ppm_to_rad(at7.total_field_ppm, 0.01, 7.0))
    assert np.abs(error[phantom.proton_density > 0.1]).max() < 1e-3
    np.testing.assert_allclose(at7.total_field_ppm, noiseless.total_field_ppm, atol=1e-6)


def test_noise_is_complex_gaussian_at_the_requested_snr(phantom, noiseless):
    noisy = simulate_gre(phantom, te_s=TE, snr=50, seed=1)
    expected_sigma = noiseless.magnitude[..., 0][phantom.brain_mask].mean() / 50
    assert noisy.noise_sigma == pytest.approx(expected_sigma, rel=1e-5)
    # outside the head the magnitude is pure noise: Rayleigh with mean sigma sqrt(pi / 2)
    air = phantom.labels == LABELS["background"]
    assert noisy.magnitude[..., 0][air].mean() == pytest.approx(expected_sigma * np.sqrt(np.pi / 2), rel=0.02)
    again = simulate_gre(phantom, te_s=TE, snr=50, seed=1)
    np.testing.assert_array_equal(again.phase_rad, noisy.phase_rad)
    other = simulate_gre(phantom, te_s=TE, snr=50, seed=2)
    assert not np.array_equal(other.magnitude, noisy.magnitude)


def test_tilted_b0_is_encoded_in_the_affine(phantom):
    t = np.radians(15)
    tilted = simulate_gre(phantom, te_s=(0.004,), b0_dir=(0, np.sin(t), np.cos(t)), snr=None)
    np.testing.assert_allclose(b0_dir_from_affine(tilted.affine), (0, np.sin(t), np.cos(t)), atol=1e-9)
    np.testing.assert_allclose(voxel_size_from_affine(tilted.affine), (3, 3, 3), atol=1e-9)


def test_acquire_on_the_phantom_grid_is_simulate_gre(phantom):
    direct = simulate_gre(phantom, te_s=TE, snr=30, seed=4)
    resampled = acquire(phantom, (3.0, 3.0, 3.0), 0.0, shape=(64, 64, 64), te_s=TE, snr=30, seed=4)
    np.testing.assert_allclose(resampled.affine, direct.affine)
    np.testing.assert_allclose(resampled.magnitude, direct.magnitude, atol=1e-5)
    np.testing.assert_allclose(resampled.total_field_ppm, direct.total_field_ppm, atol=1e-6)
    np.testing.assert_array_equal(resampled.labels, direct.labels)


def test_oblique_anisotropic_acquisition():
    fine = head_phantom((96, 112, 96), (2.0, 2.0, 2.0), seed=3)
    slab = acquire(fine, (3.0, 3.0, 4.0), oblique_deg=20.0, te_s=TE, snr=None, seed=0)
    assert slab.magnitude.shape == (64, 75, 48, 3)
    assert b0_tilt_deg(b0_dir_from_affine(slab.affine)) == pytest.approx(20.0, abs=1e-6)
    np.testing.assert_allclose(slab.b0_dir, (0, np.sin(np.radians(20)), np.cos(np.radians(20))), atol=1e-9)
    np.testing.assert_allclose(voxel_size_from_affine(slab.affine), (3, 3, 4), atol=1e-9)
    # brain volume is preserved by the resampling (labels at voxel centres)
    fine_ml = fine.brain_mask.sum() * 8 / 1000
    assert slab.brain_mask.sum() * 36 / 1000 == pytest.approx(fine_ml, rel=0.03)
    # the box-averaged complex signal has the phase of the box-averaged field where the field is smooth
    inner = ndimage.binary_erosion(slab.brain_mask, iterations=2)
    expected = slab.phase_offset_rad + ppm_to_rad(slab.total_field_ppm, TE[0], 3.0)
    error = np.abs(wrap(slab.phase_rad[..., 0] - expected))[inner]
    assert np.median(error) < 0.01 and np.percentile(error, 95) < 0.1
    # the box pre-filter conserves the integral of the ground-truth chi (ppm mm^3)
    fine_integral = (fine.chi_ppm * fine.brain_mask).sum() * 8
    assert slab.chi_ppm.sum() * 36 == pytest.approx(fine_integral, rel=0.02)


def test_vendor_phase_units():
    phase = np.array([-np.pi, -1.0, 0.0, 1.0, np.pi - 1e-6])
    value = phase_to_vendor_units(phase)
    assert value.dtype == np.int16
    np.testing.assert_array_equal(value, [-4096, round(-4096 / np.pi), 0, round(4096 / np.pi), 4095])
    np.testing.assert_allclose(value * np.pi / 4096, phase, atol=np.pi / 4096)


@pytest.mark.parametrize("units", ["arbitrary", "rad"])
def test_written_phase_round_trips_to_radians(tmp_path, phantom, units):
    gre = simulate_gre(phantom, te_s=TE, snr=100, seed=0)
    write_bids_dataset(tmp_path, [("01", None, gre)], phase_units=units)
    for n, te in enumerate(TE, start=1):
        stem = tmp_path / "sub-01" / "anat" / f"sub-01_echo-{n}_part-phase_MEGRE"
        sidecar = json.loads(stem.with_suffix(".json").read_text())
        assert sidecar["Units"] == units and sidecar["EchoTime"] == te and sidecar["MagneticFieldStrength"] == 3.0
        img = nib.load(str(stem) + ".nii.gz")
        data = np.asarray(img.dataobj)
        if units == "arbitrary":
            assert data.dtype == np.int16 and data.min() >= -4096 and data.max() <= 4095
            assert data.min() < -4000 and data.max() > 4000  # the full range is used
            radians = data * np.pi / 4096
            assert np.abs(wrap(radians - gre.phase_rad[..., n - 1])).max() <= np.pi / 4096 + 1e-6
        else:
            np.testing.assert_array_equal(data, gre.phase_rad[..., n - 1])
        mag = nib.load(str(stem).replace("part-phase", "part-mag") + ".nii.gz")
        np.testing.assert_allclose(mag.get_fdata(), gre.magnitude[..., n - 1], rtol=1e-6)
        assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1


def test_write_bids_dataset_checks_the_dataset_files_first(tmp_path, noiseless):
    (tmp_path / "dataset_description.json").write_text("{")
    with pytest.raises(DataError, match="dataset_description.json is not valid JSON"):
        write_bids_dataset(tmp_path, [("01", None, noiseless)])
    assert [p.name for p in tmp_path.iterdir()] == ["dataset_description.json"]


def test_write_bids_dataset_checks_a_simulated_datasets_participants_first_and_lists_each_subject_once(
        tmp_path, noiseless):
    """Into a dataset the simulator made, an unreadable participants.tsv stopped the writing after the subjects were
    written; and a subject given twice (two sessions) got two rows."""
    write_bids_dataset(tmp_path, [("01", "a", noiseless), ("01", "b", noiseless), ("02", None, noiseless)])
    assert (tmp_path / "participants.tsv").read_text() == "participant_id\nsub-01\nsub-02\n"
    (tmp_path / "participants.tsv").write_bytes(b"participant_id\tname\nsub-01\tJos\xe9\n")
    with pytest.raises(DataError, match="participants.tsv is not UTF-8 text"):
        write_bids_dataset(tmp_path, [("03", None, noiseless)])
    assert not (tmp_path / "sub-03").exists()


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "ds"
    argv = [str(out), "--subjects", "2", "--sessions", "pre", "ses-post", "--echoes", "3", "--te-first", "0.005",
            "--te-spacing", "0.005", "--matrix", "40", "48", "40", "--voxel-size", "4", "4", "4", "--seed", "7"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_cli_dataset_indexes_with_pybids(cli_dataset):
    import bids  # pybids is a hard dependency (pyproject.toml): a broken install must fail here, not skip
    layout = bids.BIDSLayout(cli_dataset, validate=True)
    assert sorted(layout.get_subjects()) == ["01", "02"]
    assert sorted(layout.get_sessions()) == ["post", "pre"]
    phase = layout.get(suffix="MEGRE", part="phase", extension=".nii.gz")
    mag = layout.get(suffix="MEGRE", part="mag", extension=".nii.gz")
    assert len(phase) == len(mag) == 2 * 2 * 3
    for f in phase:
        echo = int(f.entities["echo"])
        assert f.get_metadata()["EchoTime"] == pytest.approx(0.005 * echo, abs=1e-12)
        assert f.get_metadata()["Units"] == "arbitrary"
    assert not layout.get(suffix="Chimap")  # the ground truth is not raw input
    truth = bids.BIDSLayout(cli_dataset / "derivatives" / "groundtruth", validate=False, is_derivative=True)
    assert len(truth.get(suffix="Chimap", extension=".nii.gz")) == 4
    description = json.loads((cli_dataset / "derivatives" / "groundtruth" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert json.loads((cli_dataset / "dataset_description.json").read_text())["DatasetType"] == "raw"
    assert (cli_dataset / "participants.tsv").read_text().split() == ["participant_id", "sub-01", "sub-02"]


def test_ground_truth_is_a_derivative_linked_to_the_raw_dataset(cli_dataset):
    """The BIDS validator refused SourceDatasets URL "../../" (not a URI) and warned of the missing README."""
    truth = cli_dataset / "derivatives" / "groundtruth"
    description = json.loads((truth / "dataset_description.json").read_text())
    assert description["SourceDatasets"] == [{"URL": "bids:raw:"}]
    assert (truth / description["DatasetLinks"]["raw"]).resolve() == cli_dataset.resolve()
    readme = (truth / "README").read_text()
    assert readme.startswith("# qsmprep simulated MEGRE: ground truth\n") and "dseg.tsv" in readme
    assert len(readme) > 150  # the validator's README_FILE_SMALL threshold


def test_acquisition_bytes_bound_the_dataset_on_disk(cli_dataset):
    images = sum(f.stat().st_size for f in cli_dataset.rglob("sub-*.nii.gz"))
    bound = 2 * 2 * acquisition_bytes((40, 48, 40), 3, "arbitrary")  # subjects x sessions
    assert bound == 4 * 40 * 48 * 40 * (3 * (4 + 2) + 4 * 4 + 2)
    assert 0.5 * bound < images < bound


def test_cli_subjects_differ_and_sessions_share_the_head(cli_dataset):
    truth = cli_dataset / "derivatives" / "groundtruth"

    def chi(sub, ses):
        return nib.load(str(truth / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_Chimap.nii.gz")).get_fdata()

    np.testing.assert_array_equal(chi("01", "pre"), chi("01", "post"))
    assert not np.array_equal(chi("01", "pre"), chi("02", "pre"))
    raw = cli_dataset / "sub-01"
    a = nib.load(str(raw / "ses-pre" / "anat" / "sub-01_ses-pre_echo-1_part-phase_MEGRE.nii.gz")).get_fdata()
    b = nib.load(str(raw / "ses-post" / "anat" / "sub-01_ses-post_echo-1_part-phase_MEGRE.nii.gz")).get_fdata()
    assert not np.array_equal(a, b)  # new noise and receive phase per session
    labels = nib.load(str(truth / "sub-01" / "ses-pre" / "anat" / "sub-01_ses-pre_dseg.nii.gz")).get_fdata()
    mask = nib.load(str(truth / "sub-01" / "ses-pre" / "anat" / "sub-01_ses-pre_desc-brain_mask.nii.gz")).get_fdata()
    assert set(np.unique(labels)) <= set(LABELS.values()) and mask.sum() > 1000


def test_cli_oblique_anisotropic_header(tmp_path):
    out = tmp_path / "oblique"
    argv = [str(out), "--oblique", "25", "--voxel-size", "3", "3", "4.5", "--matrix", "48", "56", "32",
            "--echoes", "2", "--fine-voxel-size", "3", "--phase-units", "rad"]  # fmt: skip
    assert main(argv) == 0
    img = nib.load(str(out / "sub-01" / "anat" / "sub-01_echo-2_part-phase_MEGRE.nii.gz"))
    assert img.shape == (48, 56, 32)
    assert b0_tilt_deg(b0_dir_from_affine(img.affine)) == pytest.approx(25.0, abs=1e-3)
    np.testing.assert_allclose(img.header.get_zooms()[:3], (3, 3, 4.5), atol=1e-5)
    assert img.get_data_dtype() == np.float32


def test_cli_refuses_a_non_bids_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main([str(tmp_path), "--matrix", "16", "16", "16", "--voxel-size", "12", "12", "12"]) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert main([str(tmp_path / "ds"), "--te-first", "4"]) == 64  # milliseconds given by mistake


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "-1"], "--seed must be 0 or more"),
        (["--sessions", "a_b"], "--sessions a_b: give distinct BIDS labels of letters and digits (e.g. pre post, or 1 2); "
                                "not ['a_b']"),
        (["--sessions", "pre", "ses-pre"], "--sessions pre ses-pre: give distinct BIDS labels"),
        (["--sessions", "ses-"], "not ['']"),
        (["--fine-voxel-size", "0"], "--fine-voxel-size must be positive and at most the smallest --voxel-size (4 mm)"),
        (["--fine-voxel-size", "100"], "--fine-voxel-size must be positive and at most"),
        (["--fine-voxel-size", "0.01"], "from a 12800 x 12800 x 9600 grid of 0.01 mm needs about"),
        (["--fine-voxel-size", "1e-320"], "needs about inf GB of memory"),
        (["--matrix", "32767", "32767", "32767"], "simulating 2 echoes on a 32767 x 32767 x 32767 matrix needs"),
        (["--matrix", "40000", "8", "8"], "--matrix must be at least 8 and at most 32767 voxels per axis (NIfTI-1 "
                                          "holds no more)"),
    ],
)
def test_cli_refuses_grids_it_cannot_simulate(tmp_path, capsys, extra, message):
    """Each of these ended in a traceback (a negative seed, a TiB allocation, an infinite fine grid, a matrix NIfTI-1
    cannot store, once simulated) or, for a fine voxel larger than the output voxel, in an empty dataset with exit
    0."""
    argv = [str(tmp_path / "ds"), "--matrix", "32", "32", "24", "--voxel-size", "4", "4", "4", "--echoes", "2", *extra]
    assert main(argv) == 64 and message in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fov-mm", "1", "1", "1"], "--fov-mm 1 1 1 at --voxel-size 1.5 1.5 1.5 gives a 1 x 1 x 1 matrix, and the "
                                      "simulator needs at least 8 voxels per axis: give --fov-mm 12 12 12 or more"),
        (["--fov-mm", "20", "20", "20", "--voxel-size", "2", "2", "3"], "gives a 10 x 10 x 7 matrix, and the simulator "
                                                                        "needs at least 8 voxels per axis: give "
                                                                        "--fov-mm 16 16 24 or more"),
        (["--fov-mm", "0", "60", "60"], "--fov-mm 0 60 60: give the field of view in mm, each positive"),
        (["--fov-mm", "-60", "60", "60"], "--fov-mm -60 60 60: give the field of view in mm, each positive"),
        (["--b0", "3000"], "--b0-tesla is the field strength in tesla, a positive number such as 3; got 3000 (it looks "
                           "like millitesla)"),
        (["--b0-tesla", "0"], "--b0-tesla is the field strength in tesla, a positive number such as 3; got 0."),
        (["--oblique", "91"], "--oblique is the slab tilt in degrees, from -90 to 90 (e.g. 15), got 91"),
        (["--oblique", "-400"], "got -400"),
        (["--voxel-size", "8", "8", "100", "--matrix", "8", "8", "8"], "--voxel-size 8 8 100: give sizes in mm, each "
                                                                       "positive and at most 20"),
        (["--voxel-size", "0", "1", "1"], "--voxel-size 0 1 1: give sizes in mm"),
        (["--snr", "-1"], "--snr must be 0 (noiseless) or positive, got -1"),
        (["--echoes", "20", "--te-spacing", "0.06"], "the last echo time, --te-first + (--echoes - 1) x --te-spacing, "
                                                     "would be 1.144 s, over 0.5 s"),
        (["--te-first", "4"], "would be 4.004 s, over 0.5 s: --te-first and --te-spacing are in seconds, not milliseconds"),
        (["--fov-mm", "1e308", "1", "1", "--voxel-size", "0.1", "1", "1"], "gives more than 32767 voxels along an "
                                                                          "axis, more than a NIfTI-1 file holds"),
    ],
)
def test_cli_refuses_implausible_acquisitions(tmp_path, capsys, extra, message):
    """A field of view under 8 voxels was silently enlarged to 8; a B0 in millitesla, a tilt of 400 degrees, an echo
    at 1.1 s were simulated; a 100 mm voxel missed the brain and gave NaN images; a field of view of 1e308 mm ended in
    an OverflowError."""
    argv = [str(tmp_path / "ds"), "--echoes", "2", *extra]
    assert main(argv) == 64 and message in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_cli_refuses_a_dataset_that_does_not_fit_on_disk(tmp_path, capsys, monkeypatch):
    free = 10**6  # bytes; the dataset needs 8 x 16^3 x (2 x (4 + 2) + 18) = 983040
    usage = type(simulate.shutil.disk_usage(tmp_path))
    monkeypatch.setattr(simulate.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - free, free))
    small = [str(tmp_path / "ds"), "--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]
    assert main([*small, "--subjects", "8"]) == 0
    assert main([*small, "--subjects", "9"]) == 73
    assert capsys.readouterr().err.endswith(
        f"error: the dataset needs up to 1.1 MB and {tmp_path / 'ds'} has 1.0 MB free: simulate fewer --subjects, "
        "--sessions or --echoes, a smaller grid, or free space.\n")
    assert sorted(p.name for p in (tmp_path / "ds").glob("sub-*")) == [f"sub-{i:02d}" for i in range(1, 9)]


PEAK_RSS_OF_MAIN = """import sys
from qsmprep.cli.simulate import main
code = main(sys.argv[1:])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))  # kB
sys.exit(code)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from procfs (Linux)")
def test_peak_memory_estimate_is_near_the_measured_peak(tmp_path):
    """The memory check's estimate against the peak RSS of a default simulation of two subjects (7 s) in a process
    of its own. The second subject must not raise the peak: the first subject's images and phantom were held while
    it was simulated (535 MB against 351 MB for one subject), beyond the estimate's margin."""
    root = str(Path(simulate.__file__).resolve().parents[2])  # the child runs this checkout, as the test does
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_MAIN, str(tmp_path / "ds"), "--subjects", "2"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, check=True)  # fmt: skip
    peak = int(run.stdout) * 1024
    estimate = simulate.peak_memory_bytes((112, 136, 112), (112, 136, 112), 4)
    assert estimate == pytest.approx(peak, rel=0.25)
    assert simulate.MEMORY_MARGIN * estimate > peak  # the check leaves room for the measured peak


def test_cli_refuses_a_simulation_that_does_not_fit_in_memory(tmp_path, capsys, monkeypatch):
    """A grid too large for the machine ended in a MemoryError traceback or an OOM kill part-way."""
    monkeypatch.setattr(simulate, "available_memory_bytes", lambda: 2 * 10**8)
    assert main([str(tmp_path / "ds")]) == 64
    assert capsys.readouterr().err == (
        "qsmprep-simulate: error: simulating 4 echoes on a 112 x 136 x 112 matrix needs about 0.4 GB of memory at "
        "its peak (0.5 GB with a 20 % margin), and 0.2 GB is available: give a smaller --fov-mm or --matrix, a larger "
        "--voxel-size, or fewer --echoes.\n")
    assert main([str(tmp_path / "ds"), "--oblique", "15", "--echoes", "1"]) == 64
    assert capsys.readouterr().err.endswith(
        "simulating 1 echo on a 112 x 136 x 112 matrix from a 168 x 204 x 168 grid of 1 mm needs about 1.1 GB of "
        "memory at its peak (1.3 GB with a 20 % margin), and 0.2 GB is available: give a smaller --fov-mm or "
        "--matrix, a larger --voxel-size or --fine-voxel-size, or fewer --echoes.\n")
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_keeps_its_margin(tmp_path, monkeypatch):
    small = [str(tmp_path / "ds"), "--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]
    need = simulate.peak_memory_bytes((16, 16, 16), (16, 16, 16), 2)
    monkeypatch.setattr(simulate, "available_memory_bytes", lambda: 1.1 * need)  # within the 20 % margin
    assert main(small) == 64 and not (tmp_path / "ds").exists()
    monkeypatch.setattr(simulate, "available_memory_bytes", lambda: 1.3 * need)
    assert main([*small, "--subjects", "2"]) == 0  # one acquisition at a time: the subjects do not add up


def test_a_default_simulation_passes_the_memory_check(tmp_path, caplog):
    """With the real available memory: a machine that cannot simulate the default dataset cannot run the Quick
    start either."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="qsmprep"):
        assert simulate._grids(simulate.build_parser().parse_args([str(tmp_path / "ds")])) == ((112, 136, 112), None)
    assert "the simulation needs about 0.4 GB of memory at its peak" in caplog.text


def test_memory_that_cannot_be_read_is_not_checked(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(simulate, "available_memory_bytes", lambda: None)  # not Linux
    assert main([str(tmp_path / "ds"), "--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8"]) == 0
    assert "the free memory cannot be read here: the simulation's peak of about 0.1 GB is not checked" in caplog.text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("participants.tsv", b"participant_id\tname\nsub-05\tJos\xe9\n",
         "is not UTF-8 text (byte 0xe9 at offset 30): save it as UTF-8, as BIDS requires, then simulate again."),
        ("participants.tsv", b"subject\tage\nsub-05\t34\n",
         "has no participant_id column (its header is 'subject age'): make participant_id its first column, as BIDS "
         "requires, then simulate again."),
        ("dataset_description.json", b'{"Name": "my study", "BIDSVersion": "1.9.0",}',
         "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 45 (char 44)): fix it "
         "(BIDS needs a UTF-8 JSON object with Name and BIDSVersion), or give another directory."),
        ("dataset_description.json", b'["my study"]',
         "holds a JSON list, not an object: fix it (BIDS needs a UTF-8 JSON object with Name and BIDSVersion), or "
         "give another directory."),
        ("dataset_description.json", b'{"Name": "\xe9tude", "BIDSVersion": "1.9.0"}',
         "is not UTF-8 text (byte 0xe9 at offset 10): fix it (BIDS needs a UTF-8 JSON object with Name and "
         "BIDSVersion), or give another directory."),
    ],
)
def test_cli_refuses_unreadable_dataset_files_before_writing(tmp_path, capsys, name, content, message):
    """A participants.tsv in Latin-1 ended in a traceback after sub-01 was written; a broken description was kept, or
    taken for a real dataset's."""
    real = tmp_path / "real"
    (real / "sub-05" / "anat").mkdir(parents=True)
    (real / "dataset_description.json").write_text('{"Name": "my study", "BIDSVersion": "1.9.0"}')
    (real / "participants.tsv").write_text("participant_id\nsub-05\n")
    (real / name).write_bytes(content)
    assert main([str(real), "--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]) == 65
    assert capsys.readouterr().err == f"qsmprep-simulate: error: {real / name} {message}\n"
    assert sorted(p.name for p in real.iterdir()) == ["dataset_description.json", "participants.tsv", "sub-05"]
    assert (real / name).read_bytes() == content


def test_participants_with_a_byte_order_mark_are_merged(tmp_path):
    """A UTF-8 participants.tsv saved with a byte-order mark (e.g. by a spreadsheet) lost its participant_id column:
    the new subject's row read n/a."""
    real = tmp_path / "real"
    (real / "sub-05").mkdir(parents=True)
    (real / "dataset_description.json").write_text('{"Name": "my study", "BIDSVersion": "1.9.0"}')
    (real / "participants.tsv").write_bytes("\ufeffparticipant_id\tname\nsub-05\tJosé\n".encode())
    assert main([str(real), "--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]) == 0
    assert (real / "participants.tsv").read_text(encoding="utf-8") == "participant_id\tname\nsub-01\tn/a\nsub-05\tJosé\n"


def test_cli_refuses_a_folder_it_cannot_create(tmp_path, caplog, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    assert main([str(blocker / "ds"), "--matrix", "16", "16", "16", "--voxel-size", "12", "12", "12"]) == 73
    err = capsys.readouterr().err.splitlines()
    assert err == [f"qsmprep-simulate: error: OUT_DIR {blocker / 'ds'} cannot be created: {blocker} is a file. "
                   "Give a folder path that does not run through a file."]
    assert "Simulating" not in caplog.text  # refused before any simulation


def test_simulating_into_a_dataset_of_real_subjects_keeps_it(tmp_path, caplog, capsys):
    small = ["--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]
    real = tmp_path / "real"
    (real / "sub-01" / "anat").mkdir(parents=True)
    description = {"Name": "my study", "BIDSVersion": "1.9.0", "Authors": ["A. Researcher"]}
    (real / "dataset_description.json").write_text(json.dumps(description))
    (real / "participants.tsv").write_text("participant_id\tage\nsub-01\t34\n")
    (real / "README").write_text("my study\n")
    scan = real / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    scan.write_bytes(b"not touched")
    # its sub-01 would be overwritten: refused, nothing written
    assert main([str(real), *small]) == 64
    assert "qsmprep-simulate did not make, and it already has sub-01" in capsys.readouterr().err
    assert sorted(p.name for p in (real / "sub-01" / "anat").iterdir()) == ["sub-01_T1w.nii.gz"]
    # a new subject is added; the dataset's own files and columns are kept
    (real / "sub-01").rename(real / "sub-03")
    (real / "participants.tsv").write_text("participant_id\tage\nsub-03\t34\n")
    assert main([str(real), *small]) == 0
    assert json.loads((real / "dataset_description.json").read_text()) == description
    assert (real / "README").read_text() == "my study\n" and not (real / "CHANGES").exists()
    assert (real / "participants.tsv").read_text() == "participant_id\tage\nsub-01\tn/a\nsub-03\t34\n"
    assert (real / "sub-03" / "anat" / "sub-01_T1w.nii.gz").read_bytes() == b"not touched"
    assert len(list((real / "sub-01" / "anat").glob("*_MEGRE.nii.gz"))) == 4
    # a simulated dataset may be simulated again (the Quick start run twice)
    sim = tmp_path / "sim"
    assert main([str(sim), *small]) == 0 and main([str(sim), *small, "--seed", "1"]) == 0


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_bids_dataset_keeps_nothing_of_a_failed_run(tmp_path, noiseless):
    def acquisitions():
        yield "01", None, noiseless
        raise MemoryError("the second subject did not fit")

    with pytest.raises(MemoryError):
        write_bids_dataset(tmp_path / "ds", acquisitions())
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor the hidden folder the subjects were written to


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_simulation_leaves_the_folder_as_it_was(tmp_path, capsys, monkeypatch, terminal_signals, signum):
    """A stop part-way (Ctrl-C, a scheduler's SIGTERM) left some subjects without dataset_description.json, which
    the same command then refused, a stray subject in a real dataset, or an earlier simulation half replaced."""
    small = ["--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]
    sim, new = tmp_path / "sim", tmp_path / "new"
    assert main([str(sim), *small, "--subjects", "2"]) == 0
    before = _files(sim)
    calls, simulate_gre_unstopped = itertools.count(), simulate.simulate_gre

    def stopped_at_the_second_subject(*args, **kwargs):
        if next(calls) == 1:
            os.kill(os.getpid(), signum)
        return simulate_gre_unstopped(*args, **kwargs)

    monkeypatch.setattr(simulate, "simulate_gre", stopped_at_the_second_subject)
    for out in (sim, new):
        calls = itertools.count()
        assert main([str(out), *small, "--subjects", "3", "--seed", "1"]) == 128 + signum
        assert capsys.readouterr().err == (f"qsmprep-simulate: stopped by {signal.Signals(signum).name}: nothing of "
                                           f"this run was kept, {out} is as it was; run the same command again to "
                                           "simulate.\n")
    assert _files(sim) == before and sorted(p.name for p in tmp_path.iterdir()) == ["sim"]
    monkeypatch.undo()
    assert main([str(new), *small, "--subjects", "3", "--seed", "1"]) == 0


def test_simulating_again_replaces_the_earlier_simulation(tmp_path):
    small = ["--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8"]
    sim = tmp_path / "sim"
    assert main([str(sim), *small, "--echoes", "3", "--subjects", "2"]) == 0
    (sim / "derivatives" / "qsmprep").mkdir()  # a user's outputs beside the simulation stay
    assert main([str(sim), *small, "--echoes", "2", "--sessions", "1"]) == 0
    raw = sorted(p.relative_to(sim).as_posix() for p in sim.glob("sub-*/**/*.nii.gz"))
    assert raw == [f"sub-01/ses-1/anat/sub-01_ses-1_echo-{e}_part-{part}_MEGRE.nii.gz"
                   for e in (1, 2) for part in ("mag", "phase")]
    truth = sim / "derivatives" / "groundtruth"
    assert [p.name for p in truth.glob("sub-*")] == ["sub-01"] and not (truth / "sub-01" / "anat").exists()
    assert (sim / "participants.tsv").read_text() == "participant_id\nsub-01\n"
    assert (sim / "derivatives" / "qsmprep").is_dir()


def test_cli_snr_field_strength_and_phase_units_reach_the_images(tmp_path):
    out = tmp_path / "ds"
    assert main([str(out), "--matrix", "24", "24", "24", "--voxel-size", "8", "8", "8", "--echoes", "1",
                 "--te-first", "0.004", "--snr", "20", "--b0", "7", "--phase-units", "rad", "--no-phase-offset"]) == 0
    anat, truth = out / "sub-01" / "anat", out / "derivatives" / "groundtruth" / "sub-01" / "anat"
    magnitude = nib.load(anat / "sub-01_part-mag_T2starw.nii.gz").get_fdata()
    phase = nib.load(anat / "sub-01_part-phase_T2starw.nii.gz").get_fdata()
    labels = nib.load(truth / "sub-01_dseg.nii.gz").get_fdata()
    brain = nib.load(truth / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    # SNR 20 of the brain's mean magnitude: the air is Rayleigh noise of mean sigma sqrt(pi / 2)
    sigma = magnitude[brain].mean() / 20
    assert magnitude[labels == LABELS["background"]].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)
    # phase in rad at 7 T: the true total field (ppm) at 4 ms, within the noise (about 1 / SNR rad in the brain)
    total = nib.load(truth / "sub-01_desc-total_fieldmap.nii.gz").get_fdata()
    error = np.angle(np.exp(1j * (phase - ppm_to_rad(total, 0.004, 7.0))))[brain]
    assert np.median(np.abs(error)) < 0.1
    assert np.median(np.abs(np.angle(np.exp(1j * (phase - ppm_to_rad(total, 0.004, 3.0))))[brain])) > 0.3
    assert json.loads((anat / "sub-01_part-phase_T2starw.json").read_text())["MagneticFieldStrength"] == 7


def test_cli_logs_progress_without_verbose_and_detail_with_it(tmp_path, caplog):
    import logging

    small = ["--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]
    with caplog.at_level(logging.DEBUG):
        assert main([str(tmp_path / "a"), *small]) == 0
        assert logging.getLogger("qsmprep").level == logging.INFO
        assert "sub-01 simulated" in caplog.text
        assert main([str(tmp_path / "b"), *small, "-v"]) == 0
        assert logging.getLogger("qsmprep").level == logging.DEBUG
