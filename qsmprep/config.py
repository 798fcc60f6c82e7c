"""The resolved configuration of one qsmprep run.

``Config`` holds every choice the pipeline makes: inputs, resources, the
methods per step and every method parameter with its value (the library
function's published default unless overridden). It is written as JSON
next to the logs (``OUTPUT_DIR/logs/<run_id>/config.json``) so a run can be
reproduced and its outputs explained. Presets name common method choices;
explicit options override them.
"""

import importlib
import inspect
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import UsageError

UNWRAP_METHODS = ("laplacian", "quality")
BGREMOVE_METHODS = ("vsharp", "resharp", "pdf")
INVERSION_METHODS = ("deep", "tkd", "cfl2", "ilsqr", "tv")
MASK_STRATEGIES = ("quality", "magnitude")
"""``quality`` (default): Otsu thresholds of the echo-combined magnitude and of the phase quality map;
``magnitude``: of the magnitude only (keeps scalp and skull wherever they give signal)."""

PIPELINE_HIGH_PASS_RADIUS_MM = 8.0
"""The pipeline's high-pass radius for the deep refinement (``deep_invert``'s ``refine_radius_mm``) and for TV
(``tv``'s ``harmonic_radius_mm``); the library's default is off for both. qsmprep's own local fields carry
residual background fields, which the plain refinement turns into susceptibility: with 8 mm the shipped model
scores 6-23 points better on them and 1 point better on the 2016 challenge data (docs/benchmarks.md,
Pipeline-made local fields)."""

PIPELINE_PARAMETERS = {("inversion", "deep"): {"refine_radius_mm": PIPELINE_HIGH_PASS_RADIUS_MM},
                       ("inversion", "tv"): {"harmonic_radius_mm": PIPELINE_HIGH_PASS_RADIUS_MM}}
"""The pipeline's own defaults where they differ from the library function's: its local fields carry residual
background fields (``PIPELINE_HIGH_PASS_RADIUS_MM``). ``--refine-radius`` or a parameters file overrides them."""

HIGH_PASS_PARAMETERS = {"deep": "refine_radius_mm", "tv": "harmonic_radius_mm"}
"""The inversions' high-pass radius parameter (mm). In the pipeline each run's is the largest, at most the one
set, whose sphere fits in its brain mask (``qsmprep.bgremove.smv.largest_fitting_radius``): a thin slab's mask holds
no 8 mm sphere. The Chimap sidecar records the radius used."""


def inversion_high_pass_mm(method, params):
    """The high-pass radius (mm, ``HIGH_PASS_PARAMETERS``) the inversion ``method`` applies with its keyword
    ``params``, or 0 where none is on: the method has no high-pass, its radius is unset or 0, or deep does not refine
    (``refine_iters`` 0; unset, ``deep_invert``'s default)."""
    from .inversion.deep import REFINE_ITERS

    key = HIGH_PASS_PARAMETERS.get(method)
    if not key or (method == "deep" and not params.get("refine_iters", REFINE_ITERS)):
        return 0
    return params.get(key) or 0


B0_RESAMPLE_TILT_DEG = 1.0
"""With ``--resample-b0``, runs whose B0 is tilted more than this from the third voxel axis are inverted on a B0-aligned grid."""
SELF_RESAMPLING_INVERSIONS = ("deep",)
"""Inversions that resample into their own B0-aligned frame (the deep model's), which ``--resample-b0`` leaves
on the acquisition grid so that their data are not interpolated twice."""

LIBRARY_FUNCTIONS = {
    ("mask", "magnitude"): "qsmprep.masking:brain_mask",
    ("mask", "quality"): "qsmprep.masking:brain_mask",
    ("bgremove", "vsharp"): "qsmprep.bgremove.vsharp:vsharp",
    ("bgremove", "resharp"): "qsmprep.bgremove.resharp:resharp",
    ("bgremove", "pdf"): "qsmprep.bgremove.pdf:pdf",
    ("inversion", "tkd"): "qsmprep.inversion.tkd:tkd",
    ("inversion", "cfl2"): "qsmprep.inversion.cfl2:cfl2",
    ("inversion", "ilsqr"): "qsmprep.inversion.ilsqr:ilsqr",
    ("inversion", "tv"): "qsmprep.inversion.tv:tv",
    ("inversion", "deep"): "qsmprep.inversion.deep:deep_invert",
}
"""The library function behind each (step, method); its keyword defaults are the parameters.

Unwrapping has none here: ``qsmprep.phase.combine.total_field_hz`` runs its unwrapper with its defaults."""

DATA_ARGUMENTS = frozenset({
    "magnitude", "quality", "mask", "total_field", "local_field_ppm", "voxel_size_mm", "b0_dir", "weights",
    "device", "exclude",
})
"""Arguments that carry data, not tunable parameters, so a parameters file cannot set them. The workflow fills
those it has; ``pdf``'s ``weights`` and ``ilsqr``'s ``magnitude`` stay at their default, None (uniform data
weights), in the pipeline."""

ALGORITHM_NAMES = {
    "tkd": "TKD (thresholded k-space division)",
    "cfl2": "closed-form L2 (Tikhonov on the gradient)",
    "ilsqr": "iLSQR (LSQR with streaking-artefact removal)",
    "tv": "total-variation regularised least squares",
    "deep": "deep neural network",
}


def library_function(step, method):
    """Import and return the library function of ``(step, method)``."""
    module, name = LIBRARY_FUNCTIONS[(step, method)].split(":")
    return getattr(importlib.import_module(module), name)


MAX_PAD_FACTOR = 4.0
"""Largest ``pad_factor`` a parameters file may give. The memory of every array on the padded FFT grid grows with
its cube: 64 times at 4 (8.6 GB per complex array for a 256^3 acquisition). Without a bound, a factor of 1e300 passed
the check and crashed the inversion node (OverflowError) after the earlier steps had run."""


def parameter_checks(step, method):
    """The checks (``qsmprep.checks``) of every tunable parameter of ``(step, method)``'s library function that a
    parameters file may set (``read_parameters_file``); the deep options with their own flags are not among them."""
    from .checks import BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, is_int, number
    from .inversion.deep import MIN_TILE

    pad_factor = number(f"a number from 1 to {MAX_PAD_FACTOR:g} (the padded grid's memory grows with its cube)",
                        lambda v: 1 <= v <= MAX_PAD_FACTOR)
    mask = {"threshold": POSITIVE, "erode_mm": NON_NEGATIVE, "fill_holes": BOOL, "smooth_mm": NON_NEGATIVE,
            "separate_mm": NON_NEGATIVE}
    tile = (f"an integer >= {MIN_TILE} (a cube) or three of them",
            lambda v: (is_int(v) and v >= MIN_TILE) or (isinstance(v, list) and len(v) == 3
                                                         and all(is_int(n) and n >= MIN_TILE for n in v)))
    return {
        ("mask", "magnitude"): mask, ("mask", "quality"): mask,
        ("bgremove", "vsharp"): {
            "radii_mm": ("a non-empty list of radii in mm, each > 0",
                         lambda v: isinstance(v, list) and len(v) > 0 and all(map(POSITIVE[1], v))),
            "threshold": number("a number in (0, 1)", lambda v: 0 < v < 1)},
        ("bgremove", "resharp"): {"radius_mm": POSITIVE, "lam": POSITIVE, "tol": POSITIVE, "max_iter": POSITIVE_INT},
        ("bgremove", "pdf"): {"tol": POSITIVE, "max_iter": POSITIVE_INT, "pad_factor": pad_factor},
        ("inversion", "tkd"): {"threshold": number("a number in (0, 1/3]", lambda v: 0 < v <= 1 / 3),
                               "pad_factor": pad_factor},
        ("inversion", "cfl2"): {"lam": POSITIVE, "pad_factor": pad_factor},
        ("inversion", "ilsqr"): {"tol": POSITIVE, "max_iter": POSITIVE_INT, "pad_factor": pad_factor},
        ("inversion", "tv"): {"alpha": POSITIVE, "max_iter": POSITIVE_INT, "pad_factor": pad_factor,
                              "harmonic_radius_mm": NON_NEGATIVE},
        ("inversion", "deep"): {
            "resolution_tolerance": ("a number >= 0 (inf: always the acquisition's voxel size)",
                                     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
            "tile_shape": tile,
            "overlap": number(f"an integer from 0 to {MIN_TILE - 1} (below the smallest tile edge, {MIN_TILE}, so "
                              "that tiles advance)", lambda v: 0 <= v < MIN_TILE, integer=True)},
    }[(step, method)]


DEEP_FLAG_PARAMETERS = {"model": "--model", "refine_iters": "--refine", "refine_lambda": "--refine-lambda",
                        "refine_radius_mm": "--refine-radius", "refine_tv_weight": "--refine-tv"}
"""The deep inversion's parameters that have their own options (``qsmprep``, ``qsmprep-invert``; their argparse dests,
``qsmprep.cli.common.DEEP_OPTIONS``, follow from the flags), which a parameters file leaves to them."""


def read_parameters_file(path):
    """Method parameters from a TOML file, ``{step: {method: {name: value}}}``, checked.

    The file has a table per method, named ``[step.method]`` (``[mask.quality]``, ``[bgremove.vsharp]``,
    ``[inversion.tkd]``, ...), holding parameters of that method's library function (docs/usage.md, Method
    parameters). Raises NoInputError for a missing file, UsageError for invalid TOML, an unknown step, method
    or parameter, or a value its check (``parameter_checks``) refuses; each message names the file.
    """
    import tomllib

    from .checks import check_table
    from .errors import NoInputError
    from .io import read_text_utf8

    path = Path(path)
    try:
        parameters = tomllib.loads(read_text_utf8(path, "parameters file", error=UsageError))
    except FileNotFoundError as exc:
        raise NoInputError(f"parameters file {path} does not exist: check --parameters.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"parameters file {path} is not valid TOML ({exc}): fix its syntax.") from exc
    except OSError as exc:
        raise UsageError(f"parameters file {path} cannot be read ({exc.strerror or exc}): check --parameters.") from exc
    methods = {}
    for step, method in LIBRARY_FUNCTIONS:
        methods.setdefault(step, []).append(method)
    for step, tables in parameters.items():
        if not isinstance(tables, dict):
            raise UsageError(f"{path}: {step} = {tables!r} is outside any table: put each parameter in its method's "
                             "table [step.method], e.g. threshold = 0.15 under [inversion.tkd].")
        if step not in methods:
            raise UsageError(f"{path}: [{step}] is not a step with parameters; use tables [step.method] with "
                             f"step one of {list(methods)}.")
        for method, values in tables.items():
            where = f"[{step}.{method}]"
            if not isinstance(values, dict):
                raise UsageError(f"{path}: {method} under [{step}] is not in a method's table: put the parameters "
                                 f"of each method in its own, e.g. [{step}.{methods[step][-1]}].")
            if method not in methods[step]:
                raise UsageError(f"{path}: {where} is not a method of {step}; choose among {methods[step]}.")
            flags = [f"{name} (give {DEEP_FLAG_PARAMETERS[name]})" for name in values if name in DEEP_FLAG_PARAMETERS]
            if step == "inversion" and method == "deep" and flags:
                raise UsageError(f"{path}: {where} sets {', '.join(flags)}: these have their own options.")
            check_table(values, parameter_checks(step, method), where, path)
    return parameters


def default_parameters(step, method):
    """The keyword parameters of the library function of ``(step, method)`` with their default values."""
    signature = inspect.signature(library_function(step, method))
    return {name: p.default for name, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty and name not in DATA_ARGUMENTS}


def deep_model_available():
    """True when the default trained model's file is in this install (see qsmprep.inversion.deep)."""
    from .inversion.deep import default_model_path

    return default_model_path().is_file()


def default_inversion():
    """``deep`` when the shipped model file is present, else ``ilsqr``."""
    return "deep" if deep_model_available() else "ilsqr"


PRESETS = {
    "fast": {"unwrap": "laplacian", "bgremove": "vsharp", "inversion": ("tkd",)},
    "default": {"unwrap": "laplacian", "bgremove": "vsharp", "inversion": None},  # None: default_inversion()
    "research": {"unwrap": "laplacian", "bgremove": "vsharp", "inversion": ("tkd", "cfl2", "ilsqr", "tv")},
}
"""Method choices per preset; ``research`` adds ``deep`` when the shipped model file is present."""


def preset_methods(name):
    """(unwrap, bgremove, inversions) of preset ``name``."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    spec = PRESETS[name]
    inversions = spec["inversion"] or (default_inversion(),)
    if name == "research" and deep_model_available():
        inversions = ("deep",) + tuple(inversions)
    return spec["unwrap"], spec["bgremove"], tuple(inversions)


def new_run_id():
    """A sortable, unique id for one invocation: UTC time plus a short random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]


@dataclass
class Config:
    """Everything one qsmprep invocation does (see docs/usage.md)."""

    bids_dir: str
    output_dir: str
    work_dir: str
    analysis_level: str = "participant"
    participant_label: list = field(default_factory=list)
    session_label: list = field(default_factory=list)
    bids_filters: dict = field(default_factory=dict)
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    skip_bids_validation: bool = False
    boilerplate_only: bool = False
    stop_on_first_crash: bool = False
    verbosity: int = 0
    preset: str = "default"
    unwrap: str = "laplacian"
    bgremove: str = "vsharp"
    inversion: tuple = ("ilsqr",)
    mask: str = "quality"
    b0_tesla: float | None = None
    b0_dir: tuple | None = None
    resample_b0: bool = False
    invert_phase: bool = False
    device: str = "auto"
    parameters: dict = field(default_factory=dict)
    command: list = field(default_factory=list)
    run_id: str = field(default_factory=new_run_id)
    version: str = __version__
    runs: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def mask_strategy(self):
        """The masking strategy name, or ``"user"`` when ``mask`` is a file or folder."""
        return self.mask if self.mask in MASK_STRATEGIES else "user"

    @property
    def user_mask(self):
        """Path of the user mask file/folder, or None when a strategy is used."""
        return None if self.mask in MASK_STRATEGIES else self.mask

    @property
    def log_dir(self):
        """``OUTPUT_DIR/logs/<run_id>``: command, configuration, log and crash files of this invocation."""
        return Path(self.output_dir) / "logs" / self.run_id

    def resolve_parameters(self):
        """Fill ``parameters`` with every chosen method's parameters (defaults from the library)."""
        chosen = [("bgremove", self.bgremove)]
        if self.mask_strategy != "user":
            chosen.append(("mask", self.mask_strategy))
        chosen += [("inversion", m) for m in self.inversion]
        for step, method in chosen:
            values = {**default_parameters(step, method), **PIPELINE_PARAMETERS.get((step, method), {})}
            values.update(self.parameters.get(step, {}).get(method, {}))
            self.parameters.setdefault(step, {})[method] = values
        return self

    def to_dict(self):
        """JSON-able dict of the configuration (validated runs included)."""
        out = asdict(self)
        out["runs"] = [r.to_dict() if hasattr(r, "to_dict") else r for r in self.runs]
        return out

    def write(self, path):
        """Write the configuration as JSON to ``path``; return the path."""
        from .io import json_safe  # imports numpy: importing config itself stays light

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(self.to_dict()), indent=2, default=str, allow_nan=False) + "\n")
        return path
