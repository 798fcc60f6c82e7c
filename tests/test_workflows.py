"""Workflow construction for each option combination, node hints, sinks, and the thin interfaces."""

import importlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmprep.bids.derivatives import derivative_path
from qsmprep.bids.discovery import ENTITY_KEYS, GRERun
from qsmprep.config import Config, default_parameters, preset_methods
from qsmprep.physics import b0_dir_from_affine, b0_tilt_deg
from qsmprep.workflows.base import subject_of_node, subject_workflow_name, top_workflow_name


def _oblique_affine(deg, voxel=(3.0, 3.0, 4.0)):
    t = np.radians(deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(voxel)
    return tuple(tuple(float(v) for v in row) for row in affine)


def make_run(subject="01", session=None, tilt_deg=0.0, shape=(64, 64, 48), echoes=3, mask=None):
    anat = f"/data/sub-{subject}/" + (f"ses-{session}/" if session else "") + "anat/"
    prefix = anat + f"sub-{subject}" + (f"_ses-{session}" if session else "")
    return GRERun(
        subject, session, None, None, "MEGRE",
        magnitude=tuple(f"{prefix}_echo-{e}_part-mag_MEGRE.nii.gz" for e in range(1, echoes + 1)),
        phase=tuple(f"{prefix}_echo-{e}_part-phase_MEGRE.nii.gz" for e in range(1, echoes + 1)),
        echo_times_s=tuple(0.004 * e for e in range(1, echoes + 1)), phase_units="arbitrary", b0_tesla=3.0,
        b0_source="MagneticFieldStrength", shape=shape, affine=_oblique_affine(tilt_deg), mask=mask,
    )


def make_config(runs, **kwargs):
    config = Config(bids_dir="/data", output_dir="/out", work_dir="/work", **kwargs).resolve_parameters()
    config.runs = list(runs)
    return config


def _nodes(workflow):
    return {name.split(".")[-1] for name in workflow.list_node_names()}


COMMON_NODES = {"inputnode", "stack_magnitude", "phase_to_rad", "total_field", "bgremove", "merge_chimaps",
                "outputnode", "ds_mask", "ds_total_field", "ds_local_field", "merge_written"}


@pytest.mark.parametrize(
    ("options", "tilt", "extra", "absent"),
    [
        ({"inversion": ("tkd",)}, 0.0, {"brain_mask", "invert_tkd", "reference_tkd", "ds_chimap_tkd"},
         {"user_mask", "to_b0_aligned"}),
        ({"inversion": ("tkd", "cfl2", "ilsqr"), "bgremove": "pdf", "unwrap": "quality"}, 0.0,
         {"invert_tkd", "invert_cfl2", "invert_ilsqr", "ds_chimap_cfl2", "ds_chimap_ilsqr"}, {"to_b0_aligned"}),
        ({"inversion": ("ilsqr",), "bgremove": "resharp", "mask": "magnitude"}, 20.0,
         {"brain_mask", "invert_ilsqr"}, {"to_b0_aligned", "from_b0_aligned_ilsqr"}),
        ({"inversion": ("tkd", "ilsqr"), "resample_b0": True}, 20.0,
         {"to_b0_aligned", "from_b0_aligned_tkd", "from_b0_aligned_ilsqr"}, set()),
        ({"inversion": ("tkd",), "resample_b0": True}, 0.5, {"invert_tkd"}, {"to_b0_aligned"}),
        # deep resamples into its own frame: --resample-b0 leaves it on the acquisition grid
        ({"inversion": ("deep", "tkd"), "resample_b0": True}, 20.0, {"to_b0_aligned", "from_b0_aligned_tkd"},
         {"from_b0_aligned_deep"}),
        ({"inversion": ("deep",), "resample_b0": True}, 20.0, {"invert_deep"}, {"to_b0_aligned"}),
        ({"inversion": ("deep", "tkd")}, 0.0, {"invert_deep", "reference_deep", "ds_chimap_deep"}, set()),
    ],
)
def test_graph_for_each_option_combination(options, tilt, extra, absent):
    from qsmprep.workflows.base import init_qsmprep_wf

    run = make_run(tilt_deg=tilt)
    workflow = init_qsmprep_wf(make_config([run], **options))
    workflow._create_flat_graph()  # checks every connection
    nodes = _nodes(workflow)
    assert COMMON_NODES | extra <= nodes
    assert not absent & nodes
    assert {"report"} <= nodes
    assert len([n for n in nodes if n.startswith("ds_chimap_")]) == len(options["inversion"])
    # each chosen method reaches its node, with its own parameters
    run_wf = workflow.get_node("single_subject_01_wf").get_node("qsm_single_wf")
    assert run_wf.get_node("total_field").inputs.unwrap == options.get("unwrap", "laplacian")
    bgremove = options.get("bgremove", "vsharp")
    assert run_wf.get_node("bgremove").inputs.method == bgremove
    assert run_wf.get_node("bgremove").inputs.parameters == default_parameters("bgremove", bgremove)
    assert run_wf.get_node("brain_mask").inputs.strategy == options.get("mask", "quality")
    for method in options["inversion"]:
        assert run_wf.get_node(f"invert_{method}").inputs.method == method


@pytest.mark.parametrize(("version", "name"), [("0.1.0", "qsmprep_0_1_0_wf"),
                                               ("1.2.0.dev3+g1a2b", "qsmprep_1_2_0_dev3_g1a2b_wf")])
def test_the_work_folder_is_named_by_version(monkeypatch, version, name):
    """A work folder of an older version was reused after an upgrade, and a node whose outputs had been renamed
    since failed on its cached result; each version now works in its own folder."""
    from qsmprep.workflows import base

    monkeypatch.setattr(base, "__version__", version)
    assert base.init_qsmprep_wf(make_config([make_run("01")], inversion=("tkd",))).name == name


def test_user_mask_node_and_subject_layout(tmp_path):
    from qsmprep.workflows.base import init_qsmprep_wf

    masks = [_save(tmp_path / f"m{i}.nii.gz", np.ones((4, 4, 4))) for i in range(3)]
    runs = [make_run("01", "1", mask=masks[0]), make_run("01", "2", mask=masks[1]), make_run("02", mask=masks[2])]
    config = make_config(runs, inversion=("tkd",), mask=str(tmp_path))
    names = set(init_qsmprep_wf(config).list_node_names())
    assert "single_subject_01_wf.qsm_ses_1_wf.user_mask" in names
    assert "single_subject_01_wf.qsm_ses_2_wf.user_mask" in names
    assert "single_subject_02_wf.qsm_single_wf.user_mask" in names
    assert not any(n.endswith("brain_mask") for n in names)


def test_b0_direction_hints_and_override():
    from qsmprep.workflows.qsm import init_qsm_wf

    run = make_run(tilt_deg=15.0, shape=(100, 100, 80))
    wf = init_qsm_wf(run, make_config([run], inversion=("tkd", "ilsqr"), omp_nthreads=3))
    invert = wf.get_node("invert_ilsqr")
    expected = b0_dir_from_affine(np.asarray(run.affine))
    assert b0_tilt_deg(expected) == pytest.approx(15.0, abs=1e-6)
    assert invert.inputs.b0_dir == pytest.approx(expected)
    assert wf.get_node("bgremove").inputs.b0_dir == pytest.approx(expected)
    # resource hints: threads for FFT-heavy nodes; memory (checked against measurements in
    # test_declared_memory_covers_the_measured_peak) grows with the grid, above a floor of 0.1 GB
    assert invert.n_procs == 3 and wf.get_node("bgremove").n_procs == 3
    assert wf.get_node("stack_magnitude").mem_gb == 0.1  # the floor
    big = make_run(tilt_deg=15.0, shape=(200, 200, 160))  # 8 times the voxels
    big_wf = init_qsm_wf(big, make_config([big], inversion=("tkd", "ilsqr")))
    for name in ("invert_ilsqr", "total_field", "bgremove"):
        assert wf.get_node(name).mem_gb > 0.1
        assert big_wf.get_node(name).mem_gb == pytest.approx(8 * wf.get_node(name).mem_gb, rel=0.01)
    # --b0-dir overrides the affine (normalised); --resample-b0 inverts with B0 along k
    wf = init_qsm_wf(run, make_config([run], inversion=("tkd",), b0_dir=(0.0, 0.0, 2.0)))
    assert wf.get_node("invert_tkd").inputs.b0_dir == [0.0, 0.0, 1.0]
    wf = init_qsm_wf(run, make_config([run], inversion=("tkd", "deep"), resample_b0=True))
    assert wf.get_node("invert_tkd").inputs.b0_dir == [0.0, 0.0, 1.0]
    assert wf.get_node("invert_deep").inputs.b0_dir == pytest.approx(expected)
    sidecars = wf.get_node("qsm_derivatives_wf")
    # each sidecar's fields reach its sink with what its inversion node found as it ran (deep's device, the radius)
    assert sidecars.get_node("chimap_tkd_metadata").inputs.metadata["ResampledToB0AlignedGrid"] is True
    assert sidecars.get_node("chimap_deep_metadata").inputs.metadata["ResampledToB0AlignedGrid"] is False


def test_a_sidecar_gets_what_its_inversion_node_found_as_it_ran():
    """Deep's device is added and the high-pass radius used replaces the one asked for; a result an earlier qsmprep
    cached in the work folder has no details: the fields are left as they were, not {}."""
    from qsmprep.workflows.outputs import with_run_details

    cpu = {"Device": "cpu", "Name": "CPU", "NetworkPrecision": "float32"}
    metadata = {"Units": "ppm", "EstimationParameters": {"InversionMethod": "deep", "refine_radius_mm": 8.0}}
    assert with_run_details(metadata, cpu, {"refine_radius_mm": 5.0}) == {
        "Units": "ppm", "DeepInferenceDevice": cpu,
        "EstimationParameters": {"InversionMethod": "deep", "refine_radius_mm": 5.0}}
    assert metadata["EstimationParameters"]["refine_radius_mm"] == 8.0  # not changed in place
    assert with_run_details(metadata, {}, {}) == with_run_details(metadata) == metadata


def test_sinks_name_and_describe_outputs():
    from qsmprep.workflows.qsm import init_qsm_wf

    run = make_run("01", "2")
    config = make_config([run], inversion=("tkd", "cfl2"))
    wf = init_qsm_wf(run, config)
    ds = wf.get_node("qsm_derivatives_wf").get_node("ds_chimap_cfl2")
    assert (ds.inputs.desc, ds.inputs.suffix, ds.inputs.source_file) == ("cfl2", "Chimap", [run.magnitude[0]])
    meta = wf.get_node("qsm_derivatives_wf").get_node("chimap_cfl2_metadata").inputs.metadata
    assert meta["Units"] == "ppm" and meta["EstimationParameters"]["lam"] == 0.1
    mask_meta = wf.get_node("qsm_derivatives_wf").get_node("ds_mask").inputs.meta_dict  # the Chimap's gave a name only
    assert meta["EstimationParameters"]["MaskGeneration"] == mask_meta["MaskGeneration"]
    assert mask_meta["MaskGeneration"]["Method"] == config.mask_strategy and len(mask_meta["MaskGeneration"]) > 1
    assert meta["Sources"][0] == "bids:raw:sub-01/ses-2/anat/sub-01_ses-2_echo-1_part-mag_MEGRE.nii.gz"
    assert meta["EchoTime"] == pytest.approx([0.004, 0.008, 0.012]) and meta["SkullStripped"] is True
    total = wf.get_node("qsm_derivatives_wf").get_node("ds_total_field")
    assert (total.inputs.desc, total.inputs.suffix, total.inputs.meta_dict["Units"]) == ("total", "fieldmap", "Hz")


def test_methods_text_follows_the_options():
    from qsmprep.workflows.base import methods_text

    run = make_run(tilt_deg=20.0)
    text = methods_text(make_config([run], inversion=("tkd", "ilsqr"), bgremove="pdf", resample_b0=True))
    assert "threshold 0.19" in text and "Shmueli K" in text and "Liu T, Khalidov I" in text
    assert "tolerance 0.01, at most 50 iterations" in text and "oblique to B0 by more than 1.0 degrees" in text
    assert "Bilgic" not in text and "V-SHARP" not in text
    assert "deep inversion skipped this resampling" not in text
    text = methods_text(make_config([run], inversion=("deep", "tkd"), resample_b0=True))
    assert "oblique to B0" in text and "deep inversion skipped this resampling" in text
    assert "oblique to B0" not in methods_text(make_config([run], inversion=("deep",), resample_b0=True))


@pytest.mark.parametrize(("tilt", "voxel", "frame"), [
    (20.0, (3.0, 3.0, 4.0), "resampled (cubic B-splines) onto a grid whose third axis is along B0 with 1 x 1 x 1 mm "
                            "voxels, the model's training resolution, and the network's output back"),
    (20.0, (1.0, 1.0, 1.0), "along B0 at the acquisition's voxel size, and the network's output back"),
    (2.0, (1.0, 1.0, 1.1), "The network ran on the acquisition grid (B0 within 3 degrees of its third axis, voxel size "
                           "within 15% of the model's or taken as an input). The network output was"),
])
def test_methods_text_says_where_the_deep_network_ran(tilt, voxel, frame):
    """Beyond 3 degrees of tilt or 15 % of the shipped model's 1 mm the field is resampled into its frame."""
    from dataclasses import replace

    from qsmprep.workflows.base import methods_text

    run = replace(make_run(), affine=_oblique_affine(tilt, voxel))
    assert frame in methods_text(make_config([run], inversion=("deep",)))


def test_methods_text_follows_a_deep_resolution_tolerance_from_the_parameters():
    from dataclasses import replace

    from qsmprep.workflows.base import methods_text

    run = replace(make_run(), affine=_oblique_affine(0.0, (3.0, 3.0, 3.0)))
    config = make_config([run], inversion=("deep",), parameters={"inversion": {"deep": {"resolution_tolerance": 5}}})
    assert "voxel size within 500% of the model's or taken as an input" in methods_text(config)
    config = make_config([run], inversion=("deep",),
                         parameters={"inversion": {"deep": {"resolution_tolerance": float("inf")}}})
    assert "axis, the acquisition's voxel size kept, as asked). " in methods_text(config)  # it said "within inf%"


def test_an_infinite_parameter_is_written_as_strict_json(tmp_path):
    """``resolution_tolerance = inf`` (documented) was written as the token Infinity, which strict JSON parsers and
    BIDS tools refuse, in the deep Chimap's sidecar and in config.json."""
    from qsmprep.workflows.outputs import init_qsm_derivatives_wf

    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in the JSON"))

    config = make_config([make_run()], inversion=("deep",),
                         parameters={"inversion": {"deep": {"resolution_tolerance": float("inf")}}})
    sidecar = init_qsm_derivatives_wf(make_run(), config).get_node("chimap_deep_metadata").inputs.metadata
    assert strict(json.dumps(sidecar))["EstimationParameters"]["resolution_tolerance"] == "inf"
    written = strict(config.write(tmp_path / "config.json").read_text())
    assert written["parameters"]["inversion"]["deep"]["resolution_tolerance"] == "inf"


def test_methods_text_names_a_total_variation_term_in_the_refinement():
    from qsmprep.workflows.base import methods_text

    plain = methods_text(make_config([make_run()], inversion=("deep",)))
    assert "total variation" not in plain and "squared distance to the network output." in plain
    config = make_config([make_run()], inversion=("deep",), parameters={"inversion": {"deep": {"refine_tv_weight": 3e-4}}})
    assert ("squared distance to the network output, plus 0.0003 ppm mm times the total variation of chi (as in MEDI, "
            "Liu et al. 2011; gradients between brain voxels, smoothed by 0.001 ppm/mm, reweighted every 10 iterations "
            "by lagged diffusivity, Vogel and Oman 1996).") in methods_text(config)


def test_presets_and_parameters():
    assert preset_methods("fast") == ("laplacian", "vsharp", ("tkd",))
    assert preset_methods("default") == ("laplacian", "vsharp", ("deep",))  # the shipped model
    assert preset_methods("research")[2] == ("deep", "tkd", "cfl2", "ilsqr", "tv")
    assert default_parameters("inversion", "tkd") == {"threshold": 0.19, "pad_factor": 1.0}
    assert default_parameters("bgremove", "resharp")["radius_mm"] == 4.0


# ---------------------------------------------------------------- interfaces


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_phase_to_rad_and_stack_echoes(tmp_path):
    from qsmprep.interfaces.gre import PhaseToRad, StackEchoes

    files = [_save(tmp_path / f"p{e}.nii.gz", np.full((4, 4, 4), v)) for e, v in ((1, -4096), (2, 0), (3, 2048))]
    res = PhaseToRad(in_files=files, units="arbitrary").run(cwd=str(tmp_path))
    rad = nib.load(res.outputs.out_file).get_fdata()
    assert rad.shape == (4, 4, 4, 3)
    assert rad[0, 0, 0] == pytest.approx([-np.pi, 0.0, np.pi / 2], abs=1e-6)
    res = StackEchoes(in_files=files[:2]).run(cwd=str(tmp_path))
    assert nib.load(res.outputs.out_file).get_fdata()[1, 1, 1].tolist() == [-4096, 0]


def test_reference_to_mask(tmp_path):
    from qsmprep.interfaces.inversion import ReferenceToMask

    chi = np.zeros((6, 6, 6))
    chi[1:5, 1:5, 1:5] = np.arange(64).reshape(4, 4, 4) * 0.01
    mask = chi > 0.2
    res = ReferenceToMask(in_file=_save(tmp_path / "c.nii.gz", chi), mask=_save(tmp_path / "m.nii.gz", mask)).run(
        cwd=str(tmp_path))
    out = nib.load(res.outputs.out_file).get_fdata()
    assert res.outputs.mean_ppm == pytest.approx(chi[mask].mean(), abs=1e-6)
    assert out[mask].mean() == pytest.approx(0.0, abs=1e-6) and not out[~mask].any()


def test_b0_aligned_round_trip(tmp_path):
    from qsmprep.interfaces.inversion import FromB0Aligned, ToB0Aligned

    affine = np.asarray(_oblique_affine(20.0, (2.0, 2.0, 2.0)))
    idx = np.indices((32, 32, 32)).astype(float)
    field = np.exp(-((idx - 15.5) ** 2).sum(0) / (2 * 6.0**2))
    mask = ((idx - 15.5) ** 2).sum(0) < 12**2
    res = ToB0Aligned(local_field=_save(tmp_path / "f.nii.gz", field, affine),
                      mask=_save(tmp_path / "m.nii.gz", mask, affine)).run(cwd=str(tmp_path))
    aligned = nib.load(res.outputs.local_field)
    assert b0_tilt_deg(b0_dir_from_affine(aligned.affine)) == pytest.approx(0.0, abs=1e-6)
    back = FromB0Aligned(in_file=res.outputs.local_field, reference=str(tmp_path / "f.nii.gz")).run(cwd=str(tmp_path))
    recovered = nib.load(back.outputs.out_file).get_fdata()
    inner = ((idx - 15.5) ** 2).sum(0) < 9**2
    assert np.abs(recovered - field)[inner].max() < 0.02


@pytest.mark.parametrize("entities", [
    {},
    # rec- and ce- were missing from the derivatives' names: "sub-01_desc-brain_reconstruction-norm_mask.nii.gz"
    {"acquisition": "fast", "ceagent": "gd", "reconstruction": "norm", "run": "2", "chunk": "1"},
])
def test_derivatives_data_sink_writes_documented_names(tmp_path, entities):
    from qsmprep.interfaces.bids import DerivativesDataSink

    run = replace(make_run("01", "2"), **entities)
    keys = "".join(f"_{ENTITY_KEYS[k]}-{v}" for k, v in entities.items())
    source = tmp_path / "bids" / "sub-01" / "ses-2" / "anat" / f"sub-01_ses-2{keys}_echo-1_part-mag_MEGRE.nii.gz"
    source.parent.mkdir(parents=True)
    _save(source, np.zeros((4, 4, 4)))
    mask = _save(tmp_path / "mask.nii.gz", np.ones((4, 4, 4)))
    out = tmp_path / "out"
    out.mkdir()
    sink = DerivativesDataSink(base_directory=str(out), source_file=str(source), dismiss_entities=("echo", "part"),
                               desc="brain", suffix="mask", compress=True, meta_dict={"Type": "Brain"})
    sink.inputs.in_file = mask
    res = sink.run(cwd=str(tmp_path))
    assert Path(res.outputs.out_file) == out / derivative_path(run, "mask")
    assert Path(res.outputs.out_file).name == f"sub-01_ses-2{keys}_desc-brain_mask.nii.gz"
    assert nib.load(res.outputs.out_file).get_data_dtype() == np.uint8
    assert json.loads(Path(res.outputs.out_meta).read_text()) == {"Type": "Brain"}


def test_derivatives_data_sink_interrupted_while_writing_leaves_no_cut_short_file(tmp_path, monkeypatch):
    """Ctrl-C while niworkflows writes an image left the half-written file under its final name, where the report,
    the group level and other tools read it as the run's result."""
    import niworkflows.interfaces.bids as niworkflows_bids

    from qsmprep.interfaces.bids import DerivativesDataSink

    source = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_echo-1_part-mag_MEGRE.nii.gz"
    source.parent.mkdir(parents=True)
    _save(source, np.zeros((4, 4, 4)))
    out = tmp_path / "out"
    final = out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"an earlier run's mask")

    def interrupted(fname, header, data):
        Path(fname).write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(niworkflows_bids, "unsafe_write_nifti_header_and_data", interrupted)
    sink = DerivativesDataSink(base_directory=str(out), source_file=str(source), dismiss_entities=("echo", "part"),
                               desc="brain", suffix="mask", compress=True, meta_dict={"Type": "Brain"})
    sink.inputs.in_file = _save(tmp_path / "mask.nii.gz", np.ones((4, 4, 4)))
    with pytest.raises(KeyboardInterrupt):
        sink.run(cwd=str(tmp_path))
    assert final.read_bytes() == b"an earlier run's mask"  # not replaced by half an image
    assert sorted(p.name for p in out.rglob("*")) == ["anat", "sub-01", final.name]  # no staging folder left


# ---------------------------------------------------------------- declared memory vs measured peaks


def _peak_mb(interface, cwd):
    """Peak memory (MB) of running ``interface`` in this process, as traced by tracemalloc (numpy included)."""
    import tracemalloc

    cwd.mkdir()
    tracemalloc.start()
    try:
        result = interface.run(cwd=str(cwd))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak / 1e6, result


@pytest.fixture(scope="module")
def head64():
    from qsmprep.sim.phantom import head_phantom

    return head_phantom((64, 64, 64), (3.0, 3.0, 3.0), seed=0)


@pytest.mark.parametrize("echoes", [1, 4])
def test_declared_memory_covers_the_measured_peak(head64, tmp_path, monkeypatch, echoes):
    """Every node's mem_gb on a 64^3 grid is at least the peak its interface allocates there.

    The run is tilted 20 degrees from B0, so --resample-b0 inverts on a larger B0-aligned grid.
    Iterative solvers run a few iterations only: their memory does not grow with the iterations.
    """
    from qsmprep.interfaces.field import BrainMask, TotalField, UserMask
    from qsmprep.interfaces.gre import PhaseToRad, StackEchoes
    from qsmprep.sim.gre import phase_to_vendor_units, simulate_gre
    from qsmprep.workflows import qsm

    # preload what the interfaces import on first use, so module imports are not counted
    for module in ("bgremove", "inversion", "masking", "phase", "physics.resample"):
        importlib.import_module(f"qsmprep.{module}")

    tilt = np.radians(20.0)
    te_s = tuple(0.004 * e for e in range(1, echoes + 1))
    sim = simulate_gre(head64, te_s=te_s, b0_dir=(0.0, np.sin(tilt), np.cos(tilt)), snr=100, seed=0)

    def save(name, data, dtype=np.float32):
        path = tmp_path / "sub-01" / "anat" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data, dtype), sim.affine), str(path))
        return str(path)

    magnitude = [save(f"sub-01_echo-{e + 1}_part-mag_MEGRE.nii.gz", sim.magnitude[..., e]) for e in range(echoes)]
    phase = [save(f"sub-01_echo-{e + 1}_part-phase_MEGRE.nii.gz", phase_to_vendor_units(sim.phase_rad[..., e]),
                  np.int16) for e in range(echoes)]
    mask_file = save("sub-01_mask.nii.gz", sim.brain_mask, np.uint8)
    run = GRERun("01", None, None, None, "MEGRE", magnitude=tuple(magnitude), phase=tuple(phase), echo_times_s=te_s,
                 phase_units="arbitrary", b0_tesla=3.0, b0_source="MagneticFieldStrength", shape=(64, 64, 64),
                 affine=tuple(tuple(float(v) for v in row) for row in sim.affine), mask=mask_file)
    monkeypatch.setattr(qsm, "MIN_MEM_GB", 0.0)  # the 0.1 GB floor would cover every node of this small grid
    methods = ("tkd", "cfl2", "ilsqr", "tv")

    def config(**options):
        config = Config(bids_dir=str(tmp_path), output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                        **options).resolve_parameters()
        config.runs = [run]
        return config

    native, aligned = (qsm.init_qsm_wf(run, config(inversion=methods, resample_b0=resample)) for resample in (False, True))
    user_wf = qsm.init_qsm_wf(run, config(inversion=("tkd",), mask=mask_file))
    measured = []  # (node, measured MB, declared MB)

    def measure(wf, node, interface):
        peak, result = _peak_mb(interface, tmp_path / f"run{len(measured)}")
        method = getattr(interface.inputs, "method", None)
        label = node + (f" ({method})" if method in ("vsharp", "resharp", "pdf") else "")
        label += " on the B0-aligned grid" if wf is aligned else ""
        measured.append((label, peak, 1e3 * wf.get_node(node).mem_gb))
        return result.outputs

    stacked = measure(native, "stack_magnitude", StackEchoes(in_files=magnitude)).out_file
    phase_rad = measure(native, "phase_to_rad", PhaseToRad(in_files=phase, units="arbitrary")).out_file
    measure(native, "brain_mask",
            BrainMask(magnitude=stacked, phase_rad=phase_rad, te_s=list(te_s), strategy="quality"))
    measure(user_wf, "user_mask", UserMask(in_file=mask_file, reference=stacked))
    total = measure(native, "total_field", TotalField(phase_rad=phase_rad, magnitude=stacked, mask=mask_file,
                                                      te_s=list(te_s))).out_file
    if echoes > 1:  # the nodes after the total field hold one volume, whatever the echo count
        _measure_single_volume_nodes(measure, native, aligned, total, mask_file, methods)
        assert len(measured) == 19
    _check_peaks(measured)


def _measure_single_volume_nodes(measure, native, aligned, total, mask_file, methods):
    from qsmprep.interfaces.field import BackgroundRemoval
    from qsmprep.interfaces.inversion import DipoleInversion, FromB0Aligned, ReferenceToMask, ToB0Aligned

    b0_dir = native.get_node("bgremove").inputs.b0_dir
    for method, params in [("vsharp", {}), ("resharp", {"max_iter": 5}), ("pdf", {"max_iter": 5})]:
        local = measure(native, "bgremove", BackgroundRemoval(total_field=total, mask=mask_file, method=method,
                                                             parameters=params, b0_tesla=3.0, b0_dir=b0_dir))
    aligned_local = measure(aligned, "to_b0_aligned", ToB0Aligned(local_field=local.local_field, mask=local.mask))
    for method in methods:
        chi = measure(native, f"invert_{method}", DipoleInversion(local_field=local.local_field, mask=local.mask,
                                                                  method=method, b0_dir=b0_dir)).out_file
        chi_aligned = measure(aligned, f"invert_{method}", DipoleInversion(
            local_field=aligned_local.local_field, mask=aligned_local.mask, method=method, b0_dir=[0.0, 0.0, 1.0]))
    measure(aligned, "from_b0_aligned_ilsqr", FromB0Aligned(in_file=chi_aligned.out_file, reference=local.local_field))
    measure(native, "reference_ilsqr", ReferenceToMask(in_file=chi, mask=local.mask))


def _check_peaks(measured):
    over = [f"{node}: measured {peak:.1f} MB > declared {declared:.1f} MB" for node, peak, declared in measured
            if peak > declared]
    assert not over
    assert min(peak for _, peak, _ in measured) > 1.0  # the measurement sees the arrays (1 MB per volume)


def test_deep_node_declares_memory_for_the_grid_its_network_runs_on():
    """A 3 mm run is inverted by the 1 mm shipped model on a grid 27 times larger: its memory must follow."""
    from qsmprep.workflows.qsm import TORCH_BASE_GB, init_qsm_wf

    declared = {}
    for name, voxel in (("1mm", 1.0), ("3mm", 3.0)):
        run = replace(make_run(shape=(64, 64, 48)), affine=_oblique_affine(0.0, (voxel, voxel, voxel)))
        wf = init_qsm_wf(run, make_config([run], inversion=("deep", "tkd")))
        declared[name] = (wf.get_node("invert_deep").mem_gb - TORCH_BASE_GB, wf.get_node("invert_tkd").mem_gb)
    # the classical inversion works on the native grid: the same memory at either voxel size
    assert declared["3mm"][1] == declared["1mm"][1]
    # the deep inversion of the 3 mm run works on 192 x 192 x 144 voxels at 1 mm
    assert declared["3mm"][0] == pytest.approx(27 * declared["1mm"][0], rel=0.01)


def test_the_deep_node_hashes_its_model_files_content(tmp_path):
    """New weights under the same name or path (a qsmprep upgrade, a model retrained in place) re-run the node."""
    from qsmprep.deep import shipped_model_path
    from qsmprep.inversion.deep import DEFAULT_MODEL
    from qsmprep.workflows.qsm import init_qsm_wf

    run = make_run()
    node = init_qsm_wf(run, make_config([run], inversion=("deep",))).get_node("invert_deep")
    assert node.inputs.model_file == str(shipped_model_path(DEFAULT_MODEL))
    checkpoint = tmp_path / "net.safetensors"
    checkpoint.write_bytes(b"weights, first training")
    node.inputs.model_file = str(checkpoint)
    before = node.inputs.get_hashval(hash_method="content")[1]
    checkpoint.write_bytes(b"weights, second training")
    assert node.inputs.get_hashval(hash_method="content")[1] != before


def test_methods_text_names_mask_steps_too_small_for_the_voxels():
    from qsmprep.workflows.qsm import mask_steps_without_effect

    params = {"separate_mm": 4.0, "erode_mm": 3.0, "smooth_mm": 2.0}
    assert mask_steps_without_effect(params, (1.0, 1.0, 1.0)) == ""
    assert mask_steps_without_effect(params, (3.0, 3.0, 3.0)) == (
        " At this run's voxel size (3 x 3 x 3 mm) the opening by 2 mm reached no neighbouring voxel and had no effect.")
    everything = mask_steps_without_effect(params, (6.0, 6.0, 6.0))
    assert "the erosion by 4 mm before the largest component is kept, the erosion by 3 mm and the opening by 2 mm" in everything
    assert mask_steps_without_effect({**params, "smooth_mm": 0.0}, (3.0, 3.0, 3.0)) == ""  # 0: the step is off


WORKER_KILLED_SCRIPT = """
import sys
from nipype import Node, Workflow
from nipype.interfaces.utility import Function
from qsmprep.workflows.multiproc import MultiProcPlugin

def killed(x):  # as the out-of-memory killer ends a worker
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)

def doubled(x):
    return 2 * x

work = sys.argv[1]
wf = Workflow("lost", base_dir=work)
wf.config["execution"].update({"crashdump_dir": work, "crashfile_format": "txt"})
for name, function in (("killed", killed), ("doubled", doubled)):
    node = Node(Function(["x"], ["y"], function), name=name)
    node.inputs.x = 21
    wf.add_nodes([node])
try:
    # one worker: the other node runs before or after, on the pool that replaced the broken one (a node running
    # beside a killed worker fails with it: the executor stops the whole pool)
    wf.run(plugin=MultiProcPlugin(plugin_args={"n_procs": 1, "mp_context": "fork"}))
except RuntimeError as exc:
    print("failed:", exc)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="MultiProc forks its workers on Linux")
def test_a_node_whose_worker_process_dies_fails_instead_of_hanging_the_run(tmp_path):
    """Nipype's MultiProc waited for ever for a node whose worker was killed (the out-of-memory killer): qsmprep
    never ended. Its node now fails with the reason, and the nodes after it still run."""
    script = tmp_path / "lost.py"  # a file: Nipype's Function nodes read their functions' source
    script.write_text(WORKER_KILLED_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "failed:" in done.stdout, done.stdout + done.stderr
    crash = "".join(p.read_text() for p in tmp_path.glob("crash-*killed*.txt"))
    assert "WorkerLostError: its worker process ended without a result" in crash
    assert "out-of-memory killer" in crash
    from nipype.utils.filemanip import loadpkl

    assert loadpkl(tmp_path / "lost" / "doubled" / "result_doubled.pklz").outputs.y == 42


def test_a_node_whose_call_fails_in_the_pool_fails_with_that_error():
    """A future that ends in an exception other than a lost worker (a result that cannot be pickled) left Nipype
    waiting for ever for its result: the node now fails with the exception's text."""
    from concurrent.futures import Future

    from qsmprep.workflows.multiproc import MultiProcPlugin

    plugin = MultiProcPlugin(plugin_args={"n_procs": 1})
    failed = Future()
    failed.set_exception(TypeError("cannot pickle 'generator' object"))
    plugin._task_obj[3] = failed
    plugin._async_callback(failed)  # Nipype's own callback would raise here and record nothing
    assert plugin._get_result(3) == {"result": None, "taskid": 3, "traceback": ["TypeError: cannot pickle 'generator' object\n"]}
    finished = Future()
    finished.set_result({"result": "ok", "taskid": 4, "traceback": None})
    plugin._task_obj[4] = finished
    plugin._async_callback(finished)
    assert plugin._get_result(4)["result"] == "ok"


def test_the_subject_of_a_crashed_node_is_read_back_from_its_name():
    """The crash summary finds each failed node's subject from the name the subject workflow was given."""
    node = f"{top_workflow_name()}.{subject_workflow_name('pilot7')}.qsm_ses_a_run_1_wf.invert_deep"
    assert subject_of_node(node) == "pilot7"
    assert subject_of_node(subject_workflow_name("01")) == "01"
    assert subject_of_node(f"{top_workflow_name()}.datasink") is None
    assert subject_of_node("xsingle_subject_01_wfx.node") is None
