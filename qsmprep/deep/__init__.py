"""Deep dipole inversion: training data, augmentation, losses, models, training.

Submodules are imported explicitly (``from qsmprep.deep import losses``) so
that importing this package stays cheap and does not pull in PyTorch.
"""

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

from ..errors import DataError, NoInputError

METADATA_KEY = "qsmprep"
"""Key of the JSON metadata inside a checkpoint's safetensors header."""


def shipped_model_path(name):
    """Path of the shipped model ``name`` (qsmprep/data/models/<name>.safetensors); imports no torch."""
    return Path(str(resources.files("qsmprep") / "data" / "models" / f"{name}.safetensors"))


def checkpoint_path(name_or_path):
    """The file of a shipped model name (qsmprep/data/models/<name>.safetensors) or of a checkpoint path.

    Raises NoInputError for a name that is not shipped.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix == ".safetensors" or os.sep in text or path.exists()):
        path = shipped_model_path(text)
        if not path.is_file():
            raise NoInputError(f"no shipped model named {text!r} ({path} is absent): give a checkpoint path instead.")
    return path


def read_metadata(name_or_path):
    """The qsmprep metadata dict of a shipped model name or checkpoint path (see ``file_metadata``)."""
    return file_metadata(checkpoint_path(name_or_path))


def file_metadata(path):
    """The qsmprep metadata dict in the header of the safetensors file ``path``; reads neither weights nor torch.

    Raises NoInputError if the file is missing, DataError if it is not a
    safetensors file or carries no readable qsmprep metadata.
    """
    from safetensors import SafetensorError, safe_open

    from ..io import require_file

    path = require_file(path, "checkpoint")
    try:
        with safe_open(str(path), framework="numpy") as f:  # the header only
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"checkpoint {path} is not a readable safetensors file ({exc}).") from exc
    if raw is None:
        raise DataError(f"checkpoint {path} has no qsmprep metadata: it was not written by qsmprep and is refused.")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"checkpoint {path} has unreadable metadata ({exc}).") from exc


def is_shipped_model(name_or_path):
    """True when ``name_or_path`` names a model shipped in the package (by name, or by its file's path)."""
    path = checkpoint_path(name_or_path)
    return path == shipped_model_path(path.stem)


def recorded_recipe(meta):
    """(recipe, its ``[train]`` table) that a checkpoint's metadata records; {} for either where it records none."""
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    return recipe, recipe.get("train") if isinstance(recipe.get("train"), dict) else {}


def model_provenance(name_or_path):
    """What identifies the weights a map came from: the model's name or file, the file's SHA-256, and the
    training step, recipe description, the checkpoint its training started from (``[train] init``: a fine-tune's
    steps are not the model's whole training), the steps of the training stages before it (its ``lineage``,
    oldest first, ``qsmprep.deep.trainer.earlier_stages``), the changes of recipe its runs were resumed with
    (``RecipeChanges``: {"Stage" (1 the first, the checkpoint's own the last), "Step", "Changes" {dotted key: {"from",
    "to"}}} each, oldest first, from each stage's ``recipe_changes``) and qsmprep version the checkpoint records
    (None where it records none)."""
    path = checkpoint_path(name_or_path)
    meta = file_metadata(path)
    recipe, train = recorded_recipe(meta)
    stages = [*(meta.get("lineage") or []), meta]
    changes = [{"Stage": number, "Step": change.get("step"), "Changes": change.get("changes")}
               for number, stage in enumerate(stages, start=1) for change in stage.get("recipe_changes") or []]
    return {"Name": str(name_or_path), "SHA256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "TrainingSteps": meta.get("step"), "InitializedFrom": train.get("init"),
            "EarlierTrainingSteps": [stage.get("step") for stage in meta["lineage"]] if meta.get("lineage") else None,
            "RecipeChanges": changes or None,
            "Recipe": recipe.get("description"), "TrainedWithQsmprep": meta.get("qsmprep_version")}
