"""The methods text (CITATION.md, the report's Methods): each statement true of what the options make qsmprep run."""

import json
from dataclasses import replace
from importlib.metadata import version

import numpy as np
import pytest
import torch

from qsmprep.bids.discovery import GRERun
from qsmprep.config import Config


def _affine(tilt_deg=0.0, voxel=(3.0, 3.0, 4.0)):
    """A slab tilted ``tilt_deg`` about the L-R axis (B0, world z, is that far from its third voxel axis)."""
    t = np.radians(tilt_deg)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]) @ np.diag(voxel)
    return tuple(tuple(float(v) for v in row) for row in affine)


def _run(tilt_deg=0.0, voxel=(3.0, 3.0, 4.0), echo_times_s=(0.004, 0.008, 0.012), b0_tesla=3.0,
         b0_source="MagneticFieldStrength"):
    anat = "/data/sub-01/anat/sub-01"
    echoes = range(1, len(echo_times_s) + 1)
    return GRERun("01", None, None, None, "MEGRE",
                  magnitude=tuple(f"{anat}_echo-{e}_part-mag_MEGRE.nii.gz" for e in echoes),
                  phase=tuple(f"{anat}_echo-{e}_part-phase_MEGRE.nii.gz" for e in echoes),
                  echo_times_s=tuple(echo_times_s), phase_units="arbitrary", b0_tesla=b0_tesla, b0_source=b0_source,
                  shape=(64, 64, 48),
                  affine=_affine(tilt_deg, voxel))


def _text(run=None, **options):
    """``methods_text`` of one run processed with ``options`` (Config fields)."""
    from qsmprep.workflows.base import methods_text

    config = Config(bids_dir="/data", output_dir="/out", work_dir="/work", **options).resolve_parameters()
    config.runs = [run or _run()]
    return methods_text(config)


def test_b0_strength_and_direction_say_where_they_came_from():
    """--b0-tesla and --b0-dir change the field scaling and every dipole kernel: the text named neither."""
    assert ("The run described here had 3 echoes (4, 8 and 12 ms) at 3 T, acquired with 64 x 64 x 48 voxels of 3 x 3 "
            "x 4 mm. The field strength was read from MagneticFieldStrength in the sidecars; B0's direction, 20.0 "
            "degrees from the third voxel axis, was taken from the image orientation (the NIfTI affine).") in _text(
        _run(tilt_deg=20.0), inversion=("tkd",))
    text = _text(_run(b0_tesla=7.0, b0_source="--b0-tesla"), inversion=("tkd",), b0_tesla=7.0, b0_dir=(0.0, 0.1, 1.0))
    assert ("at 7 T, acquired with 64 x 64 x 48 voxels of 3 x 3 x 4 mm. The field strength was given with --b0-tesla, "
            "overriding the sidecars; B0's direction, 5.7 degrees from the third voxel axis, "
            "was given with --b0-dir as (0, 0.1, 1) in voxel coordinates.") in text
    # a Siemens "3 T" magnet's proton frequency, 123.25 MHz: 2.895 T scaled the field
    siemens = replace(_run(b0_tesla=123.25 / 42.57747892, b0_source="ImagingFrequency"),
                      magnitude_meta=({"ImagingFrequency": 123.25, "MagneticFieldStrength": 3},))
    assert ("at 2.895 T, acquired with 64 x 64 x 48 voxels of 3 x 3 x 4 mm. The field strength was computed from the "
            "proton resonance frequency in the sidecars (ImagingFrequency, 123.2500 MHz) divided by 42.5775 MHz/T, "
            "rather than taken from their nominal MagneticFieldStrength; B0's direction") in _text(siemens, inversion=("tkd",))
    # sidecars with the frequency alone: no nominal strength is named
    alone = replace(siemens, magnitude_meta=({"ImagingFrequency": 123.25},))
    assert "divided by 42.5775 MHz/T; B0's direction" in _text(alone, inversion=("tkd",))


def test_the_acquisition_is_described_from_the_sidecars():
    """The ISMRM QSM consensus (MRM 2024) asks a paper for scanner, 2D/3D, TR, flip angle, acceleration, partial
    Fourier, grid and voxel size: the text gave only echo times and field strength."""
    meta = {"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma", "MRAcquisitionType": "3D",
            "RepetitionTime": 0.03, "FlipAngle": 15, "ParallelReductionFactorInPlane": 2, "PartialFourier": 0.875,
            "EchoTime": 0.004}
    text = _text(replace(_run(voxel=(0.75, 0.75, 2.0)), magnitude_meta=(meta,)), inversion=("tkd",))
    assert ("had 3 echoes (4, 8 and 12 ms) at 3 T, acquired on a Siemens Prisma scanner (3D acquisition, repetition "
            "time 30 ms, flip angle 15 degrees, in-plane acceleration 2, partial Fourier 0.875) with 64 x 64 x 48 "
            "voxels of 0.75 x 0.75 x 2 mm.") in text
    partial = {"Manufacturer": " ", "RepetitionTime": "30 ms", "FlipAngle": True, "MRAcquisitionType": " 2d ",
               "PartialFourier": 10**400}  # a hand-edited int beyond float's range crashed the number checks
    text = _text(replace(_run(), magnitude_meta=(partial,)), inversion=("tkd",))  # unusable values are left out
    assert "at 3 T, acquired (2D acquisition) with 64 x 64 x 48 voxels of 3 x 3 x 4 mm." in text
    assert "phase images (combined over the receive coils before qsmprep, which takes them as given)" in text


def test_the_total_variation_inversion_states_its_weight_iterations_and_high_pass():
    text = _text(inversion=("tv",))
    assert ("Susceptibility was computed by total-variation regularised least squares: the squared misfit between the "
            "modelled and the measured local field in the brain mask, both fields high-passed (their spherical mean "
            "over 8 mm subtracted") in text  # the pipeline's default, qsmprep.config.PIPELINE_PARAMETERS
    assert "plus 0.002 ppm mm times the total variation of chi" in text and "at most 50 conjugate-gradient" in text
    assert "Rudin LI, Osher S, Fatemi E." in text and "Vogel CR, Oman ME." in text and "Liu T, Liu J," in text
    text = _text(inversion=("tv",), parameters={"inversion": {"tv": {"harmonic_radius_mm": 0, "alpha": 0.004}}})
    assert "high-passed" not in text and "plus 0.004 ppm mm times" in text


def test_paragraphs_of_runs_that_differ_name_their_runs():
    """Each paragraph opened "The runs described here" without naming any run."""
    from dataclasses import replace

    from qsmprep.workflows.base import methods_text

    config = Config(bids_dir="/data", output_dir="/out", work_dir="/work", inversion=("tkd",)).resolve_parameters()
    config.runs = [_run(), replace(_run(tilt_deg=20.0), subject="02"), replace(_run(), subject="03")]
    text = methods_text(config)
    assert "The runs described here" not in text
    assert text.count("had 3 echoes") == 2
    assert "Runs sub-01 and sub-03 had 3 echoes (4, 8 and 12 ms) at 3 T, acquired" in text
    assert "Run sub-02 had 3 echoes (4, 8 and 12 ms) at 3 T, acquired" in text and "20.0 degrees from the third" in text
    config.runs = [_run(), replace(_run(), subject="03")]  # runs alike: one paragraph, as before
    assert "The runs described here had 3 echoes" in methods_text(config)


def test_echo_times_are_listed_in_order_of_echo_time():
    """A 4D file's EchoTime list may run backwards; the text says the echoes were ordered by echo time."""
    assert "had 3 echoes (4, 8 and 12 ms)" in _text(_run(echo_times_s=(0.012, 0.008, 0.004)), inversion=("tkd",))


def test_the_software_versions_include_the_numerical_libraries():
    text = _text(inversion=("tkd",))
    assert (f"built on Nipype {version('nipype')} (Gorgolewski et al. 2011), with NumPy {version('numpy')}, SciPy "
            f"{version('scipy')} and scikit-image {version('scikit-image')}.") in text


@pytest.mark.parametrize(("voxel", "kernels"), [
    ((3.0, 3.0, 4.0), "with spherical kernels of 12 and 8 mm (12 mm down to twice the largest voxel dimension, in "
                      "steps of about one voxel) and a deconvolution threshold of 0.05"),
    ((1.5, 1.5, 1.5), "with spherical kernels of 12, 10.5, 9, 7.5, 6, 4.5 and 3 mm (12 mm down"),
    ((7.0, 7.0, 7.0), "with a spherical kernel of 14 mm (twice the largest voxel dimension) and"),
])
def test_vsharp_names_the_kernels_it_used(voxel, kernels):
    """The radii depend on the voxel size (``default_radii_mm``): beyond 6 mm voxels there is one, above 12 mm."""
    assert kernels in _text(_run(voxel=voxel), inversion=("tkd",))


def test_vsharp_radii_from_the_parameters_replace_the_default_rule():
    text = _text(inversion=("tkd",), parameters={"bgremove": {"vsharp": {"radii_mm": [6.0, 10.0]}}})
    assert "with spherical kernels of 10 and 6 mm and a deconvolution threshold" in text
    assert "twice the largest voxel dimension" not in text


def test_resharp_and_pdf_name_their_solver_and_what_they_do_to_the_mask():
    """RESHARP erodes the mask (the text did not say so); PDF does not; both solve by CG with their own settings."""
    resharp = _text(bgremove="resharp", inversion=("tkd",))
    assert ("RESHARP (Sun and Wilman 2014) with a 4 mm spherical kernel and Tikhonov parameter 0.001, solved by "
            "conjugate gradients (tolerance 1e-06, at most 200 iterations), which also erodes the mask to where the "
            "sphere fits;") in resharp
    pdf = _text(bgremove="pdf", inversion=("tkd",))
    assert ("(PDF; Liu et al. 2011): the field of susceptibility sources outside the brain mask, computed by FFTs on "
            "the field's grid zero-padded to 1.5 times its size, was fitted to the total field with equal weights for "
            "every mask voxel by conjugate gradients (tolerance 1e-05, at most 100 iterations) and subtracted; PDF "
            "does not erode the mask") in pdf


def test_classical_inversions_say_how_their_ffts_were_padded():
    """pad_factor changes every classical map (circular convolution wraps the field of the brain's edge round) and
    a parameters file may set it, but the text did not say it."""
    text = _text(inversion=("tkd", "cfl2", "ilsqr"), parameters={"inversion": {"cfl2": {"pad_factor": 2}}})
    assert ("with threshold 0.19, by FFTs on the field's grid (zero-padded only to fast FFT lengths)." in text)
    assert "regularisation weight 0.1, by FFTs on the field's grid zero-padded to 2 times its size." in text
    assert ("estimation and removal of streaking artefacts, each dipole convolution by FFTs on the field's grid "
            "(zero-padded only to fast FFT lengths).") in text


@pytest.mark.parametrize(("mask", "thresholded"), [
    ("quality", "Otsu thresholding (Otsu 1979) of both the root-sum-of-squares magnitude over echoes and a phase "
                "quality map (magnitude times local phase coherence), followed by"),
    ("magnitude", "Otsu thresholding (Otsu 1979) of the root-sum-of-squares magnitude over echoes, followed by"),
])
def test_mask_strategies_share_one_description_with_the_closing(mask, thresholded):
    """``brain_mask`` closes the opened mask within the eroded one; the text named only the opening."""
    text = _text(mask=mask, inversion=("tkd",))
    assert thresholded in text
    assert ("morphological opening by 2.0 mm (then the largest connected component, closed by the same ball within "
            "the eroded mask)") in text


def test_deep_refinement_iterations_are_an_upper_bound(monkeypatch):
    """The refinement's conjugate gradients stop once converged: --refine 100 ran far fewer than 100 iterations."""
    from qsmprep.inversion import deep
    from qsmprep.workflows.qsm import deep_refinement_text

    ran = []
    solve = deep.cg

    def counting_cg(*args, max_iter, **kwargs):
        iterations = []
        result = solve(*args, max_iter=max_iter, callback=lambda x, it: iterations.append(it), **kwargs)
        ran.append(len(iterations))
        return result

    monkeypatch.setattr(deep, "cg", counting_cg)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    mask = x**2 + y**2 + z**2 < 0.7
    field = (0.05 * x * y * mask).astype(np.float32)
    deep.refine_data_consistency(np.zeros_like(field), field, mask, (2.0,) * 3, n_iter=100)
    assert ran and ran[0] < 100
    assert deep_refinement_text(100, 0.05).startswith(
        "The network output was then refined by 100 conjugate-gradient iterations at most (fewer once the solver "
        "converged), minimising")


def test_deep_refinement_high_pass_says_where_the_fields_are_compared():
    from qsmprep.workflows.qsm import deep_refinement_text

    assert ("both fields high-passed (their spherical mean over 8 mm subtracted, as in SHARP (Schweser et al. 2011), "
            "and compared only where that sphere fits in the brain mask; in a mask too thin for it, over the largest "
            "radius that fits, down to two voxels, recorded in the map's sidecar)"
            ) in deep_refinement_text(10, 0.05, refine_radius_mm=8.0)


@pytest.mark.parametrize(("device", "refine", "sentence"), [
    ("cpu", 10, "The network and its refinement ran in PyTorch {} on the CPU, in single precision."),
    ("cpu", 0, "The network ran in PyTorch {} on the CPU, in single precision."),
    ("cuda", 10, "The network and its refinement ran in PyTorch {} on a CUDA GPU, the network's pass in float16 "
                 "automatic mixed precision, the refinement in single precision, on the CPU if the GPU ran out of "
                 "memory for it."),
    ("auto", 0, "The network ran in PyTorch {} on a CUDA GPU where the processing node had one (the network's pass in "
                "float16 automatic mixed precision), else on the CPU in single precision."),
])
def test_deep_text_names_pytorch_the_device_and_the_precision(device, refine, sentence, monkeypatch):
    """--device decides where the network runs, and on a GPU it is autocast to float16: the text said neither."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a PyTorch built for CUDA, whatever this one is
    text = _text(inversion=("deep",), device=device, parameters={"inversion": {"deep": {"refine_iters": refine}}})
    assert sentence.format(version("torch")) in text


def test_auto_device_with_a_cpu_only_pytorch_is_stated_as_the_cpu(monkeypatch):
    """A "+cpu" PyTorch build runs on the CPU whatever the node has: "auto" said "on a CUDA GPU where the processing
    node had one" for it."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    text = _text(inversion=("deep",), device="auto", parameters={"inversion": {"deep": {"refine_iters": 10}}})
    assert f"The network and its refinement ran in PyTorch {version('torch')} on the CPU, in single precision." in text
    assert "CUDA" not in text


def test_resample_b0_deep_exemption_holds_where_deep_keeps_the_acquisition_grid():
    """At 2 degrees of tilt and the model's 1 mm, --resample-b0 resamples TKD but deep runs on the acquisition grid
    without resampling at all: "as it resamples into its model's frame itself" was false there."""
    text = _text(_run(tilt_deg=2.0, voxel=(1.0, 1.0, 1.0)), inversion=("deep", "tkd"), resample_b0=True)
    assert ("The deep inversion skipped this resampling and was given the acquisition grid's field, as it resamples "
            "into its model's frame itself where it needs to (see below).") in text
    assert "The network ran on the acquisition grid (B0 within 3 degrees of its third axis" in text


def test_the_report_gets_the_text_the_citation_file_gets():
    """The subject's report node carries ``methods_text`` of its runs, as written to CITATION.md."""
    from qsmprep.workflows.base import init_single_subject_wf, methods_text

    config = Config(bids_dir="/data", output_dir="/out", work_dir="/work", inversion=("tkd", "cfl2"),
                    bgremove="resharp", b0_dir=(0.0, 0.1, 1.0)).resolve_parameters()
    config.runs = [_run(), replace(_run(tilt_deg=20.0), session="2")]
    report = init_single_subject_wf("01", config.runs, config).get_node("report")
    assert report.inputs.methods_text == methods_text(config)


def test_boilerplate_only_writes_the_b0_sources_and_the_kernels(tmp_path):
    """End to end through the command line: --b0-tesla and --b0-dir reach CITATION.md (a 16^3 dataset of 8 mm)."""
    from qsmprep.cli import simulate
    from qsmprep.cli.run import main

    bids, out = tmp_path / "bids", tmp_path / "out"
    assert simulate.main([str(bids), "--matrix", "16", "16", "16", "--voxel-size", "8", "8", "8", "--echoes", "2"]) == 0
    assert main([str(bids), str(out), "participant", "-w", str(tmp_path / "w"), "--boilerplate-only",
                 "--inversion", "tkd", "--bgremove", "vsharp", "--b0-tesla", "7", "--b0-dir", "0", "0.1", "1"]) == 0
    (citation,) = out.glob("logs/*/CITATION.md")
    text = citation.read_text()
    assert ("at 7 T, acquired on a qsmprep-simulate scanner (3D acquisition) with 16 x 16 x 16 voxels of 8 x 8 x 8 "
            "mm. The field strength was given with --b0-tesla, overriding the sidecars; "
            "B0's direction, 5.7 degrees from the third voxel axis, was given with --b0-dir as (0, 0.1, 1)") in text
    assert "with a spherical kernel of 16 mm (twice the largest voxel dimension)" in text
    assert json.loads(citation.with_name("config.json").read_text())["b0_dir"] == [0.0, 0.1, 1.0]



@pytest.mark.parametrize(("refine", "radius", "tv", "cited"), [
    (10, 8.0, 0.0, ["Schweser"]),
    (30, 8.0, 3e-4, ["Schweser", "Liu T", "Vogel"]),
    (10, 0.0, 3e-4, ["Liu T", "Vogel"]),
    (0, 8.0, 3e-4, []),  # no refinement: neither term is used, so neither is cited
])
def test_deep_paragraph_cites_the_refinement_terms_it_uses(refine, radius, tv, cited):
    """The deep paragraph named the SHARP high-pass and the total variation but cited neither (V-SHARP's paragraph
    cites Schweser 2011 too, so the pipeline runs PDF here; references are listed as "- <authors>")."""
    deep = {"refine_iters": refine, "refine_radius_mm": radius, "refine_tv_weight": tv}
    text = _text(inversion=("deep",), bgremove="pdf", parameters={"inversion": {"deep": deep}})
    references = text.partition("References")[2]
    first_authors = {"Schweser": "- Schweser F", "Liu T": "- Liu T, Liu J", "Vogel": "- Vogel CR"}
    assert [name for name, line in first_authors.items() if line in references] == cited
    assert ("SHARP (Schweser et al. 2011)" in text) == ("Schweser" in cited)
    assert ("as in MEDI, Liu et al. 2011" in text) == ("Liu T" in cited)


@pytest.mark.parametrize(("arch", "params", "phrase", "cited"), [
    ("unet", {"prior": "cfl2"}, "a 3D U-Net (Ronneberger et al. 2015) that corrects the closed-form L2 estimate "
     "(Bilgic et al. 2014)", ["Ronneberger", "Bilgic"]),
    ("unet", {}, "a 3D U-Net (Ronneberger et al. 2015), applied", ["Ronneberger"]),
    ("qsmgan", {}, "generator of QSMGAN (Chen et al. 2020; Ronneberger et al. 2015)", ["Ronneberger", "Chen"]),
    ("qsminvnet", {}, "(QSMInvNet+, Liu and Koch; Ronneberger et al. 2015)", ["Ronneberger", "Liu J"]),
    ("metaqsm", {}, "(Meta-QSM, Liu and Koch 2019; Ronneberger et al. 2015)", ["Ronneberger", "Liu J"]),
    ("siqsm", {}, "of SI-QSM (Larrain 2022; Ronneberger et al. 2015)", ["Ronneberger", "Larrain"]),
])
def test_deep_paragraph_names_and_cites_the_network_architecture(tmp_path, arch, params, phrase, cited):
    """The deep paragraph named the checkpoint but not what network it holds, nor cited its design."""
    from qsmprep.deep.models import build_model
    from qsmprep.deep.registry import save_checkpoint

    path = tmp_path / f"{arch}.safetensors"
    save_checkpoint(build_model(arch, width=4, depth=2, **params), path)
    text = _text(inversion=("deep",), bgremove="pdf", parameters={"inversion": {"deep": {"model": str(path)}}})
    assert phrase in text
    references = text.partition("References")[2]
    first_authors = {"Ronneberger": "- Ronneberger O", "Bilgic": "- Bilgic B", "Chen": "- Chen Y, Jakary A",
                     "Liu J": "- Liu J, Koch KM", "Larrain": "- Larrain JM"}
    assert [name for name, line in first_authors.items() if line in references] == cited


def test_cfl2_and_the_deep_prior_cite_bilgic_once():
    """Both paragraphs cite Bilgic et al. 2014 with the same reference, so the list holds it once."""
    references = _text(inversion=("deep", "cfl2")).partition("References")[2]
    assert references.count("- Bilgic B") == 1


MASK_DEFAULT = (
    "A brain mask was obtained by Otsu thresholding (Otsu 1979) of both the root-sum-of-squares magnitude over echoes "
    "and a phase quality map (magnitude times local phase coherence), followed by separation of the brain from the "
    "scalp (erosion by 4.0 mm, largest connected component, dilation back within the thresholded mask; Soille 2003), "
    "hole filling, erosion by 3.0 mm, morphological opening by 2.0 mm (then the largest connected component, closed by "
    "the same ball within the eroded mask), and removal of surface voxels whose phase changed by more than 2pi/3 rad "
    "between neighbours in the first echo difference (too steep to unwrap reliably; Itoh 1982). At this run's voxel "
    "size (3 x 3 x 4 mm) the opening by 2 mm reached no neighbouring voxel and had no effect.")
STEEP_VOXELS_REMOVED = (" whose phase changed by more than 2pi/3 rad between neighbours in the first echo difference "
                        "(too steep to unwrap reliably; Itoh 1982).")


def _mask_text(mask, **params):
    """Methods text of a TKD run whose ``--mask`` strategy ``mask`` ran ``brain_mask`` with ``params``."""
    return _text(mask=mask, inversion=("tkd",), parameters={"mask": {mask: params}})


def test_default_mask_sentence_is_unchanged():
    assert MASK_DEFAULT in _text(inversion=("tkd",))


@pytest.mark.parametrize(("mask", "thresholding"), [
    ("magnitude", "by thresholding of the root-sum-of-squares magnitude over echoes at 0.2 (the given threshold), "
                  "followed by separation"),
    ("quality", "by thresholding of the root-sum-of-squares magnitude over echoes at 0.2 (the given threshold) and Otsu "
                "thresholding (Otsu 1979) of a phase quality map (magnitude times local phase coherence), followed by"),
])
def test_a_given_threshold_replaces_otsu_on_the_magnitude_only(mask, thresholding):
    """``brain_mask`` thresholds the magnitude at ``threshold``, but the quality map always by Otsu's method."""
    assert thresholding in _mask_text(mask, threshold=0.2)


@pytest.mark.parametrize(("params", "steps"), [
    ({"separate_mm": 0.0}, "followed by selection of the largest connected component, hole filling, erosion by 3.0 mm, "
                           "morphological opening"),
    ({"fill_holes": False}, "Soille 2003), erosion by 3.0 mm, morphological opening by 2.0 mm (then the largest "
                            "connected component, closed by the same ball within the eroded mask), and removal of "
                            "voxels" + STEEP_VOXELS_REMOVED),
    ({"erode_mm": 0.0}, "Soille 2003), hole filling, morphological opening by 2.0 mm (then the largest connected "
                        "component, closed by the same ball within the mask before the opening), and removal of "
                        "surface voxels"),
    ({"smooth_mm": 0.0}, "Soille 2003), hole filling, erosion by 3.0 mm, and removal of surface voxels"
                         + STEEP_VOXELS_REMOVED + " The first echo's phase"),
])
def test_mask_steps_switched_off_are_not_described(params, steps):
    """A radius of 0 or no ``fill_holes`` skips that step of ``brain_mask``; without hole filling the steep voxels
    inside the brain stay out too, and a step that is off is not named as having had no effect."""
    assert steps in _mask_text("magnitude", **params)


@pytest.mark.parametrize(("mask", "thresholding"), [
    ("magnitude", "thresholding of the root-sum-of-squares magnitude over echoes at 0.2 (the given threshold)"),
    ("quality", "thresholding of the root-sum-of-squares magnitude over echoes at 0.2 (the given threshold) and Otsu "
                "thresholding (Otsu 1979) of a phase quality map (magnitude times local phase coherence)"),
])
def test_mask_with_every_optional_step_off(mask, thresholding):
    text = _mask_text(mask, threshold=0.2, separate_mm=0.0, fill_holes=False, erode_mm=0.0, smooth_mm=0.0)
    assert (f"A brain mask was obtained by {thresholding}, followed by selection of the largest connected component, "
            "and removal of voxels" + STEEP_VOXELS_REMOVED + " The first echo's phase") in text


@pytest.mark.parametrize(("mask", "params", "cited"), [
    ("quality", {}, ["Otsu", "Soille"]),
    ("magnitude", {"threshold": 0.2}, ["Soille"]),
    ("quality", {"threshold": 0.2}, ["Otsu", "Soille"]),  # the quality map is still thresholded by Otsu's method
    ("magnitude", {"separate_mm": 0.0}, ["Otsu"]),
    ("magnitude", {"threshold": 0.2, "separate_mm": 0.0}, []),
])
def test_mask_references_are_the_methods_the_mask_used(mask, params, cited):
    """Otsu 1979 and Soille 2003 were listed whatever the threshold and the scalp separation."""
    text = _mask_text(mask, **params)
    references = text.partition("References")[2]
    first_authors = {"Otsu": "- Otsu N.", "Soille": "- Soille P."}
    assert [name for name, line in first_authors.items() if line in references] == cited
    assert ("(Otsu 1979)" in text) == ("Otsu" in cited)
    assert ("Soille 2003" in text) == ("Soille" in cited)
