"""Training recipes: TOML files naming a model, its data, augmentation, loss,
optimiser and schedule.  Shipped recipes live in ``qsmprep/data/recipes``.

Sections (see docs/deep/models-and-training.md): ``[model]`` arch + params,
``[data]`` generator config, ``[augment]``, ``[loss]`` name (+ weights),
``[optim]``, ``[train]``, and ``[adversarial]`` (QSMGAN) or ``[domain]``
(QSMInvNet+) where the method needs them.
"""

import copy
import tomllib
from importlib import resources
from pathlib import Path

from qsmprep.errors import NoInputError, UsageError

REQUIRED_SECTIONS = ("model", "data", "augment", "loss", "optim", "train")
OPTIONAL_SECTIONS = ("adversarial", "domain")
TRAIN_DEFAULTS = {
    "batch_size": 2, "steps": 1000, "val_every": 100, "val_samples": 8, "seed": 0, "num_workers": 0, "amp": True,
    "init": "",  # a shipped model name or checkpoint path to fine-tune from; "" = random initialisation
}
OPTIM_DEFAULTS = {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "schedule": "constant",
                  "decay_steps": 1000, "decay_rate": 0.96}  # the decay: lr x decay_rate^(step // decay_steps)
OPTIMIZERS = ("adam", "rmsprop")
SCHEDULES = ("constant", "exponential")


def _recipe_dir():
    return resources.files("qsmprep") / "data" / "recipes"


def list_recipes():
    """(name, one-line description) of every shipped recipe, sorted by name."""
    out = []
    for entry in sorted(_recipe_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            out.append((entry.name[: -len(".toml")], tomllib.loads(entry.read_text()).get("description", "")))
    return out


def load_recipe(name_or_path, overrides=()):
    """Read a recipe from a TOML path or a shipped recipe name, validated, as a dict.

    overrides: ``"section.key=value"`` strings applied before validation, the
    value written as in TOML (``train.batch_size=2``, ``optim.lr=3e-4``,
    ``augment.amplitude=[0.5, 2.0]``); default none.
    Raises NoInputError for a missing file or unknown name, UsageError for an
    invalid TOML, override or recipe.
    """
    text_source = str(name_or_path)
    path = Path(text_source)
    if path.suffix == ".toml" or path.is_file():  # a folder named like a recipe (a run's --out) is not one
        if not path.is_file():
            raise NoInputError(f"recipe {path} does not exist: give a TOML file or one of the shipped names.")
        text = path.read_text()
    else:
        entry = _recipe_dir() / f"{text_source}.toml"
        if not entry.is_file():
            names = ", ".join(n for n, _ in list_recipes())
            raise NoInputError(f"no shipped recipe named {text_source!r}: choose one of {names}, or give a TOML path.")
        text = entry.read_text()
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe {name_or_path} is not valid TOML ({exc}): fix the file.") from exc
    for override in overrides:
        _apply_override(recipe, override)
    return validate_recipe(recipe, source=text_source)


def _apply_override(recipe, override):
    """Set one ``section.key=value`` override (value in TOML syntax) in place."""
    target, sep, value_text = override.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot or not key:
        raise UsageError(f"override {override!r} must look like section.key=value, e.g. train.batch_size=2.")
    if not isinstance(recipe.get(section), dict):
        raise UsageError(f"override {override!r}: the recipe has no [{section}] section.")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"override {override!r}: {value_text!r} is not a TOML value (quote strings).") from exc
    recipe[section][key] = value


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_model(model, source):
    """Build the recipe's network once (on the CPU), so an unknown or bad [model] key is a usage error, not a crash."""
    from qsmprep.deep.models import build_model

    params = {k: v for k, v in model.items() if k != "arch"}
    for key in ("width", "depth"):
        if key in params and not (_is_int(params[key]) and params[key] >= 1):
            raise UsageError(f"{source}: [model] {key} must be a positive integer, got {params[key]!r}.")
    try:
        build_model(model["arch"], **params)
    except TypeError as exc:  # an unknown keyword
        raise UsageError(f"{source}: [model] {params} is not a {model['arch']} ({exc}); check the key names.") from exc
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"{source}: [model] {params} does not build a {model['arch']} ({exc}).") from exc


def validate_recipe(recipe, source="recipe"):
    """Check a recipe dict and return a copy with defaults filled in.

    Raises UsageError naming ``source`` and the offending key.
    """
    recipe = copy.deepcopy(dict(recipe))
    for section in REQUIRED_SECTIONS:
        if not isinstance(recipe.get(section), dict):
            raise UsageError(f"{source}: missing [{section}] section.")
    unknown = set(recipe) - set(REQUIRED_SECTIONS) - set(OPTIONAL_SECTIONS) - {"description", "reference"}
    if unknown:
        raise UsageError(f"{source}: unknown section(s) {sorted(unknown)}.")
    from qsmprep.deep.models import ARCHITECTURES

    arch = recipe["model"].get("arch")
    if arch not in ARCHITECTURES:
        raise UsageError(f"{source}: [model] arch {arch!r} is not one of {sorted(ARCHITECTURES)}.")
    if ("name" in recipe["loss"]) == ("terms" in recipe["loss"]):
        raise UsageError(f"{source}: [loss] needs a name or terms (a weighted sum of named losses), not both.")
    for section, defaults in (("train", TRAIN_DEFAULTS), ("optim", OPTIM_DEFAULTS)):
        unknown = sorted(set(recipe[section]) - set(defaults))
        if unknown:
            raise UsageError(f"{source}: unknown [{section}] key(s) {unknown}; known: {sorted(defaults)}.")
        recipe[section] = {**defaults, **recipe[section]}
    optim, train = recipe["optim"], recipe["train"]
    if optim["name"] not in OPTIMIZERS:
        raise UsageError(f"{source}: [optim] name must be one of {OPTIMIZERS}.")
    if optim["schedule"] not in SCHEDULES:
        raise UsageError(f"{source}: [optim] schedule must be one of {SCHEDULES}.")
    checks = [("train", key, train[key], "a positive integer", _is_int(train[key]) and train[key] >= 1)
              for key in ("batch_size", "steps", "val_every", "val_samples")]
    checks += [
        ("train", "seed", train["seed"], "an integer", _is_int(train["seed"])),
        ("train", "num_workers", train["num_workers"], "0 or more", _is_int(train["num_workers"]) and train["num_workers"] >= 0),
        ("train", "amp", train["amp"], "true or false", isinstance(train["amp"], bool)),
        ("train", "init", train["init"], "a model name or checkpoint path (\"\" for none)", isinstance(train["init"], str)),
        ("optim", "lr", optim["lr"], "a positive number", _is_number(optim["lr"]) and optim["lr"] > 0),
        ("optim", "weight_decay", optim["weight_decay"], "0 or more", _is_number(optim["weight_decay"]) and optim["weight_decay"] >= 0),
        ("optim", "betas", optim["betas"], "two numbers in [0, 1)", isinstance(optim["betas"], list) and len(optim["betas"]) == 2
         and all(_is_number(b) and 0 <= b < 1 for b in optim["betas"])),
        ("optim", "decay_steps", optim["decay_steps"], "a positive integer", _is_int(optim["decay_steps"]) and optim["decay_steps"] >= 1),
        ("optim", "decay_rate", optim["decay_rate"], "a number in (0, 1]", _is_number(optim["decay_rate"]) and 0 < optim["decay_rate"] <= 1),
    ]
    for section, key, value, what, ok in checks:
        if not ok:
            raise UsageError(f"{source}: [{section}] {key} must be {what}, got {value!r}.")
    _check_model(recipe["model"], source)
    b0_dir = recipe["data"].get("b0_dir", [0.0, 0.0, 1.0])
    if [float(v) for v in b0_dir] != [0.0, 0.0, 1.0]:
        raise UsageError(
            f"{source}: [data] b0_dir must be [0, 0, 1]: models are trained with B0 along the k axis "
            "and inference resamples data to that orientation."
        )
    if "adversarial" in recipe and arch != "qsmgan":
        raise UsageError(f"{source}: [adversarial] training needs arch 'qsmgan', not {arch!r}.")
    if "domain" in recipe and arch != "qsminvnet":
        raise UsageError(f"{source}: [domain] adaptation needs arch 'qsminvnet' (domain-specific batch norm), not {arch!r}.")
    return recipe
