"""The per-run QSM workflow: GRE magnitude + phase -> Chimap(s), masks and field maps."""

import logging
from importlib import resources
from importlib.metadata import version

import nipype
import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from ..bgremove.vsharp import MAX_RADIUS_MM, default_radii_mm
from ..bids.discovery import ENTITY_KEYS
from ..bids.validation import acquisition_type
from ..deep import checkpoint_path, is_shipped_model, model_provenance, read_metadata
from ..deep.recipes import toml_like
from ..checks import is_number
from ..config import B0_RESAMPLE_TILT_DEG, SELF_RESAMPLING_INVERSIONS, inversion_high_pass_mm
from ..interfaces.field import BackgroundRemoval, BrainMask, TotalField, UserMask
from ..interfaces.gre import PhaseToRad, StackEchoes
from ..interfaces.inversion import DipoleInversion, FromB0Aligned, ReferenceToMask, ToB0Aligned
from ..masking import ball_mm
from ..physics import GAMMA_BAR_MHZ_PER_T, b0_aligned_grid, b0_dir_given_or_from_affine, b0_tilt_deg, voxel_size_from_affine
from .outputs import init_qsm_derivatives_wf

log = logging.getLogger(__name__)

BOILERPLATE = resources.files("qsmprep") / "data" / "boilerplate"

MEMORY_FACTORS = {
    "stack_magnitude": 3, "phase_to_rad": 2, "brain_mask": 10, "user_mask": 2, "total_field": 14, "bgremove": 48,
    "to_b0_aligned": 12, "from_b0_aligned": 12, "reference": 4, "invert": 64, "invert_deep": 128,
}
"""Peak memory of each node in float32 volumes of the grid it works on (times echoes where the node holds all
echoes), plus ``MEMORY_BASE``. ``to_b0_aligned``, ``from_b0_aligned`` and the inversions after them count volumes
of the B0-aligned grid, which is larger than the native one for a tilted run (about twice at 45 degrees)."""

MEMORY_BASE = {"phase_to_rad": 10, "brain_mask": 24, "user_mask": 3, "total_field": 36}
"""Volumes an echo node needs whatever the echo count (3D work arrays).

Measured peaks (tracemalloc, 64^3 and 96x100x72 grids, in volumes for 1 / 2 / 4 / 8 echoes; the old
factor x echoes model under-declared one- and two-echo runs): phase_to_rad (int16 input) 11 / 12 / 14 / 20;
brain_mask (quality) 28 / 37 / 50 / 82; user_mask (reads the 4D magnitude) 4.3 / 5.1 / 9.1 / 17;
total_field 42 / 57 / 79 / 131. to_b0_aligned: 9.3 / 14 / 17 native volumes at 0 / 20 / 45 degrees tilt
(aligned grid 1.0 / 1.7 / 2.0 times the native one), hence its factor applies to the aligned grid.
Checked by tests/test_workflows.py::test_declared_memory_covers_the_measured_peak."""

ECHO_NODES = frozenset({"stack_magnitude", "phase_to_rad", "brain_mask", "user_mask", "total_field"})

MIN_MEM_GB = 0.1

TORCH_BASE_GB = 0.5
"""What the deep inversion process holds before any volume: torch and the model (0.25 GB resident after import).

``invert_deep``'s factor counts volumes of the grid the network runs on (``deep_network_shape``), measured
(/usr/bin/time, shipped model, default refinement): 0.53 / 1.07 / 3.25 GB above the import for 96^3 and 128^3
at 1 mm and 64^3 at 3 mm (run on 192^3 at 1 mm), i.e. 115-150 volumes; 7.8 GB in all at 256^3 (bench/speed.py)."""


def run_b0_dir(run, config):
    """B0 direction in the run's voxel coordinates: ``--b0-dir`` if given, else from the affine."""
    return list(b0_dir_given_or_from_affine(config.b0_dir, np.asarray(run.affine)))


def b0_resampled_methods(run, config):
    """The inversions that ``--resample-b0`` runs on a B0-aligned grid for this run (a tuple, maybe empty).

    Every method but ``SELF_RESAMPLING_INVERSIONS`` (deep, which resamples into its own model's frame), when the
    option is on and the run's B0 tilt exceeds ``B0_RESAMPLE_TILT_DEG``.
    """
    if not config.resample_b0 or b0_tilt_deg(run_b0_dir(run, config)) <= B0_RESAMPLE_TILT_DEG:
        return ()
    return tuple(method for method in config.inversion if method not in SELF_RESAMPLING_INVERSIONS)


def mem_gb(run, node, shape=None):
    """Memory hint (GB) for ``node`` on ``shape`` (default ``run``'s grid; see MEMORY_FACTORS, MEMORY_BASE)."""
    volume_gb = float(np.prod(run.shape if shape is None else shape)) * 4 / 1e9
    echoes = len(run.echo_times_s) if node in ECHO_NODES else 1
    volumes = MEMORY_FACTORS[node] * echoes + MEMORY_BASE.get(node, 0)
    base_gb = TORCH_BASE_GB if node == "invert_deep" else 0.0
    return max(MIN_MEM_GB, round(volumes * volume_gb + base_gb, 3))


def deep_model_options(config):
    """(model, resolution_tolerance) of the deep node: the run's parameters, else ``deep_invert``'s defaults."""
    from ..inversion.deep import DEFAULT_MODEL, RESOLUTION_TOLERANCE

    params = config.parameters.get("inversion", {}).get("deep", {})
    return params.get("model", DEFAULT_MODEL), params.get("resolution_tolerance", RESOLUTION_TOLERANCE)


def deep_network_shape(run, config, b0_dir):
    """The grid the deep network runs on for ``run``'s field (e.g. 27x the voxels of a 3 mm run), at least the
    run's own grid."""
    from ..errors import QSMPrepError
    from ..inversion.deep import network_grid_shape

    shape = tuple(run.shape)
    try:
        network = network_grid_shape(shape, voxel_size_from_affine(np.asarray(run.affine)), b0_dir,
                                     *deep_model_options(config))
    except QSMPrepError:  # an unreadable model is reported, with its file, when the node runs
        return shape
    return max(tuple(network), shape, key=np.prod)


def read_boilerplate(key, **context):
    """Render template ``qsmprep/data/boilerplate/<key>.txt``: (paragraph, list of references).

    A reference line ``if NAME: reference`` is kept only when ``context[NAME]`` is true: the paragraph cites
    that work only with the option NAME is set by.
    """
    text = (BOILERPLATE / f"{key}.txt").read_text()
    body, _, refs = text.partition("References:")
    kept = []
    for line in filter(None, map(str.strip, refs.splitlines())):
        condition, colon, reference = line.partition(": ")
        if not (line.startswith("if ") and colon):
            kept.append(line)
        elif context.get(condition.removeprefix("if ")):
            kept.append(reference)
    return body.strip().format(**context), kept


def deep_network_frame(run, config):
    """Where this run's deep network runs, ``deep_invert``'s ``network_frame``: (resampled into the model's
    B0-aligned frame, that frame's voxel size in mm or None for the acquisition's); None when the model cannot be
    read (its node reports that)."""
    from ..errors import QSMPrepError
    from ..inversion.deep import network_frame

    model, tolerance = deep_model_options(config)
    try:
        return network_frame(voxel_size_from_affine(np.asarray(run.affine)), run_b0_dir(run, config),
                             read_metadata(model), tolerance)
    except QSMPrepError:
        return None


def deep_frame_text(run, config):
    """The methods sentence on where this run's deep network ran (``deep_network_frame``): on the acquisition
    grid, or resampled into its model's frame and back, with a trailing space; empty when the model cannot be read."""
    from ..inversion.deep import OBLIQUE_THRESHOLD_DEG, RESAMPLE_ORDER

    frame = deep_network_frame(run, config)
    if frame is None:
        return ""
    (aligned, target_vs), tolerance = frame, deep_model_options(config)[1]
    if not aligned:
        voxel_size = ("the acquisition's voxel size kept, as asked" if tolerance == float("inf")
                      else f"voxel size within {tolerance:.0%} of the model's or taken as an input")
        return (f"The network ran on the acquisition grid (B0 within {OBLIQUE_THRESHOLD_DEG:g} degrees of its third "
                f"axis, {voxel_size}). ")
    voxels = (" with " + " x ".join(f"{v:g}" for v in target_vs) + " mm voxels, the model's training resolution"
              if target_vs else " at the acquisition's voxel size")
    interpolation = "cubic B-splines" if RESAMPLE_ORDER == 3 else "trilinear"  # resample_to_grid's two orders
    return (f"The local field was resampled ({interpolation}) onto a grid whose third axis is along B0{voxels}, and "
            "the network's output back onto the acquisition grid. ")


def deep_model_text(model):
    """The methods phrase naming the deep model, a shipped one by name (its model card is in docs/models/), a
    checkpoint by file name, with what identifies its weights (``model_provenance``)."""
    shipped = is_shipped_model(model)
    known = model_provenance(model)
    steps = known["TrainingSteps"] is not None and f"{known['TrainingSteps']} training steps"
    stages = [*(known["EarlierTrainingSteps"] or []), known["TrainingSteps"]]
    if steps and len(stages) > 1 and all(isinstance(n, int) for n in stages):  # the whole training, stage by stage
        steps = f"{sum(stages)} training steps in {len(stages)} stages of {spoken_list([str(n) for n in stages])}"
    elif steps and known["InitializedFrom"]:
        steps += f" continuing from an earlier checkpoint, {known['InitializedFrom']}"
    details = [known["Recipe"], steps, recipe_changes_text(known["RecipeChanges"], len(stages)),
               f"weights SHA-256 {known['SHA256'][:12]}", shipped and "see its model card"]
    what = (f"the deep neural network {model} shipped with qsmprep" if shipped
            else f"a deep neural network from the checkpoint {checkpoint_path(model).name}")
    return f"{what} ({'; '.join(d for d in details if d)})"


def recipe_changes_text(changes, n_stages):
    """The methods phrase on the changes of recipe a model's training was resumed with (``model_provenance``'s
    ``RecipeChanges``; None or [] gives ""): each resume's step (and stage, where there were several) and each key
    with its old and new value."""
    resumes = []
    for change in changes or []:
        where = f"at step {change['Step']}" + (f" of stage {change['Stage']}" if n_stages > 1 else "")
        keys = ", ".join(f"{key} from {toml_like(values.get('from'))} to {toml_like(values.get('to'))}"
                         for key, values in (change["Changes"] or {}).items())
        resumes.append(f"{where}: {keys}")
    return resumes and f"recipe changed on resuming {'; '.join(resumes)}"


DEEP_ARCHITECTURES = {
    "unet": "a 3D U-Net (Ronneberger et al. 2015)",
    "qsminvnet": "a 3D U-Net with domain-specific batch normalisation (QSMInvNet+, Liu and Koch; Ronneberger et al. "
                 "2015)",
    "metaqsm": "a 3D U-Net whose convolution weights are predicted from the voxel size (Meta-QSM, Liu and Koch 2019; "
               "Ronneberger et al. 2015)",
    "qsmgan": "the 3D U-Net generator of QSMGAN (Chen et al. 2020; Ronneberger et al. 2015)",
    "siqsm": "the residual 3D U-Net of SI-QSM (Larrain 2022; Ronneberger et al. 2015)",
}
"""The methods phrase, with its citations, for each network architecture (``qsmprep.deep.models.ARCHITECTURES``);
``inversion-deep.txt`` lists the references, each kept with its ``arch_<name>`` flag (``deep_architecture_context``)."""


def deep_architecture_context(model):
    """The deep template's words on the model's architecture: ``architecture`` (``DEEP_ARCHITECTURES``, with the
    CFL2 prior a U-Net may correct), and the flags ``arch_<name>`` and ``prior_cfl2`` that keep their references."""
    from ..deep.models import ARCHITECTURES

    meta = read_metadata(model)
    arch, prior = meta["arch"], meta.get("params", {}).get("prior", "none")
    text = DEEP_ARCHITECTURES[arch] + (
        " that corrects the closed-form L2 estimate (Bilgic et al. 2014) computed inside it" if prior == "cfl2" else "")
    return {"architecture": text, "prior_cfl2": prior == "cfl2", **{f"arch_{name}": name == arch for name in ARCHITECTURES}}


def high_pass_text(radius_mm):
    """The methods clause on a data term's spherical-mean high-pass of ``radius_mm`` (the deep refinement's and the
    total-variation inversion's ``harmonic_radius_mm``); "" for None or 0 (off)."""
    if not radius_mm:
        return ""
    return (f", both fields high-passed (their spherical mean over {radius_mm:g} mm subtracted, as in SHARP (Schweser et "
            "al. 2011), and compared only where that sphere fits in the brain mask; in a mask too thin for it, over the "
            "largest radius that fits, down to two voxels, recorded in the map's sidecar) so that residual background "
            "fields are ignored")


def deep_refinement_text(refine_iters, refine_lambda, refine_radius_mm=None, refine_tv_weight=0.0, **_):
    """The methods sentence on the deep inversion's data-consistency refinement (``deep_invert``'s resolved parameters).

    ``refine_iters`` is an upper bound: the conjugate gradients stop once their residual is small (on the simulated
    head at 1.5 mm, after 11 iterations of ``--refine 100``)."""
    from ..inversion.deep import TV_EPSILON, TV_REWEIGHT_ITERS

    if not refine_iters:
        return "The network output was used without data-consistency refinement."
    high_pass = high_pass_text(refine_radius_mm)
    tv = (f", plus {refine_tv_weight:g} ppm mm times the total variation of chi (as in MEDI, Liu et al. 2011; "
          f"gradients between brain voxels, smoothed by {TV_EPSILON:g} ppm/mm, reweighted every {TV_REWEIGHT_ITERS} "
          "iterations by lagged diffusivity, Vogel and Oman 1996)"
          if refine_tv_weight else "")
    return (f"The network output was then refined by {refine_iters} conjugate-gradient iterations at most (fewer once "
            f"the solver converged), minimising the squared misfit between the modelled and the measured local "
            f"field{high_pass}, plus {refine_lambda:g} times the squared distance to the network output{tv}.")


DEEP_DEVICES = {"cpu": "on the CPU, in single precision", "cuda": "on a CUDA GPU, {gpu}",
                "auto": "on a CUDA GPU where the processing node had one ({gpu}), else on the CPU in single "
                        "precision"}
"""Where ``--device`` runs the deep network and its refinement (``qsmprep.physics.resolve_device``), and in which
precision; ``{gpu}`` is the precision on a GPU (``deep_runtime_text``)."""


def deep_runtime_text(device, refine_iters):
    """The methods sentence on the software and hardware of the deep inversion: the PyTorch version and the device
    with its precision (``DEEP_DEVICES``). On a GPU ``network_predictor`` autocasts the network to float16; the
    refinement stays in float32 and falls back to the CPU when the GPU's memory runs out (``run_with_cpu_fallback``).
    "auto" with a PyTorch built without GPU support (a "+cpu" build) can only have run on the CPU, and says so."""
    import torch

    if device == "auto" and torch.version.cuda is None and torch.version.hip is None:
        device = "cpu"
    steps = "The network and its refinement" if refine_iters else "The network"
    gpu = "the network's pass in float16 automatic mixed precision" + (
        ", the refinement in single precision, on the CPU if the GPU ran out of memory for it" if refine_iters else "")
    return f"{steps} ran in PyTorch {version('torch')} {DEEP_DEVICES[device].format(gpu=gpu)}."


ECHO_WORDING = {
    "multi": {"run_kind": "multi-echo gradient-echo", "echo_ordering": "the magnitude and phase echoes were ordered by "
              "echo time; ", "unwrapped_phase": "The first echo's phase", "combined_magnitude": "the root-sum-of-squares "
              "magnitude over echoes", "steep_phase": "the first echo difference"},
    "single": {"run_kind": "single-echo gradient-echo", "echo_ordering": "", "unwrapped_phase": "The phase",
               "combined_magnitude": "the magnitude", "steep_phase": "the phase"},
}
"""The methods text's words for what ``total_field_hz`` and the masks do with several echoes or with one."""


def mask_threshold_text(strategy, threshold, wording):
    """What ``brain_mask`` thresholded for the ``--mask`` strategy and how: the magnitude at the given ``threshold``,
    by Otsu's method when it is None; strategy "quality"'s phase quality map always by Otsu's method."""
    magnitude, quality = wording["combined_magnitude"], "a phase quality map (magnitude times local phase coherence)"
    if threshold is None:
        return "Otsu thresholding (Otsu 1979) of " + (f"both {magnitude} and {quality}" if strategy == "quality"
                                                      else magnitude)
    given = f"thresholding of {magnitude} at {threshold:g} (the given threshold)"
    return f"{given} and Otsu thresholding (Otsu 1979) of {quality}" if strategy == "quality" else given


def mask_steps_text(params):
    """The morphology ``brain_mask`` ran with ``params`` between thresholding and the removal of steep-phase voxels,
    as the methods text lists it: only the steps the parameters switch on (a radius of 0 or no ``fill_holes``)."""
    steps = [f"separation of the brain from the scalp (erosion by {params['separate_mm']} mm, largest connected "
             "component, dilation back within the thresholded mask; Soille 2003)" if params["separate_mm"] > 0
             else "selection of the largest connected component"]
    if params["fill_holes"]:
        steps.append("hole filling")
    if params["erode_mm"] > 0:
        steps.append(f"erosion by {params['erode_mm']} mm")
    if params["smooth_mm"] > 0:
        closed_within = "the eroded mask" if params["erode_mm"] > 0 else "the mask before the opening"
        steps.append(f"morphological opening by {params['smooth_mm']} mm (then the largest connected component, "
                     f"closed by the same ball within {closed_within})")
    return ", ".join(steps)


def automatic_mask_context(strategy, params, wording, voxel_size_mm):
    """Values of ``mask-automatic.txt`` for ``brain_mask`` run with ``params`` (strategy "quality" or "magnitude"),
    with the flags that keep its references to Otsu's and Soille's methods only where the paragraph uses them."""
    return {**wording, "thresholding": mask_threshold_text(strategy, params["threshold"], wording),
            "steps": mask_steps_text(params),
            # hole filling after the removal brings back the steep voxels inside the brain: only its surface loses them
            "steep_voxels": "surface voxels" if params["fill_holes"] else "voxels",
            "cites_otsu": params["threshold"] is None or strategy == "quality",
            "cites_soille": params["separate_mm"] > 0,
            "steps_without_effect": mask_steps_without_effect(params, voxel_size_mm)}


MASK_STEP_NAMES = {"separate_mm": "erosion by {} mm before the largest component is kept",
                   "erode_mm": "erosion by {} mm", "smooth_mm": "opening by {} mm"}


def mask_steps_without_effect(mask_params, voxel_size_mm):
    """The methods sentence on mask steps whose ball is a single voxel at this voxel size (they change nothing)."""
    idle = [MASK_STEP_NAMES[key].format(f"{mask_params[key]:g}") for key in MASK_STEP_NAMES
            if key in mask_params and mask_params[key] > 0 and ball_mm(mask_params[key], voxel_size_mm).sum() == 1]
    if not idle:
        return ""
    steps = "the " + (", the ".join(idle[:-1]) + " and the " if len(idle) > 1 else "") + idle[-1]
    return (f" At this run's voxel size ({sizes_text(np.round(voxel_size_mm, 2))} mm) {steps} reached no neighbouring "
            "voxel and had no effect.")


def sizes_text(values):
    """Three sizes as the methods text writes them: "1.5 x 1.5 x 2"."""
    return " x ".join(f"{v:g}" for v in values)


def spoken_list(items):
    """Strings listed as a sentence lists them: "a", "a and b", "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


RUNS_DESCRIBED = "The runs described here"
"""How a methods paragraph names its runs; ``collect_methods`` names them where runs differ."""


ACQUISITION_SIDECAR_FIELDS = (
    ("RepetitionTime", "repetition time {:g} ms", 1e3),
    ("FlipAngle", "flip angle {:g} degrees", 1),
    ("ParallelReductionFactorInPlane", "in-plane acceleration {:g}", 1),
    ("PartialFourier", "partial Fourier {:g}", 1),
)
"""The acquisition parameters the methods text takes from a run's first sidecar where it states them as numbers, as
(BIDS field, phrase, factor to the phrase's unit): with 2D or 3D (``acquisition_type``), those the ISMRM QSM
consensus (MRM 2024) asks a paper to report."""


def acquisition_text(run, config):
    """The methods sentences on the run's acquisition and what the field and susceptibility scaling took from it:
    scanner, 2D or 3D and ``ACQUISITION_SIDECAR_FIELDS`` where the sidecars state them, grid and voxel size, echo
    times, field strength and B0 direction, with where the last two came from (runs that differ in any get their own
    paragraph)."""
    meta = run.magnitude_meta[0] if run.magnitude_meta else {}
    scanner = " ".join(meta[key].strip() for key in ("Manufacturer", "ManufacturersModelName")
                       if isinstance(meta.get(key), str) and meta[key].strip())
    kind = acquisition_type(run)[0]
    details = ([f"{kind} acquisition"] if kind else []) + [phrase.format(meta[key] * factor) for key, phrase, factor
                                                           in ACQUISITION_SIDECAR_FIELDS if is_number(meta.get(key))]
    voxel = np.round(voxel_size_from_affine(np.asarray(run.affine)), 2)
    times = [f"{te * 1e3:g}" for te in sorted(run.echo_times_s)]
    count = "one echo" if len(times) == 1 else f"{len(times)} echoes"
    return (f"{RUNS_DESCRIBED} had {count} ({spoken_list(times)} ms) at {run.b0_tesla:.4g} T, acquired"
            + (f" on a {scanner} scanner" if scanner else "") + (f" ({', '.join(details)})" if details else "")
            + f" with {sizes_text(run.shape)} voxels of {sizes_text(voxel)} mm. {b0_source_text(run, config)}")


B0_SOURCE_TEXT = {
    "--b0-tesla": "given with --b0-tesla, overriding the sidecars",
    "ImagingFrequency": "computed from the proton resonance frequency in the sidecars (ImagingFrequency, {mhz:.4f} "
                        f"MHz) divided by {GAMMA_BAR_MHZ_PER_T:g} MHz/T{{nominal}}",
    "MagneticFieldStrength": "read from MagneticFieldStrength in the sidecars",
}
"""How the methods text says where a run's field strength came from (``GRERun.b0_source``)."""


def b0_source_text(run, config):
    """The methods sentence on where the field strength (``--b0-tesla``, ``ImagingFrequency`` or
    ``MagneticFieldStrength``) and B0's direction in the run's voxel coordinates (``--b0-dir`` or the NIfTI affine,
    ``run_b0_dir``) came from, with B0's tilt."""
    stated = any(meta.get("MagneticFieldStrength") is not None for meta in run.magnitude_meta + run.phase_meta)
    strength = B0_SOURCE_TEXT[run.b0_source].format(
        mhz=run.b0_tesla * GAMMA_BAR_MHZ_PER_T,
        nominal=", rather than taken from their nominal MagneticFieldStrength" if stated else "")
    direction = ("taken from the image orientation (the NIfTI affine)" if config.b0_dir is None
                 else f"given with --b0-dir as ({', '.join(f'{v:g}' for v in config.b0_dir)}) in voxel coordinates")
    return (f"The field strength was {strength}; B0's direction, {b0_tilt_deg(run_b0_dir(run, config)):.1f} degrees "
            f"from the third voxel axis, was {direction}.")


def bgremove_context(run, config):
    """Values of the background removal's template: the method's parameters and, for V-SHARP, its kernels as
    ``vsharp`` uses them (``radii_mm``, by default ``default_radii_mm`` of the run's voxel size)."""
    params = config.parameters["bgremove"][config.bgremove]
    if "pad_factor" in params:  # PDF, as the inversions that have one
        return {**params, "fft_grid": fft_grid_text(params["pad_factor"])}
    if config.bgremove != "vsharp":
        return params
    radii = params.get("radii_mm")
    rule = ""
    if radii is None:
        radii = default_radii_mm(voxel_size_from_affine(np.asarray(run.affine)))
        rule = (f" ({MAX_RADIUS_MM:g} mm down to twice the largest voxel dimension, in steps of about one voxel)"
                if len(radii) > 1 else " (twice the largest voxel dimension)")
    listed = spoken_list([f"{r:.3g}" for r in sorted(radii, reverse=True)])
    kernels = f"spherical kernels of {listed} mm" if len(radii) > 1 else f"a spherical kernel of {listed} mm"
    return {**params, "kernels": kernels + rule}


def fft_grid_text(pad_factor):
    """How the methods text names the grid a method's FFTs ran on: the field's own, or zero-padded to ``pad_factor``
    times its size (``qsmprep.physics.padded_shape``, which also rounds each axis up to a fast FFT length)."""
    if pad_factor == 1:
        return "by FFTs on the field's grid (zero-padded only to fast FFT lengths)"
    return f"by FFTs on the field's grid zero-padded to {pad_factor:g} times its size"


def software_text():
    """The numerical libraries qsmprep's methods run in, with their versions, as the methods text names them."""
    names = {"numpy": "NumPy", "scipy": "SciPy", "scikit-image": "scikit-image"}
    return spoken_list([f"{name} {version(package)}" for package, name in names.items()])


def methods_description(run, config):
    """Methods text of one run's processing (paragraph, references), filled with the resolved parameters."""
    params = config.parameters
    echoes = "single" if len(run.echo_times_s) == 1 else "multi"
    wording = ECHO_WORDING[echoes]
    mask_context = {} if config.mask_strategy == "user" else automatic_mask_context(
        config.mask_strategy, params["mask"][config.mask_strategy], wording,
        voxel_size_from_affine(np.asarray(run.affine)))
    parts = [
        ("intro", {"version": __version__, "nipype_version": nipype.__version__, "libraries": software_text(),
                   "phase_units": run.phase_units, "acquisition": acquisition_text(run, config), **wording,
                   "phase_polarity": " and negated, as they were stored with the opposite polarity (phase decreasing "
                                     "with the field; --invert-phase)" if config.invert_phase else ""}),
        ("mask-user" if config.mask_strategy == "user" else "mask-automatic", mask_context),
        (f"unwrap-{config.unwrap}", wording),
        (f"echoes-{echoes}", {}),
        (f"bgremove-{config.bgremove}", bgremove_context(run, config)),
    ]
    resampled = b0_resampled_methods(run, config)
    if resampled:
        exempt = (" The deep inversion skipped this resampling and was given the acquisition grid's field, as it "
                  "resamples into its model's frame itself where it needs to (see below).")
        parts.append(("resample-b0", {"threshold_deg": B0_RESAMPLE_TILT_DEG,
                                      "deep_exempt": exempt if len(resampled) < len(config.inversion) else ""}))
    for method in config.inversion:
        context = params.get("inversion", {}).get(method, {})
        if "pad_factor" in context:
            context = {**context, "fft_grid": fft_grid_text(context["pad_factor"])}
        if method == "deep":
            context = {**context, "network": deep_model_text(context["model"]), **deep_architecture_context(context["model"]),
                       "frame": deep_frame_text(run, config),
                       "refinement": deep_refinement_text(**context),
                       # which of the refinement's optional terms the text cites (its template's references)
                       "cites_high_pass": bool(inversion_high_pass_mm("deep", context)),
                       "cites_tv": bool(context["refine_iters"] and context.get("refine_tv_weight")),
                       "runtime": deep_runtime_text(config.device, context["refine_iters"])}
        if method == "tv":
            from ..inversion.deep import TV_EPSILON, TV_REWEIGHT_ITERS

            context = {**context, "epsilon": f"{TV_EPSILON:g}",
                       "reweighting": (f"with the total-variation weights renewed every {TV_REWEIGHT_ITERS} iterations"
                                       if context["max_iter"] > TV_REWEIGHT_ITERS else
                                       "with the total-variation weights of the starting estimate"),
                       "high_pass": high_pass_text(context["harmonic_radius_mm"]),
                       "cites_high_pass": bool(context["harmonic_radius_mm"])}
        parts.append((f"inversion-{method}", context))
    parts.append(("referencing", {}))
    paragraphs, references = [], []
    for key, context in parts:
        text, refs = read_boilerplate(key, **context)
        paragraphs.append(text)
        references += [r for r in refs if r not in references]
    return " ".join(paragraphs), references


def workflow_label(run):
    """Node-name-safe label of a run inside its subject, e.g. ``ses_2_acq_fast_run_1`` (``single`` when none)."""
    parts = [f"{ENTITY_KEYS[k]}_{v}" for k, v in run.entities.items() if k != "subject"]
    return "_".join(parts) or "single"


def run_workflow_name(run):
    """Name of ``init_qsm_wf``'s workflow for ``run`` (and of its folder in the work directory)."""
    return f"qsm_{workflow_label(run)}_wf"


def init_qsm_wf(run, config, name=None):
    """Build the workflow that turns one GRE run into QSM derivatives.

    Steps (node names in brackets): echo magnitudes stacked [stack_magnitude];
    phase to radians [phase_to_rad]; brain mask [brain_mask] or the user's
    mask [user_mask]; spatial unwrapping and echo combination into the
    total field in Hz [total_field]; background removal into the local field
    in ppm [bgremove]; optionally resampling onto a B0-aligned grid
    [to_b0_aligned]; one dipole inversion per method [invert_<method>],
    resampled back to the native grid when needed [from_b0_aligned_<method>];
    referencing to the mean in the mask [reference_<method>]; derivatives
    [qsm_derivatives_wf].

    Parameters
    ----------
    run : qsmprep.bids.discovery.GRERun
        A validated run (``qsmprep.bids.validation.validate_run``).
    config : qsmprep.config.Config
        Resolved configuration (``resolve_parameters`` called).
    name : str or None
        Workflow name; default ``run_workflow_name(run)``, ``qsm_<label>_wf``.

    Outputs (outputnode): magnitude, mask, total_field, local_field,
    chimaps (list, in ``config.inversion`` order), written (derivative files).
    """
    if len(run.echo_times_s) == 1:
        log.warning("%s: a single echo cannot separate the receive-phase offset from the field; what background "
                    "removal leaves of the offset stays in the local field and the Chimap (docs/methods/phase.md, "
                    "A single echo): acquire several echoes, or give phase with the offset removed.", run.name)
    workflow = Workflow(name=name or run_workflow_name(run))
    b0_dir = run_b0_dir(run, config)
    threads = config.omp_nthreads

    inputnode = pe.Node(niu.IdentityInterface(fields=["magnitude", "phase"]), name="inputnode")
    inputnode.inputs.magnitude = list(run.magnitude)
    inputnode.inputs.phase = list(run.phase)
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["magnitude", "mask", "total_field", "local_field", "chimaps", "written"]), name="outputnode")

    stack_magnitude = pe.Node(StackEchoes(), name="stack_magnitude", mem_gb=mem_gb(run, "stack_magnitude"))
    phase_to_rad = pe.Node(PhaseToRad(units=run.phase_units, invert=config.invert_phase), name="phase_to_rad", mem_gb=mem_gb(run, "phase_to_rad"))
    total_field = pe.Node(TotalField(te_s=list(run.echo_times_s), unwrap=config.unwrap, num_threads=threads),
                          name="total_field", mem_gb=mem_gb(run, "total_field"), n_procs=threads)
    bgremove = pe.Node(
        BackgroundRemoval(method=config.bgremove, parameters=config.parameters["bgremove"][config.bgremove],
                          b0_tesla=run.b0_tesla, b0_dir=b0_dir, num_threads=threads),
        name="bgremove", mem_gb=mem_gb(run, "bgremove"), n_procs=threads)
    workflow.connect([
        (inputnode, stack_magnitude, [("magnitude", "in_files")]),
        (inputnode, phase_to_rad, [("phase", "in_files")]),
        (stack_magnitude, total_field, [("out_file", "magnitude")]),
        (phase_to_rad, total_field, [("out_file", "phase_rad")]),
        (total_field, bgremove, [("out_file", "total_field")]),
        (stack_magnitude, outputnode, [("out_file", "magnitude")]),
        (total_field, outputnode, [("out_file", "total_field")]),
        (bgremove, outputnode, [("local_field", "local_field"), ("mask", "mask")]),
    ])

    if config.mask_strategy == "user":
        mask = pe.Node(UserMask(in_file=run.mask), name="user_mask", mem_gb=mem_gb(run, "user_mask"))
        workflow.connect(stack_magnitude, "out_file", mask, "reference")
    else:
        mask = pe.Node(BrainMask(strategy=config.mask_strategy,
                                 parameters=config.parameters["mask"][config.mask_strategy]),
                       name="brain_mask", mem_gb=mem_gb(run, "brain_mask"))
        mask.inputs.te_s = list(run.echo_times_s)
        workflow.connect([(stack_magnitude, mask, [("out_file", "magnitude")]),
                          (phase_to_rad, mask, [("out_file", "phase_rad")])])
    workflow.connect([(mask, total_field, [("out_file", "mask")]), (mask, bgremove, [("out_file", "mask")])])

    resampled_methods = b0_resampled_methods(run, config)
    # the grid the inversions work on: the B0-aligned grid covers the tilted field of view, so it is larger
    aligned_shape = b0_aligned_grid(run.shape, np.asarray(run.affine))[0] if resampled_methods else run.shape
    inversion_shape = max(aligned_shape, run.shape, key=np.prod)
    if resampled_methods:
        to_b0 = pe.Node(ToB0Aligned(), name="to_b0_aligned", mem_gb=mem_gb(run, "to_b0_aligned", inversion_shape))
        workflow.connect([(bgremove, to_b0, [("local_field", "local_field"), ("mask", "mask")])])

    merge_chimaps = pe.Node(niu.Merge(len(config.inversion)), name="merge_chimaps", run_without_submitting=True)
    for index, method in enumerate(config.inversion, start=1):
        resample = method in resampled_methods
        field_source, inversion_b0_dir = (to_b0, [0.0, 0.0, 1.0]) if resample else (bgremove, b0_dir)
        model_file = {"model_file": str(checkpoint_path(deep_model_options(config)[0]))} if method == "deep" else {}
        invert = pe.Node(
            DipoleInversion(method=method, parameters=config.parameters.get("inversion", {}).get(method, {}),
                            b0_dir=inversion_b0_dir, device=config.device, num_threads=threads, **model_file),
            name=f"invert_{method}", n_procs=threads,
            mem_gb=(mem_gb(run, "invert_deep", deep_network_shape(run, config, inversion_b0_dir))
                    if method == "deep" else mem_gb(run, "invert", inversion_shape)))
        reference = pe.Node(ReferenceToMask(), name=f"reference_{method}", mem_gb=mem_gb(run, "reference"))
        workflow.connect([
            (field_source, invert, [("local_field", "local_field"), ("mask", "mask")]),
            (bgremove, reference, [("mask", "mask")]),
            (reference, merge_chimaps, [("out_file", f"in{index}")]),
        ])
        if resample:
            back = pe.Node(FromB0Aligned(), name=f"from_b0_aligned_{method}",
                           mem_gb=mem_gb(run, "from_b0_aligned", inversion_shape))
            workflow.connect([(invert, back, [("out_file", "in_file")]),
                              (bgremove, back, [("local_field", "reference")]),
                              (back, reference, [("out_file", "in_file")])])
        else:
            workflow.connect(invert, "out_file", reference, "in_file")
    workflow.connect(merge_chimaps, "out", outputnode, "chimaps")

    derivatives_wf = init_qsm_derivatives_wf(run, config, resampled_methods=resampled_methods, b0_dir=b0_dir)
    for method in config.inversion:
        workflow.connect(workflow.get_node(f"invert_{method}"), "fitted_parameters", derivatives_wf,
                         f"inputnode.parameters_{method}")
    if "deep" in config.inversion:
        workflow.connect(workflow.get_node("invert_deep"), "inference_device", derivatives_wf,
                         "inputnode.inference_device")
    workflow.connect([
        (bgremove, derivatives_wf, [("mask", "inputnode.mask"), ("local_field", "inputnode.local_field")]),
        (total_field, derivatives_wf, [("out_file", "inputnode.total_field")]),
        (merge_chimaps, derivatives_wf, [("out", "inputnode.chimaps")]),
        (derivatives_wf, outputnode, [("outputnode.written", "written")]),
    ])
    return workflow
