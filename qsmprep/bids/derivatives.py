"""BIDS derivatives of qsmprep: file names, dataset description, sidecars.

Names come from the path pattern in ``qsmprep/data/bids_config.json``,
the same configuration the workflow's DerivativesDataSink uses, so the
names written and the names listed (docs/outputs.md,
qsmprep/data/expected_outputs/) cannot drift apart.
"""

import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse
from urllib.request import url2pathname

from .. import __version__
from .discovery import ENTITY_KEYS
from ..errors import DataError
from ..io import read_json_object, sidecar_path, write_text_atomic

CODE_URL = "https://github.com/qsmprep/qsmprep"

BIDS_CONFIG = resources.files("qsmprep") / "data" / "bids_config.json"
"""pybids configuration (entities and path pattern) of qsmprep derivatives."""

BIDS_VERSION = "1.10.0"

RAW_DATASET_NAME = "raw"
"""Name of the input dataset in ``DatasetLinks``: sources are ``bids:raw:<path>``."""

def generated_by_names(description):
    """The ``Name`` of each ``GeneratedBy`` entry of a parsed dataset_description.json (a dict); [] where it has
    none or they are not in the BIDS layout (a list of objects)."""
    entries = description.get("GeneratedBy")
    return [str(e.get("Name")) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def dataset_makers(folder):
    """``generated_by_names`` of ``folder``'s dataset_description.json: None when it has none, [] when it cannot be
    read or is not a JSON object in the BIDS layout (then no tool, qsmprep included, may be taken for its maker)."""
    description = Path(folder) / "dataset_description.json"
    if not description.is_file():
        return None
    try:
        return generated_by_names(read_json_object(description))
    except (OSError, DataError):  # unreadable, not UTF-8 JSON, or not an object
        return []


BIDSIGNORE = ("logs/", "*.html", "sub-*/figures/", "group_qsm.*")
"""Paths in the output dataset that are not BIDS files (logs, reports, report figures, the group level's table)."""

OUTPUTS = {
    "chimap": {"suffix": "Chimap", "desc": "{method}", "units": "ppm"},
    "mask": {"suffix": "mask", "desc": "brain", "units": None},
    "total_field": {"suffix": "fieldmap", "desc": "total", "units": "Hz"},
    "local_field": {"suffix": "fieldmap", "desc": "local", "units": "ppm"},
}
"""Per-run outputs: BIDS suffix, desc entity and physical unit of each."""


def load_bids_config():
    """The pybids configuration dict of qsmprep derivatives."""
    return json.loads(BIDS_CONFIG.read_text())


def derivative_path(run, output, method=None, extension=".nii.gz"):
    """Relative path of one output of ``run`` (a GRERun) in the derivatives dataset.

    ``output`` is a key of OUTPUTS; ``method`` names the inversion for
    ``"chimap"``. Example: ``sub-01/ses-2/anat/sub-01_ses-2_desc-tkd_Chimap.nii.gz``.
    """
    from bids.layout.writing import build_path

    spec = OUTPUTS[output]
    entities = dict(run.entities, datatype="anat", suffix=spec["suffix"], extension=extension,
                    desc=spec["desc"].format(method=method))
    path = build_path(entities, path_patterns=load_bids_config()["default_path_patterns"], strict=True)
    if path is None:
        raise ValueError(f"cannot name output {output!r} of {run.name} from {entities}")
    return path


def run_output_paths(run, methods):
    """Every NIfTI output path of ``run`` (relative), keyed as OUTPUTS / ``chimap:<method>``."""
    paths = {key: derivative_path(run, key) for key in OUTPUTS if key != "chimap"}
    paths.update({f"chimap:{m}": derivative_path(run, "chimap", m) for m in methods})
    return paths


def run_output_files(run, methods):
    """Every file qsmprep writes for ``run`` in the derivatives dataset (relative): each NIfTI output of
    ``run_output_paths`` and its JSON sidecar."""
    return [path for nifti in run_output_paths(run, methods).values()
            for path in (nifti, str(sidecar_path(nifti)))]


def run_name_labels(name):
    """{BIDS key: label} of a run name as qsmprep writes it (``sub-01_ses-2_run-1`` -> {"sub": "01", "ses": "2",
    "run": "1"}), in its order; {} when a part of it is not key-label (a name edited by hand)."""
    pairs = [part.split("-", 1) for part in name.split("_")]
    return dict(pairs) if all(len(pair) == 2 for pair in pairs) else {}


def named_run_paths(output_dir, name, methods):
    """Every NIfTI output path of the run named ``name`` (e.g. ``sub-01_ses-2``) in ``output_dir``, absolute and keyed
    as in ``run_output_paths`` (``methods``: the inversions whose Chimaps to name); None when ``name`` is not a
    qsmprep run name."""
    entities = {key: entity for entity, key in ENTITY_KEYS.items()}
    labels = run_name_labels(name)
    if not labels or not labels.keys() <= entities.keys():
        return None
    run = SimpleNamespace(name=name, entities={entities[key]: value for key, value in labels.items()})
    return {key: Path(output_dir) / path for key, path in run_output_paths(run, methods).items()}


def processed_runs(output_dir, subject, methods):
    """The runs of ``subject`` whose derivatives are in ``output_dir``, found by any of them (brain mask, field maps,
    Chimaps of ``methods``), so that a run missing some is found all the same.

    Returns {run name: {output key (as in ``run_output_paths``): absolute Path}}, with only the outputs
    present.
    """
    found = {}
    for path in sorted((Path(output_dir) / f"sub-{subject}").glob("**/anat/*_desc-*.nii.gz")):
        name = path.name.partition("_desc-")[0]
        paths = found.get(name) or named_run_paths(output_dir, name, methods)
        if paths and path in paths.values():  # not another tool's file (desc-preproc_T1w), nor in another's folder
            found[name] = paths
    return {name: {key: path for key, path in paths.items() if path.is_file()} for name, paths in found.items()}


def participant_configs(output_dir):
    """("logs/<run_id>", configuration) of every participant invocation in ``output_dir`` that processed runs, oldest
    first (run ids sort by time; ``--boilerplate-only`` invocations processed nothing). DataError naming a
    config.json that is no JSON object."""
    for path in sorted(Path(output_dir).glob("logs/*/config.json")):
        config = read_json_object(path, "the configuration of a qsmprep run",
                                  fix="restore it, or delete its folder if that run processed nothing.")
        if not config.get("boilerplate_only"):
            yield f"logs/{path.parent.name}", config


def logged_runs(output_dir):
    """{run name: (its inversion methods, "logs/<run_id>")} of every run a participant invocation processed in
    ``output_dir``, from the last of their ``logs/<run_id>/config.json`` that names it (``participant_configs``): each
    invocation deletes a run's earlier derivatives before processing it, so the last says which it should have."""
    logged = {}
    for log_dir, config in participant_configs(output_dir):
        logged.update({run["name"]: (tuple(config.get("inversion", ())), log_dir) for run in config.get("runs", [])})
    return logged


def refused_runs(output_dir):
    """{run name: (its problems' messages, "logs/<run_id>")} of every run that the last participant invocation naming
    it refused (its config.json's ``problems``, from input validation); a run a later invocation processed is not
    listed, and one refused after it was processed is (its derivatives there are from that earlier invocation)."""
    last = {}
    for log_dir, config in participant_configs(output_dir):
        last.update(dict.fromkeys((run["name"] for run in config.get("runs", [])), None))
        messages = {}
        for problem in config.get("problems", []):
            messages.setdefault(problem["run"], []).append(problem["message"])
        last.update({name: ("; ".join(texts), log_dir) for name, texts in messages.items()})
    return {name: refusal for name, refusal in last.items() if refusal}


def linked_input_dataset(output_dir):
    """The input dataset folder that ``output_dir``'s description links (``DatasetLinks``), or None."""
    description = Path(output_dir) / "dataset_description.json"
    links = read_json_object(description).get("DatasetLinks") if description.is_file() else None
    raw = links.get(RAW_DATASET_NAME) if isinstance(links, dict) else None
    return Path(url2pathname(urlparse(raw).path)) if isinstance(raw, str) and raw.startswith("file:") else None


def runs_gone_from_input(output_dir, bids_dir, names):
    """The run names among ``names`` (e.g. ``sub-12_ses-2``) whose subject (and session) folder is no longer in
    ``bids_dir``, the input dataset ``output_dir`` was made from: a subject taken out of the dataset after a
    participant run refused it. Empty when ``bids_dir`` is not that dataset, so that a wrong BIDS_DIR drops
    nothing."""
    bids_dir = Path(bids_dir).absolute()
    if not bids_dir.is_dir() or linked_input_dataset(output_dir) != bids_dir:
        return set()
    gone = set()
    for name in names:
        labels = run_name_labels(name)
        folder = bids_dir / f"sub-{labels.get('sub')}" / (f"ses-{labels['ses']}" if "ses" in labels else "")
        if not folder.is_dir():
            gone.add(name)
    return gone


def bids_uri(path, bids_dir):
    """BIDS URI of input ``path`` relative to the raw dataset, e.g. ``bids:raw:sub-01/anat/x.nii.gz``."""
    rel = Path(path).absolute().relative_to(Path(bids_dir).absolute())
    return f"bids:{RAW_DATASET_NAME}:{rel.as_posix()}"


def write_dataset_description(output_dir, bids_dir):
    """Write ``dataset_description.json`` and ``.bidsignore`` of the derivatives dataset; return the former's path."""
    output_dir = Path(output_dir)
    description = {
        "Name": "qsmprep outputs: quantitative susceptibility maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmprep", "Version": __version__, "CodeURL": CODE_URL}],
        "DatasetLinks": {RAW_DATASET_NAME: Path(bids_dir).absolute().as_uri()},
        "SourceDatasets": [{"URL": Path(bids_dir).absolute().as_uri()}],  # recommended for derivatives
    }
    path = output_dir / "dataset_description.json"
    write_text_atomic(path, json.dumps(description, indent=2) + "\n")
    write_text_atomic(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")
    return path
