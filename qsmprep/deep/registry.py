"""Model checkpoints: safetensors files carrying their own JSON metadata.

A checkpoint is one ``.safetensors`` file: the model's tensors, and under the
metadata key ``"qsmprep"`` a JSON document with the architecture, its
constructor parameters and input conventions (units, input scaling, output
transform, voxel-size and B0-direction handling, crop margin), the qsmprep
version, and whatever the trainer adds (recipe, step, validation metrics).
The same JSON is written beside it (``.json``) for people to read.  Loading
refuses any checkpoint whose metadata is missing or does not match the code
(unknown architecture, other convention version, changed conventions, tensor
names or shapes) with a DataError naming the file: never silent garbage.
No pickles are read or written.
"""

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import qsmprep
from qsmprep.deep import METADATA_KEY, checkpoint_path, file_metadata, is_shipped_model
from qsmprep.deep.models import ARCHITECTURES, CONVENTION_VERSION, build_model
from qsmprep.errors import DataError, QSMPrepError
from qsmprep.io import write_atomic, write_text_atomic

FORMAT = "qsmprep-checkpoint"


def save_tensors(path, tensors, metadata):
    """Write ``tensors`` (name -> tensor) and JSON ``metadata`` to ``path`` atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    text = json.dumps(metadata, sort_keys=True)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))


def read_tensors(path, device="cpu"):
    """(tensors, metadata dict) of a file written by :func:`save_tensors`.

    Raises NoInputError if missing, DataError if not a safetensors file or
    without qsmprep metadata.
    """
    path = Path(path)
    metadata = file_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"checkpoint {path} is not a readable safetensors file ({exc}).") from exc
    return tensors, metadata


def save_checkpoint(model, path, metadata=None):
    """Save an InversionNet's weights with its architecture and conventions.

    Parameters
    ----------
    model : InversionNet
    path : str or Path
        Target ``.safetensors`` file (written atomically); the metadata is
        also written beside it as ``.json``.
    metadata : dict, optional
        Extra JSON-serialisable entries (recipe, step, validation metrics).

    Returns
    -------
    The metadata dict stored.
    """
    meta = dict(metadata or {})
    meta.update(
        format=FORMAT,
        qsmprep_version=qsmprep.__version__,
        arch=model.arch,
        params=model.params,
        conventions=model.conventions(),
    )
    path = Path(path)
    save_tensors(path, model.state_dict(), meta)
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def load_model(name_or_path, device="cpu"):
    """Load a checkpoint into its architecture, in eval mode.

    Parameters
    ----------
    name_or_path : str or Path
        A shipped model name (qsmprep/data/models/<name>.safetensors) or the
        path of a checkpoint.
    device : str or torch.device, default "cpu"

    Returns
    -------
    (model, metadata)

    Raises
    ------
    NoInputError for an unknown name or missing file; DataError, naming the
    file, for missing or mismatching metadata or tensors.
    """
    path = checkpoint_path(name_or_path)
    tensors, meta = read_tensors(path)
    if meta.get("format") != FORMAT:
        raise DataError(f"checkpoint {path}: metadata format {meta.get('format')!r} is not {FORMAT!r}; refused.")
    arch = meta.get("arch")
    if arch not in ARCHITECTURES:
        raise DataError(f"checkpoint {path}: unknown architecture {arch!r} (known: {sorted(ARCHITECTURES)}); refused.")
    stored = meta.get("conventions") or {}
    if stored.get("convention_version") != CONVENTION_VERSION:
        raise DataError(
            f"checkpoint {path}: convention version {stored.get('convention_version')!r} differs from this "
            f"qsmprep's {CONVENTION_VERSION}; retrain or use a matching qsmprep version."
        )
    try:
        model = build_model(arch, **meta.get("params", {}))
    except (TypeError, ValueError) as exc:
        raise DataError(f"checkpoint {path}: parameters {meta.get('params')} do not build a {arch} ({exc}); refused.") from exc
    if model.conventions() != stored:
        raise DataError(f"checkpoint {path}: recorded conventions {stored} differ from the {arch} code's {model.conventions()}; refused.")
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(tensors))
    problems += [k for k in expected if k in tensors and tuple(expected[k].shape) != tuple(tensors[k].shape)]
    problems += [k for k in expected if k in tensors and expected[k].dtype != tensors[k].dtype]
    if problems:
        raise DataError(f"checkpoint {path}: tensors do not match a {arch} with {meta.get('params')} ({', '.join(problems[:5])}); refused.")
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta


def checked_model(name_or_path):
    """Load a model once, to refuse a bad one before any work; return how a pipeline run names it.

    Returns the name of a shipped model, else the checkpoint's absolute path
    (the pipeline's nodes run in other folders). Raises the ``load_model``
    error, its message led by ``--model NAME_OR_PATH``.
    """
    import torch

    text = str(name_or_path)
    threads = torch.get_num_threads()
    # one thread, so that no OpenMP thread team starts in this process: MultiProc forks its workers from it, and
    # a worker that inherits a team waits for ever on its threads at its first parallel torch operation
    torch.set_num_threads(1)
    try:
        load_model(text)
    except QSMPrepError as exc:
        raise type(exc)(f"--model {text}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)
    return text if is_shipped_model(text) else str(checkpoint_path(text).absolute())
