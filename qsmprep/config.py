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
INVERSION_METHODS = ("deep", "tkd", "cfl2", "ilsqr")
CLASSICAL_INVERSIONS = ("tkd", "cfl2", "ilsqr")
MASK_STRATEGIES = ("quality", "magnitude")
"""``quality`` (default): Otsu thresholds of the echo-combined magnitude and of the phase quality map;
``magnitude``: of the magnitude only (keeps scalp and skull wherever they give signal)."""

PIPELINE_REFINE_RADIUS_MM = 8.0
"""The pipeline's high-pass radius for the deep refinement (``deep_invert``'s ``refine_radius_mm``; the
library's default is off). qsmprep's own local fields carry residual background fields, which the plain
refinement turns into susceptibility: with 8 mm the shipped model scores 6-23 points better on them and
1 point better on the 2016 challenge data (docs/benchmarks.md, Pipeline-made local fields)."""

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
    ("inversion", "deep"): "qsmprep.inversion.deep:deep_invert",
}
"""The library function behind each (step, method); its keyword defaults are the parameters.

Unwrapping has none here: ``qsmprep.phase.combine.total_field_hz`` runs its unwrapper with its defaults."""

DATA_ARGUMENTS = frozenset({
    "phase_rad", "magnitude", "quality", "mask", "total_field", "local_field_ppm", "voxel_size_mm", "b0_dir",
    "weights", "device", "exclude",
})
"""Arguments the workflow fills from the data (not tunable parameters)."""

ALGORITHM_NAMES = {
    "tkd": "TKD (thresholded k-space division)",
    "cfl2": "closed-form L2 (Tikhonov on the gradient)",
    "ilsqr": "iLSQR (LSQR with streaking-artefact removal)",
    "deep": "deep neural network",
}


def library_function(step, method):
    """Import and return the library function of ``(step, method)``."""
    module, name = LIBRARY_FUNCTIONS[(step, method)].split(":")
    return getattr(importlib.import_module(module), name)


def default_parameters(step, method):
    """The keyword parameters of the library function of ``(step, method)`` with their default values."""
    signature = inspect.signature(library_function(step, method))
    return {
        name: (list(p.default) if isinstance(p.default, tuple) else p.default)
        for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty and name not in DATA_ARGUMENTS
    }


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
    "research": {"unwrap": "laplacian", "bgremove": "vsharp", "inversion": ("tkd", "cfl2", "ilsqr")},
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
            values = default_parameters(step, method)
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path
