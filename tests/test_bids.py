"""BIDS discovery, validation and derivatives naming on tiny hand-made BIDS trees."""

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmprep.bids import check_bids_dataset, discover_runs, read_filter_file, validate_runs
from qsmprep.bids.derivatives import (bids_uri, logged_runs, processed_runs, refused_runs, run_output_paths,
                                     write_dataset_description)
from qsmprep.bids.discovery import GRERun
from qsmprep.bids.validation import acquisition_type
from qsmprep.errors import DataError, NoInputError, UsageError
from qsmprep.io import sidecar_path


def _write_image(path, shape=(6, 6, 5), affine=None, meta=None, echo=0):
    """A magnitude or phase image (by ``path``'s part) with its sidecar ``meta``. A phase evolves with its sidecar's
    EchoTime (a list for the volumes of a 4D file; 4 ms times ``echo`` and on without one that fits): an offset and
    a field of -40..40 Hz over the voxels, wrapped, so that each echo's phase differs and follows its echo time, as
    it does in data (two equal ones are refused, and so are ones that fit their echo times better exchanged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    voxels, volumes = int(np.prod(shape[:3])), int(np.prod(shape[3:]))
    if "_part-phase" in path.name:
        stated = (meta or {}).get("EchoTime")
        tes = stated if isinstance(stated, list) else [stated]
        if len(tes) != volumes or not all(isinstance(te, (int, float)) and te > 0 for te in tes):
            tes = [0.004 * (echo + k) for k in range(volumes)]
        offset, field_hz = np.linspace(-3.0, 3.0, voxels), np.linspace(-40.0, 40.0, voxels)
        data = np.stack([np.angle(np.exp(1j * (offset + 2 * np.pi * field_hz * te))) for te in tes], -1)
        if (meta or {}).get("Units") == "arbitrary":  # vendor integers over the -4096..4095 range
            data = np.clip(np.round(data * 4096 / np.pi), -4096, 4095)
    else:  # a magnitude
        data = np.repeat(np.linspace(0.1, 3.0, voxels)[:, np.newaxis], volumes, axis=1)
    nib.save(nib.Nifti1Image(data.astype(np.float32).reshape(shape), np.eye(4) if affine is None else affine), str(path))
    if meta is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
    return path


def make_run(root, sub="01", ses=None, entities="", echo_times=(0.004, 0.008), units="rad", b0=3.0,
             suffix="MEGRE", shape=(6, 6, 5), skip=(), echo_numbers=None):
    """Write one GRE run; ``skip`` holds (part, echo) pairs to leave out. Returns the anat folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + entities
    numbers = echo_numbers or range(1, len(echo_times) + 1)
    for echo, te in zip(numbers, echo_times):
        for part in ("mag", "phase"):
            if (part, echo) in skip:
                continue
            meta = {"EchoTime": te}
            if b0 is not None:
                meta["MagneticFieldStrength"] = b0
            if part == "phase" and units is not None:
                meta["Units"] = units
            echo_ent = f"_echo-{echo}" if len(echo_times) > 1 or suffix == "MEGRE" else ""
            _write_image(anat / f"{prefix}{echo_ent}_part-{part}_{suffix}.nii.gz", shape, meta=meta, echo=echo)
    return anat


def test_echoes_ordered_by_numeric_echo_time(tmp_path):
    tes = [0.002 * (i + 1) for i in range(11)]
    make_run(tmp_path, echo_times=tes)
    (run,) = discover_runs(tmp_path)
    numbers = [int(p.split("_echo-")[1].split("_")[0]) for p in run.magnitude]
    assert numbers == list(range(1, 12))  # echo-10, echo-11 after echo-9, not after echo-1
    (checked,), problems = validate_runs([run])
    assert problems == []
    assert checked.echo_times_s == pytest.approx(tes)
    assert checked.phase_units == "rad" and checked.b0_tesla == 3.0 and checked.shape == (6, 6, 5)


def test_echo_time_beats_echo_entity_for_order(tmp_path):
    # echo numbers that disagree with the echo times: EchoTime decides
    make_run(tmp_path, echo_times=(0.010, 0.005, 0.015), echo_numbers=(1, 2, 3))
    (run,) = discover_runs(tmp_path)
    assert [p.split("_echo-")[1][0] for p in run.phase] == ["2", "1", "3"]
    (checked,), _ = validate_runs([run])
    assert checked.echo_times_s == pytest.approx((0.005, 0.010, 0.015))


def test_grouping_by_session_acquisition_run_and_labels(tmp_path):
    make_run(tmp_path, sub="01", ses="1")
    make_run(tmp_path, sub="01", ses="2")
    make_run(tmp_path, sub="02", entities="_acq-fast_run-1")
    make_run(tmp_path, sub="02", entities="_acq-fast_run-2")
    names = [r.name for r in discover_runs(tmp_path)]
    assert names == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_acq-fast_run-1", "sub-02_acq-fast_run-2"]
    assert [r.name for r in discover_runs(tmp_path, participant_label=["sub-02"])] == names[2:]
    assert [r.name for r in discover_runs(tmp_path, session_label=["2"])] == ["sub-01_ses-2"]
    filters = tmp_path / "filter.json"
    filters.write_text(json.dumps({"megre": {"run": 2}}))
    assert [r.name for r in discover_runs(tmp_path, bids_filters=read_filter_file(filters))] == [names[3]]
    # the labels narrow a filter file's subject and session; they replaced them (ses-1 was run against {"session": "2"})
    assert [r.name for r in discover_runs(tmp_path, participant_label=["01", "02"],
                                          bids_filters={"subject": "01"})] == names[:2]
    with pytest.raises(NoInputError, match=r"--session-label 1 and the --bids-filter-file's session 2 select no "
                                           r"session in common: change one of them"):
        discover_runs(tmp_path, session_label=["1"], bids_filters={"session": "2"})
    assert [r.name for r in discover_runs(tmp_path, session_label=["1", "2"],
                                          bids_filters={"session": ["2"]})] == ["sub-01_ses-2"]
    # a null filter asks for files without a session: with --session-label it selects nothing (it was dropped, and
    # the labelled sessions were processed)
    with pytest.raises(NoInputError, match=r"--session-label 1 and the --bids-filter-file's session null \(files "
                                           r"without a session\) select no session in common"):
        discover_runs(tmp_path, session_label=["1"], bids_filters={"session": None})
    with pytest.raises(NoInputError, match=r"the --bids-filter-file's subject 'sub-01' not found in .* \(its subject "
                                           r"labels, without the 'sub-' prefix: 01, 02\)"):
        discover_runs(tmp_path, participant_label=["01"], bids_filters={"subject": "sub-01"})


def test_no_input_and_bad_filter_file(tmp_path):
    make_run(tmp_path)
    with pytest.raises(NoInputError, match=r"sub-07 not found in .* \(its subject labels: 01\): check "
                                           r"--participant-label") as err:
        discover_runs(tmp_path, participant_label=["07"])
    assert err.value.exit_code == 66
    # the labels the dataset has are listed, at most LABELS_SHOWN of them, and a prefixed miss is explained
    for sub in range(2, 13):
        make_run(tmp_path, sub=f"{sub:02d}")
    with pytest.raises(NoInputError, match=r"participant\(s\) sub-sub-1 not found in .* \(its subject labels, "
                                           r"without the 'sub-' prefix: 01, 02, 03, 04, 05, 06, 07, 08, 09, 10 and 2 "
                                           r"more\)"):
        discover_runs(tmp_path, participant_label=["sub-sub-1"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoInputError, match="no gradient-echo") as err:
        discover_runs(empty)
    assert err.value.exit_code == 66
    with pytest.raises(NoInputError):
        discover_runs(tmp_path / "missing")
    bad = tmp_path / "f.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="f.json is not valid JSON") as err:
        read_filter_file(bad)
    assert err.value.exit_code == 64
    bad.write_text('{"megre": {"echo": 1}, "t2starw": {"acquisition": "fast"}}')  # a filter that would filter nothing
    with pytest.raises(UsageError, match="f.json has keys qsmprep does not read \\('t2starw'\\): put the entities under"):
        read_filter_file(bad)


@pytest.mark.parametrize(
    ("entities", "texts"),
    [
        ({"foo": "bar"}, ["filters on 'foo', which pybids does not know as entities", "one of acquisition, ceagent"]),
        ({"acq": "fast"}, ["'acq' (did you mean 'acquisition'?)", "use the full entity names"]),
        ({"extension": ".json"}, ["filters on 'extension' with values outside qsmprep's own query", "choose among"]),
        ({"part": ["mag", "real"], "suffix": "MEGRE"}, ["filters on 'part' with values outside qsmprep's own query"]),
        # pybids reads an empty list as no filter: every run was processed
        ({"acquisition": [], "run": 1}, ["filters on 'acquisition' with an empty list, which would select every run"]),
        # one part alone: each run was then refused as data without a phase, blaming the data, not the filter
        ({"part": "mag"}, ["filters on 'part' 'mag', but every run needs its magnitude and its phase images"]),
        ({"part": ["phase"]}, ["filters on 'part' ['phase'], but every run", "remove 'part' from the filter"]),
    ],
)
def test_filter_file_entities_pybids_does_not_know_or_qsmprep_sets_are_refused(tmp_path, entities, texts):
    bad = tmp_path / "filter.json"
    bad.write_text(json.dumps({"megre": entities}))
    with pytest.raises(UsageError) as err:
        read_filter_file(bad)
    assert err.value.exit_code == 64
    assert str(err.value).startswith(f"BIDS filter file {bad} filters on ")
    assert all(text in str(err.value) for text in texts)


def test_a_filter_file_label_the_dataset_lacks_is_refused_as_participant_label_is(tmp_path):
    """{"subject": ["01", "2"]} processed sub-01 alone, exit 0, where --participant-label 01 2 exits 66."""
    make_run(tmp_path, sub="01", ses="a")
    make_run(tmp_path, sub="02", ses="a")
    for filters, text in (({"subject": ["01", 2]}, "the --bids-filter-file's subject '2' not found in "
                                                  f"{tmp_path.absolute()} (its subject labels: 01, 02): check the "
                                                  "filter file."),
                          ({"subject": "sub-01"}, "subject 'sub-01' not found"),
                          ({"session": ["a", "b"]}, "session 'b' not found in")):
        with pytest.raises(NoInputError) as err:
            discover_runs(tmp_path, bids_filters=filters)
        assert err.value.exit_code == 66 and text in str(err.value)
    assert [r.subject for r in discover_runs(tmp_path, bids_filters={"subject": ["01", "02"], "session": "a"})] == [
        "01", "02"]


def test_four_d_multi_echo_files(tmp_path):
    make_run(tmp_path)  # for dataset_description.json
    anat = tmp_path / "sub-02" / "anat"
    tes = [0.003, 0.006, 0.009]
    _write_image(anat / "sub-02_part-mag_GRE.nii.gz", (6, 6, 5, 3), meta={"EchoTime": tes, "MagneticFieldStrength": 7})
    _write_image(anat / "sub-02_part-phase_GRE.nii.gz", (6, 6, 5, 3),
                 meta={"EchoTime": tes, "MagneticFieldStrength": 7, "Units": "arbitrary"})
    run = [r for r in discover_runs(tmp_path) if r.subject == "02"][0]
    assert run.multi_echo_4d and len(run.magnitude) == 1
    (checked,), problems = validate_runs([run])
    assert problems == [] and checked.echo_times_s == pytest.approx(tes) and checked.b0_tesla == 7.0
    # a 4D file whose volume count disagrees with its EchoTime list is refused
    _write_image(anat / "sub-02_part-phase_GRE.nii.gz", (6, 6, 5, 2),
                 meta={"EchoTime": tes, "MagneticFieldStrength": 7, "Units": "arbitrary"})
    run = [r for r in discover_runs(tmp_path) if r.subject == "02"][0]
    _, (problem,) = validate_runs([run])
    assert "sub-02_part-phase_GRE.nii.gz holds 2 volume(s)" in problem.message
    # a 5D file is named as such, even with one volume (its count agreeing would make "holds 1 ... lists 1" no reason)
    _write_image(anat / "sub-02_part-phase_GRE.nii.gz", (6, 6, 5, 3, 1),
                 meta={"EchoTime": tes, "MagneticFieldStrength": 7, "Units": "arbitrary"})
    run = [r for r in discover_runs(tmp_path) if r.subject == "02"][0]
    _, (problem,) = validate_runs([run])
    assert "sub-02_part-phase_GRE.nii.gz is 5D, shape (6, 6, 5, 3, 1): give each echo as a 3D volume" in problem.message


def _problems(tmp_path, **kwargs):
    b0 = kwargs.pop("b0_override", None)
    make_run(tmp_path, **kwargs)
    valid, problems = validate_runs(discover_runs(tmp_path), b0_tesla=b0)
    return valid, problems


@pytest.mark.parametrize(
    ("kwargs", "file_part", "text"),
    [
        ({"units": None}, "_echo-1_part-phase_MEGRE.nii.gz", 'has no Units: set "Units" to "rad"'),
        ({"units": "degrees"}, "_echo-1_part-phase_MEGRE.nii.gz", "Units 'degrees', which qsmprep cannot interpret"),
        ({"b0": None}, "_echo-1_part-phase_MEGRE.nii.gz", "no MagneticFieldStrength"),
        ({"echo_times": (4.0, 8.0)}, "_echo-1_part-mag_MEGRE.nii.gz", "looks like milliseconds"),
        # 0.6 s passed this check and then failed inside the total-field node, after the run had started
        ({"echo_times": (0.004, 0.6)}, "_echo-2_part-mag_MEGRE.nii.gz",
         "EchoTime 0.6 is not a gradient-echo time in seconds (over 0 and at most 0.5 s): write it in seconds"),
        ({"echo_times": (0.004, 0.004)}, "_echo-1_part-phase_MEGRE.nii.gz", "same EchoTime"),
        ({"echo_times": (0.004,)}, "_echo-1_part-phase_MEGRE.nii.gz", "single echo but suffix MEGRE"),
        ({"skip": {("phase", 2)}}, "_echo-2_part-mag_MEGRE.nii.gz", "2 magnitude and 1 phase echo(es)"),
        ({"skip": {("mag", 1), ("mag", 2)}}, "_echo-1_part-phase_MEGRE.nii.gz", "no magnitude image (part-mag)"),
        ({"skip": {("phase", 1), ("phase", 2)}}, "_echo-1_part-mag_MEGRE.nii.gz", "no phase image (part-phase)"),
    ],
)
def test_each_problem_names_the_file_and_the_fix(tmp_path, kwargs, file_part, text):
    valid, problems = _problems(tmp_path, **kwargs)
    assert valid == []
    assert len(problems) >= 1
    problem = problems[0]
    assert problem.file.endswith("sub-01" + file_part)
    assert text in problem.message
    named = ("sub-01" + file_part, ("sub-01" + file_part).replace(".nii.gz", ".json"))
    assert any(name in problem.message for name in named)  # the image or its sidecar


def test_messages_name_the_inherited_sidecar_that_holds_the_value(tmp_path):
    """A value inherited from a sidecar higher up (BIDS inheritance: MEGRE.json at the root, part-phase_MEGRE.json in
    the subject's folder) was blamed on the sidecar beside the image, which does not hold it; where no sidecar holds
    the key, the one beside the image is named, where it would be added."""
    from qsmprep.bids.discovery import metadata_file

    anat = make_run(tmp_path, b0=None, units=None)
    (tmp_path / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 3000}))
    (tmp_path / "sub-01" / "part-phase_MEGRE.json").write_text(json.dumps({"Units": "degrees"}))
    (tmp_path / "sub-01" / "part-mag_MEGRE.json").write_text(json.dumps({"Units": "rad"}))  # not for phase images
    phase = anat / "sub-01_echo-1_part-phase_MEGRE.nii.gz"
    assert metadata_file(phase, "MagneticFieldStrength") == tmp_path / "MEGRE.json"
    assert metadata_file(phase, "Units") == tmp_path / "sub-01" / "part-phase_MEGRE.json"
    assert metadata_file(phase, "EchoTime") == anat / "sub-01_echo-1_part-phase_MEGRE.json"
    assert metadata_file(phase, "RepetitionTime") == anat / "sub-01_echo-1_part-phase_MEGRE.json"
    _, problems = validate_runs(discover_runs(tmp_path))
    messages = " ".join(problem.message for problem in problems)
    assert f"its JSON sidecar {tmp_path / 'sub-01' / 'part-phase_MEGRE.json'} has Units 'degrees'" in messages
    (tmp_path / "sub-01" / "part-phase_MEGRE.json").write_text(json.dumps({"Units": "rad"}))
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.message.startswith(f"{tmp_path / 'MEGRE.json'}: MagneticFieldStrength 3000 is not a field strength")


def test_disagreeing_or_invalid_field_strength_names_the_odd_sidecar(tmp_path):
    anat = make_run(tmp_path, echo_times=(0.004, 0.008, 0.012))
    odd = anat / "sub-01_echo-2_part-phase_MEGRE.json"
    odd.write_text(json.dumps({**json.loads(odd.read_text()), "MagneticFieldStrength": 1.5}))
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.file.endswith("sub-01_echo-2_part-phase_MEGRE.nii.gz")
    assert "disagree" in problem.message and "1.5 in " + str(odd) in problem.message
    assert "3.0 in " in problem.message and "and 4 more" in problem.message
    assert validate_runs(discover_runs(tmp_path), b0_tesla=3)[1] == []  # --b0-tesla settles it

    for sidecar in anat.glob("*.json"):
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "MagneticFieldStrength": -3}))
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert "MagneticFieldStrength -3 is not a field strength in tesla" in problem.message


def _set_in_sidecars(anat, pattern="*.json", **fields):
    """Add ``fields`` to every JSON sidecar of a run whose name matches ``pattern`` (None: remove the key)."""
    for sidecar in anat.glob(pattern):
        meta = {**json.loads(sidecar.read_text()), **fields}
        sidecar.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_the_proton_frequency_gives_the_field_strength_where_the_sidecars_state_it(tmp_path):
    """ppm is Hz over the Larmor frequency: a Siemens "3 T" magnet at 123.25 MHz is 2.8947 T, and the nominal 3 T
    scaled every susceptibility 3.5 % too low."""
    anat = make_run(tmp_path)
    (run,), _ = validate_runs(discover_runs(tmp_path))
    assert (run.b0_tesla, run.b0_source) == (3.0, "MagneticFieldStrength")
    _set_in_sidecars(anat, ImagingFrequency=123.25)
    (run,), _ = validate_runs(discover_runs(tmp_path))
    assert run.b0_source == "ImagingFrequency" and run.b0_tesla == pytest.approx(2.894723, abs=1e-6)
    assert validate_runs(discover_runs(tmp_path), b0_tesla=3.0)[0][0].b0_source == "--b0-tesla"
    _set_in_sidecars(anat, MagneticFieldStrength=None)  # the frequency alone is enough
    (run,), _ = validate_runs(discover_runs(tmp_path))
    assert run.b0_source == "ImagingFrequency" and run.b0_tesla == pytest.approx(2.894723, abs=1e-6)


def test_a_b0_tesla_the_sidecars_contradict_is_used_with_a_warning(tmp_path, caplog):
    """--b0-tesla 1.5 on 3 T data doubled every chi value without a word."""
    anat = make_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qsmprep.bids.validation"):
        (run,), _ = validate_runs(discover_runs(tmp_path), b0_tesla=1.5)
    assert (run.b0_tesla, run.b0_source) == (1.5, "--b0-tesla")
    assert "--b0-tesla 1.5 T, but " in caplog.text and "says MagneticFieldStrength 3 T;" in caplog.text
    caplog.clear()
    _set_in_sidecars(anat, ImagingFrequency=123.25)  # the magnet's frequency is named first
    with caplog.at_level(logging.WARNING, logger="qsmprep.bids.validation"):
        validate_runs(discover_runs(tmp_path), b0_tesla=7)
    assert "--b0-tesla 7 T, but " in caplog.text and "says ImagingFrequency 123.25 MHz (2.89 T)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qsmprep.bids.validation"):  # within 10 %: the nominal 3 T
        validate_runs(discover_runs(tmp_path), b0_tesla=3)
    assert "--b0-tesla" not in caplog.text


def test_a_two_d_acquisition_is_processed_with_a_warning_naming_its_sidecar(tmp_path, caplog):
    """The QSM consensus advises against 2D multi-slice GRE (a phase offset per slice): a warning, not a refusal."""
    anat = make_run(tmp_path)
    _set_in_sidecars(anat, MRAcquisitionType="3D")
    with caplog.at_level("WARNING", logger="qsmprep.bids.validation"):
        assert len(validate_runs(discover_runs(tmp_path))[0]) == 1
    assert "2D multi-slice" not in caplog.text
    _set_in_sidecars(anat, MRAcquisitionType="2D")
    with caplog.at_level("WARNING", logger="qsmprep.bids.validation"):
        (run,), problems = validate_runs(discover_runs(tmp_path))
    assert problems == [] and run.echo_times_s == (0.004, 0.008)
    (warning,) = [r.getMessage() for r in caplog.records if "2D multi-slice" in r.getMessage()]
    assert f'(MRAcquisitionType "2D" in the sidecars of {anat / "sub-01_echo-1_part-mag_MEGRE.nii.gz"}' in warning
    assert "check the local field and Chimap for steps between slices" in warning
    # sidecars that disagree: one 2D echo is enough to warn, naming it
    _set_in_sidecars(anat, MRAcquisitionType="3D")
    phase2 = anat / "sub-01_echo-2_part-phase_MEGRE.json"
    phase2.write_text(json.dumps({**json.loads(phase2.read_text()), "MRAcquisitionType": "2d"}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="qsmprep.bids.validation"):
        (run,), _ = validate_runs(discover_runs(tmp_path))
    assert acquisition_type(run) == ("2D", str(anat / "sub-01_echo-2_part-phase_MEGRE.nii.gz"))
    assert f"in the sidecars of {anat / 'sub-01_echo-2_part-phase_MEGRE.nii.gz'}" in caplog.text


def test_a_field_strength_beyond_floats_range_is_refused_not_a_crash(tmp_path):
    anat = make_run(tmp_path)
    _set_in_sidecars(anat, MagneticFieldStrength=10**400)
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert "is not a field strength in tesla" in problem.message


@pytest.mark.parametrize(("frequency", "nominal", "text"), [
    (123250000, 3, "ImagingFrequency 123250000 is not the magnet's proton frequency in MHz (it gives 2.895e+06 T, "
                   "not the MagneticFieldStrength 3 T)"),  # written in Hz
    (32.6, 3, "(it gives 0.7657 T, not the MagneticFieldStrength 3 T)"),  # sodium's frequency at 3 T
    (123250000, None, "(it gives 2.895e+06 T)"),
    ("123.25 MHz", 3, "ImagingFrequency '123.25 MHz' is not the magnet's proton frequency in MHz: fix it"),
    ([123.25, 123.25], 3, "ImagingFrequency [123.25, 123.25] is not the magnet's proton frequency in MHz"),  # crashed
])
def test_a_frequency_that_is_not_the_proton_one_names_the_sidecar(tmp_path, frequency, nominal, text):
    anat = make_run(tmp_path)
    _set_in_sidecars(anat, ImagingFrequency=frequency, MagneticFieldStrength=nominal)
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert text in problem.message and "or pass --b0-tesla" in problem.message
    assert str(anat / "sub-01_echo-1_part-mag_MEGRE.json") in problem.message


def test_disagreeing_frequencies_name_the_odd_sidecar(tmp_path):
    anat = make_run(tmp_path)
    _set_in_sidecars(anat, ImagingFrequency=123.25)
    odd = anat / "sub-01_echo-2_part-phase_MEGRE.json"
    odd.write_text(json.dumps({**json.loads(odd.read_text()), "ImagingFrequency": 127.7}))
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.file.endswith("sub-01_echo-2_part-phase_MEGRE.nii.gz")
    assert "disagree on ImagingFrequency (123.25 in " in problem.message and f"127.7 in {odd}" in problem.message


def test_missing_echo_time_names_the_sidecar(tmp_path):
    anat = make_run(tmp_path)
    sidecar = anat / "sub-01_echo-2_part-mag_MEGRE.json"
    sidecar.write_text(json.dumps({"MagneticFieldStrength": 3}))
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.file.endswith("sub-01_echo-2_part-mag_MEGRE.nii.gz")
    assert f"no numeric EchoTime in its JSON sidecar {sidecar}: add" in problem.message
    # no sidecar at all: said so, not "no EchoTime in" a file that is not there
    phase = anat / "sub-01_echo-2_part-phase_MEGRE.json"
    phase.unlink()
    sidecar.write_text(json.dumps({"MagneticFieldStrength": 3, "EchoTime": 0.008}))
    _, problems = validate_runs(discover_runs(tmp_path))
    messages = [problem.message for problem in problems]
    assert f"no numeric EchoTime in its JSON sidecar {phase} (missing; no sidecar above it in the dataset gives " \
           "EchoTime either): add" in messages[0]
    assert f"its JSON sidecar {phase} (missing; no sidecar above it in the dataset gives Units either) has no " \
           "Units" in messages[1]


def test_missing_echoes_are_warned_about_and_the_others_processed(tmp_path, caplog):
    """Echo 2 lost on export (both files): the run was processed with three echoes without a word."""
    make_run(tmp_path, echo_times=(0.004, 0.012, 0.016), echo_numbers=(1, 3, 4))
    with caplog.at_level(logging.WARNING):
        (checked,), problems = validate_runs(discover_runs(tmp_path))
    assert problems == [] and checked.echo_times_s == (0.004, 0.012, 0.016)
    assert "sub-01: 3 echo(es) found, but no files for echo-2: processing the echoes found" in caplog.text
    caplog.clear()
    _set_in_sidecars(tmp_path / "sub-01" / "anat", EchoTrainLength=5)
    with caplog.at_level(logging.WARNING):
        validate_runs(discover_runs(tmp_path))
    assert "but no files for echo-2 and its sidecars say EchoTrainLength 5:" in caplog.text
    caplog.clear()
    make_run(tmp_path / "complete", echo_times=(0.004, 0.008, 0.012))
    _set_in_sidecars(tmp_path / "complete" / "sub-01" / "anat", EchoTrainLength=3)
    with caplog.at_level(logging.WARNING):
        validate_runs(discover_runs(tmp_path / "complete"))
    assert "echo(es) found" not in caplog.text


def test_an_image_that_is_a_broken_link_says_how_to_fetch_it(tmp_path):
    """A DataLad dataset whose content was not fetched holds links to nothing; the message said "re-export it"."""
    anat = make_run(tmp_path)
    image = anat / "sub-01_echo-2_part-phase_MEGRE.nii.gz"
    image.unlink()
    image.symlink_to("../../.git/annex/objects/XX/SHA256E-s1--x.nii.gz")
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.file == str(image) and problem.message.startswith(
        f"image {image} is a symbolic link to ../../.git/annex/objects/XX/SHA256E-s1--x.nii.gz, which is not there: in "
        f"a DataLad dataset fetch the content first (datalad get {image})")


def test_a_degenerate_affine_is_reported_with_the_file(tmp_path):
    anat = make_run(tmp_path)
    degenerate = np.eye(4)
    degenerate[:3, 2] = degenerate[:3, 1]  # the k axis repeats the j axis
    for path in sorted(anat.glob("*.nii.gz")):
        nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj), degenerate), path)
    valid, problems = validate_runs(discover_runs(tmp_path))
    assert valid == [] and len(problems) == 1
    assert problems[0].file.endswith("echo-1_part-mag_MEGRE.nii.gz")
    assert "has a degenerate affine" in problems[0].message and "sform/qform" in problems[0].message


def test_every_sidecar_with_echo_times_in_milliseconds_is_named(tmp_path):
    make_run(tmp_path, echo_times=(4.0, 8.0))
    _, problems = validate_runs(discover_runs(tmp_path))
    named = sorted(Path(p.file).name for p in problems)
    assert named == [f"sub-01_echo-{e}_part-{part}_MEGRE.nii.gz" for e in (1, 2) for part in ("mag", "phase")]
    assert [p.message.split(": EchoTime ")[1][:3] for p in problems if "echo-2" in p.file] == ["8.0", "8.0"]
    assert all("looks like milliseconds" in p.message for p in problems)


@pytest.mark.parametrize("suffix", ["MEGRE", "T2starw"])
@pytest.mark.parametrize("listed", [[0.008, 0.012], []])
def test_a_list_of_echo_times_beside_an_image_of_one_echo_names_its_sidecar(tmp_path, suffix, listed):
    """Two echo times beside one echo's image crashed (exit 70, IndexError); an empty list passed a T2starw run as
    a single echo, which then failed in the brain mask node, and a MEGRE run was refused as a single echo naming
    another file. A one-element list, read as its number, is accepted."""
    anat = make_run(tmp_path, suffix=suffix)
    _set_in_sidecars(anat, "*_echo-1_*.json", EchoTime=[0.004])
    _set_in_sidecars(anat, "*_echo-2_*.json", EchoTime=listed)
    valid, problems = validate_runs(discover_runs(tmp_path))
    assert valid == [] and [Path(p.file).name for p in problems] == [
        f"sub-01_echo-2_part-{part}_{suffix}.nii.gz" for part in ("mag", "phase")]
    for problem in problems:
        assert problem.message.startswith(f"{problem.file}: its JSON sidecar {sidecar_path(problem.file)} has "
                                          f'"EchoTime": {listed}, but an image of one echo needs exactly one EchoTime, '
                                          "in seconds")
    _set_in_sidecars(anat, "*_echo-2_*.json", EchoTime=[0.008])
    (run,), problems = validate_runs(discover_runs(tmp_path))
    assert problems == [] and run.echo_times_s == (0.004, 0.008)


def test_b0_override_and_single_echo_t2starw_are_accepted(tmp_path):
    valid, problems = _problems(tmp_path, b0=None, b0_override=7.0)
    assert problems == [] and valid[0].b0_tesla == 7.0
    other = tmp_path / "single"
    make_run(other, echo_times=(0.02,), suffix="T2starw")
    (run,), problems = validate_runs(discover_runs(other))
    assert problems == [] and run.echo_times_s == (0.02,) and run.suffix == "T2starw"


def test_an_echo_missing_one_part_names_that_echos_file(tmp_path):
    make_run(tmp_path, echo_times=(0.004, 0.008, 0.012), skip={("phase", 2)})
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.file.endswith("sub-01_echo-2_part-mag_MEGRE.nii.gz")
    assert problem.message.startswith(f"{problem.file}: no part-phase image of echo 2 (sub-01 has 3 magnitude and 2 ")
    assert "add sub-01_echo-2_part-phase_MEGRE.nii.gz beside it" in problem.message


def test_an_echo_given_twice_names_both_files(tmp_path):
    anat = make_run(tmp_path, echo_times=(0.004, 0.008, 0.012))
    gz = anat / "sub-01_echo-2_part-phase_MEGRE.nii.gz"
    plain = gz.with_name(gz.name.replace(".nii.gz", ".nii"))
    nib.save(nib.load(gz), plain)
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert valid == [] and problem.file == str(gz)
    assert problem.message.startswith(f"{plain} and {gz} are both the part-phase image of echo 2 of sub-01: keep one")
    assert '--bids-filter-file, e.g. {"megre": {"extension": ".nii.gz"}}' in problem.message


def test_echo_labels_pair_by_number(tmp_path):
    """BIDS reads echo-02 as echo 2: a phase labelled so pairs with the magnitude labelled echo-2."""
    anat = make_run(tmp_path)
    for ext in (".nii.gz", ".json"):
        (anat / f"sub-01_echo-2_part-phase_MEGRE{ext}").rename(anat / f"sub-01_echo-02_part-phase_MEGRE{ext}")
    (run,), problems = validate_runs(discover_runs(tmp_path))
    assert problems == [] and run.echo_times_s == (0.004, 0.008)


def test_runs_differing_only_in_suffix_are_refused_and_other_runs_proceed(tmp_path):
    multi = make_run(tmp_path, sub="01")
    single = make_run(tmp_path, sub="01", echo_times=(0.02,), suffix="T2starw")
    make_run(tmp_path, sub="02")
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert [run.name for run in valid] == ["sub-02"]
    assert problem.run == "sub-01" and problem.file == str(multi / "sub-01_echo-1_part-mag_MEGRE.nii.gz")
    assert (f"the MEGRE run ({multi / 'sub-01_echo-1_part-mag_MEGRE.nii.gz'} and 3 more) and the T2starw run "
            f"({single / 'sub-01_part-mag_T2starw.nii.gz'} and 1 more) have the same entities") in problem.message
    assert "give one of them an acq-<label> or run-<index> entity" in problem.message
    assert 'chosen with --bids-filter-file (e.g. {"megre": {"suffix": "MEGRE"}})' in problem.message
    # that filter narrows qsmprep's own query, so it is accepted and leaves the T2starw run out
    (tmp_path / "f.json").write_text('{"megre": {"suffix": "MEGRE"}}')
    filters = read_filter_file(tmp_path / "f.json")
    valid, problems = validate_runs(discover_runs(tmp_path, bids_filters=filters))
    assert [(run.name, run.suffix) for run in valid] == [("sub-01", "MEGRE"), ("sub-02", "MEGRE")] and problems == []


@pytest.mark.parametrize("shape", [(6, 6), (6, 6, 1), (6, 2, 6)])
def test_a_2d_image_is_a_problem_of_its_run_and_other_runs_proceed(tmp_path, shape):
    make_run(tmp_path, sub="01")
    anat = make_run(tmp_path, sub="02", shape=shape)
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert [run.name for run in valid] == ["sub-01"]
    assert problem.file == str(anat / "sub-02_echo-1_part-mag_MEGRE.nii.gz")
    assert problem.message.startswith(f"{problem.file} has shape {shape}, not a volume: give each echo as a 3D volume "
                                      "of at least 3 voxels along each axis")


def test_grid_mismatch_is_reported_and_other_runs_proceed(tmp_path):
    make_run(tmp_path, sub="01")
    anat = make_run(tmp_path, sub="02")
    _write_image(anat / "sub-02_echo-2_part-phase_MEGRE.nii.gz", (6, 6, 4))
    anat3 = make_run(tmp_path, sub="03")
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    _write_image(anat3 / "sub-03_echo-1_part-phase_MEGRE.nii.gz", affine=shifted)
    valid, problems = validate_runs(discover_runs(tmp_path))
    assert [r.name for r in valid] == ["sub-01"]
    assert [p.run for p in problems] == ["sub-02", "sub-03"]
    assert problems[0].file.endswith("sub-02_echo-2_part-phase_MEGRE.nii.gz")
    assert "has shape (6, 6, 4) but" in problems[0].message
    assert "different affines" in problems[1].message and problems[1].file.endswith("sub-03_echo-1_part-phase_MEGRE.nii.gz")


def test_user_mask_file_and_folder(tmp_path):
    make_run(tmp_path / "bids")
    (run,) = discover_runs(tmp_path / "bids")
    good = _write_data(tmp_path / "m.nii.gz", (_ramp(-1, 1) > 0).astype(np.uint8))
    (checked,), _ = validate_runs([run], mask=good)
    assert checked.mask == str(good)
    bad = _write_image(tmp_path / "bad.nii.gz", (5, 5, 5))
    _, (problem,) = validate_runs([run], mask=bad)
    assert problem.file == str(bad) and "has shape (5, 5, 5)" in problem.message
    deriv = tmp_path / "deriv"
    _, (problem,) = validate_runs([run], mask=deriv)
    assert "no mask for sub-01" in problem.message
    (deriv / "sub-01" / "anat").mkdir(parents=True)
    found = _write_data(deriv / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz", (_ramp(-1, 1) > 0).astype(np.uint8))
    (checked,), _ = validate_runs([run], mask=deriv)
    assert checked.mask == str(found)


def test_light_bids_check(tmp_path):
    with pytest.raises(DataError, match="dataset_description.json") as err:
        check_bids_dataset(tmp_path)
    assert err.value.exit_code == 65
    anat = make_run(tmp_path)
    (anat / "notes.txt").write_text("x")
    assert check_bids_dataset(tmp_path) == ["sub-01/anat/notes.txt"]


def test_derivative_names_and_description(tmp_path):
    run = GRERun("01", "2", "fast", "1", "MEGRE")
    paths = run_output_paths(run, ["tkd", "ilsqr"])
    prefix = "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_run-1"
    assert paths == {
        "mask": f"{prefix}_desc-brain_mask.nii.gz",
        "total_field": f"{prefix}_desc-total_fieldmap.nii.gz",
        "local_field": f"{prefix}_desc-local_fieldmap.nii.gz",
        "chimap:tkd": f"{prefix}_desc-tkd_Chimap.nii.gz",
        "chimap:ilsqr": f"{prefix}_desc-ilsqr_Chimap.nii.gz",
    }
    assert run_output_paths(GRERun("02", None, None, None, "GRE"), [])["mask"] == "sub-02/anat/sub-02_desc-brain_mask.nii.gz"
    desc = json.loads(write_dataset_description(tmp_path / "out", tmp_path / "bids").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qsmprep"
    assert desc["DatasetLinks"]["raw"] == (tmp_path / "bids").as_uri()
    assert desc["SourceDatasets"] == [{"URL": (tmp_path / "bids").as_uri()}]
    assert "logs/" in (tmp_path / "out" / ".bidsignore").read_text().split()
    assert bids_uri(tmp_path / "bids" / "sub-01" / "anat" / "x.nii.gz", tmp_path / "bids") == "bids:raw:sub-01/anat/x.nii.gz"


def test_every_phase_sidecar_without_units_is_named(tmp_path):
    """Only the first was named, so a user fixed the files one run of qsmprep at a time."""
    valid, problems = _problems(tmp_path, units=None, echo_times=(0.004, 0.008, 0.012))
    assert valid == []
    assert [Path(p.file).name for p in problems] == [f"sub-01_echo-{n}_part-phase_MEGRE.nii.gz" for n in (1, 2, 3)]
    assert all('has no Units: set "Units" to "rad"' in p.message for p in problems)


def test_reconstructions_and_contrast_agents_are_runs_of_their_own(tmp_path):
    """rec-/ce- images of one acquisition were grouped into one run (each echo twice) and named without them."""
    for entities in ("_rec-norm", "_rec-orig", "_ce-gd_rec-norm", "_acq-fast_chunk-2"):
        make_run(tmp_path, entities=entities)
    runs = discover_runs(tmp_path)
    assert [run.name for run in runs] == ["sub-01_acq-fast_chunk-2", "sub-01_ce-gd_rec-norm", "sub-01_rec-norm",
                                          "sub-01_rec-orig"]
    valid, problems = validate_runs(runs)
    assert problems == [] and [len(run.magnitude) for run in valid] == [2, 2, 2, 2]
    assert all(f"{run.name}_echo-1_part-mag" in run.magnitude[0] for run in valid)
    assert run_output_paths(valid[1], [])["mask"] == "sub-01/anat/sub-01_ce-gd_rec-norm_desc-brain_mask.nii.gz"


def test_an_entity_a_gradient_echo_image_does_not_take_is_refused(tmp_path):
    """flip-1 and flip-2 images would be one run with every echo twice, named without flip."""
    for entities in ("_flip-1", "_flip-2_mt-on"):
        make_run(tmp_path, entities=entities)
    (run,) = discover_runs(tmp_path)
    valid, problems = validate_runs([run])
    assert valid == [] and len(problems) == 1
    assert problems[0].message.endswith(
        "_flip-1_echo-1_part-mag_MEGRE.nii.gz: entities flip-1, flip-2, mt-on in this run's file names are not "
        "among those BIDS gives gradient-echo images (sub, ses, acq, ce, rec, run, chunk, echo, part), so qsmprep "
        "cannot tell its runs apart or name their derivatives: rename the files, e.g. with acq-<label> in its place.")


def test_processed_runs_are_found_by_any_of_their_derivatives(tmp_path):
    """A run is found by any of its outputs (a hand-deleted brain mask left it out of the group table), with the
    outputs present; another tool's file, a name that is no run's, and a run's file in another run's folder are
    not runs."""
    runs = [GRERun("01", "2", "fast", "1", "MEGRE"), GRERun("01", None, None, None, "GRE")]
    written = {runs[0].name: {"mask", "local_field", "chimap:tkd"}, runs[1].name: {"chimap:cfl2"}}
    for run in runs:
        assert run_output_paths(run, [])["mask"].endswith(run.name + "_desc-brain_mask.nii.gz")
        for key, path in run_output_paths(run, ["tkd", "cfl2"]).items():
            if key in written[run.name]:
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / path).touch()
    for stray in ("notarun_desc-brain_mask", "sub-02_desc-tkd_Chimap", "sub-01_ses-3_desc-brain_mask",
                  "sub-01_desc-preproc_T1w"):
        (tmp_path / "sub-01" / "anat" / f"{stray}.nii.gz").touch()
    found = processed_runs(tmp_path, "01", ["tkd", "cfl2"])
    assert sorted(found) == ["sub-01", "sub-01_ses-2_acq-fast_run-1"]
    for run in runs:
        assert found[run.name] == {key: tmp_path / path for key, path in run_output_paths(run, ["tkd", "cfl2"]).items()
                                   if key in written[run.name]}
    assert processed_runs(tmp_path, "02", ["tkd"]) == {}


def test_logged_runs_are_those_of_the_last_participant_run_that_processed_each(tmp_path):
    """Each run's methods are those of the last invocation that processed it (it deleted the run's earlier outputs);
    a --boilerplate-only invocation processed nothing; a config.json that is no JSON object is named with the fix."""
    def config(run_id, names, inversion, **extra):
        path = tmp_path / "logs" / run_id / "config.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"runs": [{"name": name} for name in names], "inversion": inversion, **extra}))
        return path

    config("20260101-000000_aaaa", ["sub-01", "sub-02"], ["tkd"])
    config("20260102-000000_bbbb", ["sub-02"], ["tkd", "ilsqr"], boilerplate_only=False)
    config("20260103-000000_cccc", ["sub-01"], ["tv"], boilerplate_only=True)
    assert logged_runs(tmp_path) == {"sub-01": (("tkd",), "logs/20260101-000000_aaaa"),
                                     "sub-02": (("tkd", "ilsqr"), "logs/20260102-000000_bbbb")}
    broken = config("20260104-000000_dddd", [], [])
    broken.write_text('{"runs": [')
    with pytest.raises(DataError, match=f"the configuration of a qsmprep run {broken} is not valid JSON .*: restore "
                                        "it, or delete its folder if that run processed nothing."):
        logged_runs(tmp_path)
    assert logged_runs(tmp_path / "nothing") == {}


def test_refused_runs_are_those_the_last_participant_run_naming_them_refused(tmp_path):
    """A run is refused until a later invocation processes it; one refused after being processed is refused; the
    messages of its problems are joined; --boilerplate-only invocations count for nothing."""
    def config(run_id, names, problems, **extra):
        path = tmp_path / "logs" / run_id / "config.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"runs": [{"name": name} for name in names], "inversion": ["tkd"], **extra,
                                    "problems": [{"run": run, "message": text} for run, text in problems]}))

    config("20260101-000000_aaaa", ["sub-01"], [("sub-02", "a.json: bad."), ("sub-02", "b.nii.gz: bad"),
                                                ("sub-03", "c.json: bad")])
    config("20260102-000000_bbbb", ["sub-02"], [("sub-01", "d.json: bad")])
    config("20260103-000000_cccc", ["sub-01"], [("sub-02", "e.json: bad")], boilerplate_only=True)
    assert refused_runs(tmp_path) == {"sub-01": ("d.json: bad", "logs/20260102-000000_bbbb"),
                                      "sub-03": ("c.json: bad", "logs/20260101-000000_aaaa")}
    config("20260104-000000_dddd", ["sub-01", "sub-03"], [])
    assert refused_runs(tmp_path) == {}
    assert refused_runs(tmp_path / "nothing") == {}


# ------------------------------------------------ image content: truncated files, NaN, phase that misfits its Units


def _write_data(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))
    return path


def _ramp(low, high, dtype=np.float32, shape=(6, 6, 5)):
    """Values spread evenly from ``low`` to ``high`` (like wrapped phase with noise)."""
    return np.linspace(low, high, int(np.prod(shape))).reshape(shape).astype(dtype)


@pytest.mark.parametrize(
    ("units", "data", "texts"),
    [
        ("rad", _ramp(-180, 179.9), ["look like degrees", "multiply by pi/180"]),
        ("rad", _ramp(-4096, 4095, np.int16), ["whole numbers", 'set "Units" to "arbitrary"']),
        ("arbitrary", _ramp(0, 4095, np.int16), ["unsigned 12-bit", "x * pi / 2048 - pi", 'set "Units" to "rad"']),
        ("rad", _ramp(0, 4095, np.int16), ["unsigned 12-bit", "x * pi / 2048 - pi"]),
        ("arbitrary", _ramp(-3.1, 3.1), ["not whole numbers", 'set "Units" to "rad"']),
        ("rad", _ramp(-40.0, 55.0), ["outside [-pi, 2pi]", "not unwrapped or rescaled"]),
    ],
)
def test_phase_values_that_misfit_units_are_refused(tmp_path, units, data, texts):
    anat = make_run(tmp_path, units=units)
    phase = _write_data(anat / "sub-01_echo-1_part-phase_MEGRE.nii.gz", data)
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert valid == [] and problem.file == str(phase)
    assert problem.message.startswith(f"{phase}: phase values")
    for text in texts:
        assert text in problem.message
    if "Units" in " ".join(texts):
        assert str(anat / "sub-01_echo-1_part-phase_MEGRE.json") in problem.message


def test_phase_of_every_echo_out_of_its_units_range_is_named_at_once(tmp_path):
    """A conversion gives every echo the same wrong range, and the message named the first echo only: fixing it as
    told, the next run named the second, and then said "phase echoes mix Units" naming no file."""
    anat = make_run(tmp_path, echo_times=(0.004, 0.008, 0.012), units="arbitrary")
    phases = [_write_data(anat / f"sub-01_echo-{echo}_part-phase_MEGRE.nii.gz", np.roll(_ramp(0, 4095, np.int16), echo))
              for echo in (1, 2, 3)]
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.file == str(phases[0]) and "unsigned 12-bit" in problem.message
    assert problem.message.endswith(f" The same holds for {phases[1]}, {phases[2]}.")
    sidecar = anat / "sub-01_echo-1_part-phase_MEGRE.json"  # the first echo converted to radians, as the fix says
    _write_data(phases[0], np.roll(_ramp(-np.pi, np.pi - 0.01), 1))
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "Units": "rad"}))
    _, (problem,) = validate_runs(discover_runs(tmp_path))
    assert problem.file == str(phases[0]) and problem.message == (
        f"sub-01: its phase echoes mix Units ('rad' in {sidecar}; 'arbitrary' in "
        f"{anat / 'sub-01_echo-2_part-phase_MEGRE.json'} and 1 more): store every echo's phase in one unit, and give "
        "its sidecars that Units.")


@pytest.mark.parametrize(
    ("units", "low", "high", "dtype", "texts"),
    [("arbitrary", -3142, 3141, np.int16, ["77% of the range -4096..4095", "milliradians", "x * pi / M"]),
     ("arbitrary", -2048, 2047, np.int16, ["50% of the range -4096..4095"]),
     ("rad", -1.0, 1.0, np.float32, ["32% of a 2-pi cycle", "divided by pi"])],
)
def test_phase_rescaled_in_every_echo_is_refused(tmp_path, units, low, high, dtype, texts):
    """Phase that fits its Units file by file but spans too little of a cycle over the run's echoes (GE-style
    milliradians, half the Siemens range, radians / pi) was read as declared: field and chi scaled by 0.77, 0.5
    or 1/pi, exit 0."""
    anat = make_run(tmp_path, units=units)
    for echo in (1, 2):
        _write_data(anat / f"sub-01_echo-{echo}_part-phase_MEGRE.nii.gz", np.roll(_ramp(low, high, dtype), echo))
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert valid == [] and problem.file == str(anat / "sub-01_echo-1_part-phase_MEGRE.nii.gz")
    assert problem.message.startswith(f"sub-01: the phase of its 2 image(s) spans {low:g}..{high:g}, ")
    for text in [*texts, 'set "Units" to "rad"']:
        assert text in problem.message


@pytest.mark.parametrize(
    ("units", "data"),
    [("rad", _ramp(-np.pi, np.pi)), ("rad", _ramp(0, 2 * np.pi)), ("arbitrary", _ramp(-4096, 4095, np.int16)),
     ("arbitrary", _ramp(-4096, 4094, np.float32))],
)
def test_phase_values_that_fit_units_are_accepted(tmp_path, units, data):
    anat = make_run(tmp_path, units=units)
    _write_data(anat / "sub-01_echo-2_part-phase_MEGRE.nii.gz", data)
    (run,), problems = validate_runs(discover_runs(tmp_path))
    assert problems == [] and run.phase_units == units


@pytest.mark.parametrize("part", ["mag", "phase"])
def test_nan_in_an_echo_is_refused(tmp_path, part):
    anat = make_run(tmp_path)
    data = np.zeros((6, 6, 5), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    bad = _write_data(anat / f"sub-01_echo-2_part-{part}_MEGRE.nii.gz", data)
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert valid == [] and problem.file == str(bad)
    assert f"{bad} has 2 NaN or infinite voxel(s)" in problem.message and "re-export" in problem.message


@pytest.mark.parametrize(("part", "value", "text"), [("mag", 0.0, "no signal"), ("phase", 0.0, "no phase information"),
                                                     ("phase", 1.5, "no phase information")])
def test_an_empty_echo_is_refused(tmp_path, part, value, text):
    anat = make_run(tmp_path)
    bad = _write_data(anat / f"sub-01_echo-2_part-{part}_MEGRE.nii.gz", np.full((6, 6, 5), value, np.float32))
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert valid == [] and problem.file == str(bad)
    assert f"{bad} holds the single value {value:g} in every voxel, so it has {text}" in problem.message


def test_the_phase_of_one_echo_copied_to_another_is_refused(tmp_path):
    """Two echoes with one phase image (one copied or exported twice) gave a Chimap of round-off noise, exit 0, and a
    report advising --invert-phase."""
    anat = make_run(tmp_path, echo_times=(0.004, 0.008, 0.012))
    first, third = (anat / f"sub-01_echo-{e}_part-phase_MEGRE.nii.gz" for e in (1, 3))
    own_phase = third.read_bytes()
    third.write_bytes(first.read_bytes())
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert valid == [] and problem.file == str(third)
    assert problem.message.startswith(f"sub-01: {third} holds the same phase, voxel for voxel, as {first}, though ")
    assert "one echo was probably copied or exported twice" in problem.message
    stored = nib.Nifti1Image(np.round(nib.load(first).get_fdata() / 0.001).astype(np.int16) + 100, np.eye(4))
    stored.header.set_slope_inter(0.001, -0.1)  # vendor integers with a scaling, as a converter writes them
    nib.save(stored, str(first))
    for dtype in (np.float64, np.float32):  # the copy re-saved as floats of its values
        _write_data(third, nib.load(first).get_fdata().astype(dtype))
        valid, (problem,) = validate_runs(discover_runs(tmp_path))
        assert valid == [] and problem.message.startswith(f"sub-01: {third} holds the same phase, voxel for voxel, as ")
    third.write_bytes(own_phase)  # its own phase: accepted
    (run,), problems = validate_runs(discover_runs(tmp_path))
    assert problems == [] and run.echo_times_s == (0.004, 0.008, 0.012)


def test_phase_images_paired_with_the_wrong_echo_time_are_refused(tmp_path):
    """Two echoes' phase images exchanged (their sidecars and magnitudes in place) gave a wrong Chimap, exit 0, and a
    report advising --invert-phase."""
    anat = make_run(tmp_path, echo_times=(0.004, 0.008, 0.012, 0.016))
    (checked,), problems = validate_runs(discover_runs(tmp_path))
    assert problems == []
    second, third = (anat / f"sub-01_echo-{e}_part-phase_MEGRE.nii.gz" for e in (2, 3))
    data = second.read_bytes()
    second.write_bytes(third.read_bytes())
    third.write_bytes(data)
    valid, (problem,) = validate_runs(discover_runs(tmp_path))
    assert valid == [] and problem.file == str(second)
    assert problem.message.startswith(f"sub-01: the phase images of echo times 8 ms ({second}) and 12 ms ({third}) "
                                      "follow the echo times ")
    assert "each is probably paired with the other's EchoTime and magnitude" in problem.message
    # the volumes of a 4D file: named by volume
    anat = tmp_path / "sub-02" / "anat"
    tes = [0.003, 0.006, 0.009]
    meta = {"EchoTime": tes, "MagneticFieldStrength": 3}
    _write_image(anat / "sub-02_part-mag_T2starw.nii.gz", (6, 6, 5, 3), meta=meta)
    phase = _write_image(anat / "sub-02_part-phase_T2starw.nii.gz", (6, 6, 5, 3), meta={**meta, "Units": "rad"})
    assert validate_runs(discover_runs(tmp_path, participant_label=["02"]))[1] == []
    _write_data(phase, nib.load(phase).get_fdata()[..., [1, 0, 2]])
    valid, (problem,) = validate_runs(discover_runs(tmp_path, participant_label=["02"]))
    assert valid == [] and f"echo times 3 ms ({phase}, volume 1) and 6 ms ({phase}, volume 2)" in problem.message


def test_two_equal_echoes_of_a_4d_phase_file_are_refused(tmp_path):
    make_run(tmp_path)  # for dataset_description.json
    anat = tmp_path / "sub-02" / "anat"
    meta = {"EchoTime": [0.004, 0.008], "MagneticFieldStrength": 3}
    _write_image(anat / "sub-02_part-mag_T2starw.nii.gz", (6, 6, 5, 2), meta=meta)
    phase = _write_image(anat / "sub-02_part-phase_T2starw.nii.gz", (6, 6, 5, 2), meta={**meta, "Units": "rad"})
    (checked,), problems = validate_runs(discover_runs(tmp_path, participant_label=["02"]))
    assert problems == [] and checked.multi_echo_4d
    _write_data(phase, np.stack([_ramp(-3, 3)] * 2, axis=-1))
    valid, (problem,) = validate_runs(discover_runs(tmp_path, participant_label=["02"]))
    assert valid == [] and problem.file == str(phase)
    assert problem.message.startswith(f"sub-02: volume 2 of {phase} holds the same phase, voxel for voxel, as "
                                      f"volume 1 of {phase}, though ")


def _real_part(shape=(6, 6, 5)):
    """The real part of a complex image: a magnitude times the cosine of a phase that spans a cycle."""
    return _ramp(0.1, 3.0, shape=shape) * np.cos(_ramp(-3, 3, shape=shape))


def _round_off(shape=(6, 6, 5)):
    """A magnitude with the negative values reconstruction filters leave: down to 5 % of the largest value, and one
    voxel (under 1 % of the signal) down to 30 %."""
    data = _ramp(0.1, 3.0, shape=shape)
    data[0, :, 0] = -0.15
    data[1, 1, 1] = -0.9
    return data


@pytest.mark.parametrize(("data", "share"), [(_real_part(), "33%"), (-_ramp(0.1, 3.0), "100%"), (_round_off(), None)])
def test_a_magnitude_with_negative_signal_is_refused(tmp_path, data, share):
    """The real part of a complex image exported as part-mag was processed: a poorer Chimap (122 % NRMSE instead of
    67 %), exit 0. The small negative values of a filtered magnitude are accepted."""
    anat = make_run(tmp_path)
    bad = _write_data(anat / "sub-01_echo-1_part-mag_MEGRE.nii.gz", data)
    valid, problems = validate_runs(discover_runs(tmp_path))
    if share is None:
        assert problems == [] and len(valid) == 1
        return
    (problem,) = problems
    assert valid == [] and problem.file == str(bad)
    assert problem.message.startswith(f"{bad}: {share} of its signal voxels (those beyond 10% of its largest absolute "
                                      "value) are negative, but a magnitude image is |z| and never negative: the real "
                                      "part (or another signed image) was probably exported as part-mag")


def test_truncated_image_is_refused_before_processing(tmp_path):
    make_run(tmp_path / "bids", sub="01")
    anat = make_run(tmp_path / "bids", sub="02", shape=(30, 30, 30))
    truncated = _write_data(anat / "sub-02_echo-2_part-phase_MEGRE.nii.gz", _ramp(-3, 3, shape=(30, 30, 30)))
    content = truncated.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])  # an interrupted copy: the header still reads
    valid, (problem,) = validate_runs(discover_runs(tmp_path / "bids"))
    assert [r.name for r in valid] == ["sub-01"] and problem.file == str(truncated)
    assert "is not a readable NIfTI file" in problem.message and "re-export" in problem.message
    truncated.write_bytes(b"not a NIfTI header")  # the header itself is unreadable: the same message, from io
    valid, (problem,) = validate_runs(discover_runs(tmp_path / "bids"))
    assert problem.message.startswith(f"image {truncated} is not a readable NIfTI file (")
    assert problem.message.endswith("): re-export it as .nii or .nii.gz.")


def test_user_mask_must_be_3d_and_readable(tmp_path):
    make_run(tmp_path / "bids")
    (run,) = discover_runs(tmp_path / "bids")
    four_d = _write_image(tmp_path / "m4d.nii.gz", (6, 6, 5, 2))
    _, (problem,) = validate_runs([run], mask=four_d)
    assert problem.file == str(four_d) and "has shape (6, 6, 5, 2): give a single 3D mask" in problem.message
    other_grid = _write_image(tmp_path / "m8.nii.gz", (6, 6, 8))  # the fix is to resample the mask, not the run
    _, (problem,) = validate_runs([run], mask=other_grid)
    assert problem.message.endswith(f"has shape (6, 6, 8) but {run.magnitude[0]} has (6, 6, 5): resample {other_grid} "
                                    f"onto the grid of {run.magnitude[0]} with nearest-neighbour interpolation.")
    _write_data(tmp_path / "singleton.nii.gz", (_ramp(-1, 1, shape=(6, 6, 5, 1)) > 0).astype(np.uint8))
    (checked,), _ = validate_runs([run], mask=tmp_path / "singleton.nii.gz")
    assert checked.mask.endswith("singleton.nii.gz")
    # a mask that would select nothing, or everything a threshold > 0 keeps, is refused before any work
    for name, data, message in (
        ("empty", np.zeros((6, 6, 5)), "is empty (no voxel > 0): give a mask that covers the brain"),
        ("nan", np.where(_ramp(-1, 1) > 0, 1.0, np.nan), "has 90 NaN or infinite voxels"),
        ("probability", _ramp(0.05, 1), "not whole numbers: give a binary brain mask (threshold a probability map"),
    ):
        bad = _write_data(tmp_path / f"{name}.nii.gz", data.astype(np.float32))
        _, (problem,) = validate_runs([run], mask=bad)
        assert problem.file == str(bad) and message in problem.message, name
    truncated = _write_data(tmp_path / "cut.nii.gz", _ramp(0, 1, shape=(6, 6, 5)))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    _, (problem,) = validate_runs([run], mask=truncated)
    assert problem.file == str(truncated) and "not a readable NIfTI" in problem.message


def test_invalid_json_sidecar_names_the_file(tmp_path):
    anat = make_run(tmp_path)
    sidecar = anat / "sub-01_echo-1_part-phase_MEGRE.json"
    sidecar.write_text('{"EchoTime": 0.004, "Units": "rad",}')
    with pytest.raises(DataError) as err:
        discover_runs(tmp_path)
    assert err.value.exit_code == 65
    assert f"JSON sidecar {sidecar} is not valid JSON" in str(err.value) and "fix it" in str(err.value)


def test_unknown_session_and_unreadable_filter_file(tmp_path):
    make_run(tmp_path, ses="1")
    with pytest.raises(NoInputError, match=r"session\(s\) ses-9 not found .* \(its session labels: 1\): check "
                                           r"--session-label"):
        discover_runs(tmp_path, session_label=["ses-1", "9"])
    assert len(discover_runs(tmp_path, session_label=["1"])) == 1
    binary = tmp_path / "filter.json"
    binary.write_bytes(b"\x1f\x8b\x08\x00binary")
    with pytest.raises(UsageError, match=r"BIDS filter file .*filter.json is not UTF-8 text \(byte 0x8b at offset 1\)"):
        read_filter_file(binary)
    binary.write_bytes(b'\xef\xbb\xbf{"megre": {"acquisition": "fast"}}')  # a byte-order mark is no syntax error
    assert read_filter_file(binary) == {"acquisition": "fast"}
    with pytest.raises(UsageError, match="cannot be read"):
        read_filter_file(tmp_path)


def test_real_and_imaginary_images_are_named_with_the_conversion_when_no_magnitude_and_phase_are_found(tmp_path):
    """A dataset exported as part-real/part-imag got only "no gradient-echo magnitude/phase images found"."""
    anat = make_run(tmp_path)
    for path in anat.glob("*_part-*"):
        path.rename(path.with_name(path.name.replace("part-mag", "part-real").replace("part-phase", "part-imag")))
    with pytest.raises(NoInputError, match=r"The 4 image\(s\) stored as real and imaginary parts \(e.g. .*"
                       r"sub-01_echo-1_part-imag_MEGRE.nii.gz\) are not read: convert each echo to magnitude") as err:
        discover_runs(tmp_path)
    assert err.value.exit_code == 66
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    with pytest.raises(NoInputError) as err:  # without such images the message says nothing of them
        discover_runs(tmp_path / "other")
    assert "real and imaginary" not in str(err.value)


def test_a_subject_of_images_qsmprep_cannot_read_is_refused_with_the_fix_not_skipped(tmp_path):
    """Beside a subject with a usable run, a subject stored as real and imaginary parts, or without part entities, was
    skipped without a word (exit 0); a magnitude-only T2starw beside a usable run is still left alone."""
    make_run(tmp_path, sub="01")
    make_run(tmp_path, sub="01", suffix="T2starw", echo_times=(0.02,), skip=(("phase", 1),))
    t2starw = next(tmp_path.glob("sub-01/anat/*_T2starw.nii.gz"))
    t2starw.rename(t2starw.with_name("sub-01_T2starw.nii.gz"))  # no part entity: a magnitude-only anatomy
    anat = make_run(tmp_path, sub="02")
    for path in anat.glob("*_part-*"):
        path.rename(path.with_name(path.name.replace("part-mag", "part-real").replace("part-phase", "part-imag")))
    anat = make_run(tmp_path, sub="03")
    for path in anat.glob("*_part-*"):
        path.rename(path.with_name(path.name.replace("_part-mag", "").replace("_part-phase", "_acq-x")))
    runs = discover_runs(tmp_path)
    assert [run.name for run in runs] == ["sub-01", "sub-02", "sub-03", "sub-03_acq-x"]
    valid, problems = validate_runs(runs)
    assert [run.name for run in valid] == ["sub-01"]
    messages = {problem.run: problem.message for problem in problems}
    assert messages["sub-02"].startswith(str(anat.parent.parent / "sub-02" / "anat" / "sub-02_echo-1_part-imag_MEGRE.nii.gz"))
    assert "sub-02 is stored as real and imaginary parts (part-real, part-imag), which qsmprep does not read: " \
           "convert each echo to magnitude |real + i imag| (part-mag) and phase atan2(imag, real)" in messages["sub-02"]
    assert messages["sub-03"].endswith("sub-03's images have no part entity, and sub-03 has no magnitude or phase "
                                       "image: name the magnitude images with part-mag and the phase images with "
                                       "part-phase (an image without a part entity is not read as either).")


def test_swapped_magnitude_and_phase_are_suggested_by_the_phase_problem(tmp_path):
    """Images swapped between part-mag and part-phase were refused with "set Units", then "spans 18 % of a cycle",
    never naming the swap."""
    anat = make_run(tmp_path)
    for echo in (1, 2):
        mag, phase = (anat / f"sub-01_echo-{echo}_part-{part}_MEGRE.nii.gz" for part in ("mag", "phase"))
        mag_data, phase_data = nib.load(mag).get_fdata(), nib.load(phase).get_fdata()
        nib.save(nib.Nifti1Image(phase_data.astype(np.float32), np.eye(4)), mag)
        nib.save(nib.Nifti1Image((mag_data * (1.1 - 0.1 * echo)).astype(np.float32), np.eye(4)), phase)  # T2* decay
    (run,) = discover_runs(tmp_path)
    _, (problem,) = validate_runs([run])
    assert "spans 0.09..3, 46% of a 2-pi cycle" in problem.message
    assert problem.message.endswith("magnitude and phase may be swapped; check each file's part entity first.")
    make_run(tmp_path / "divided", units="rad")  # phase divided by pi: the magnitudes are positive, no hint
    for path in (tmp_path / "divided").glob("sub-01/anat/*_part-phase_MEGRE.nii.gz"):
        nib.save(nib.Nifti1Image((nib.load(path).get_fdata() / np.pi).astype(np.float32), np.eye(4)), path)
    _, (problem,) = validate_runs(discover_runs(tmp_path / "divided"))
    assert "not radians as the sidecars say" in problem.message and "swapped" not in problem.message
