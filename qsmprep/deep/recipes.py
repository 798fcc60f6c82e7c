"""Training recipes: TOML files naming a model, its data, augmentation, loss,
optimiser and schedule.  Shipped recipes live in ``qsmprep/data/recipes``.

Sections (see docs/deep/models-and-training.md): ``[model]`` arch + params,
``[data]`` generator config, ``[augment]``, ``[loss]`` name (+ weights),
``[optim]``, ``[train]``, and ``[adversarial]`` (QSMGAN) or ``[domain]``
(QSMInvNet+) where the method needs them.
"""

import copy
import functools
import json
import logging
import tomllib
from importlib import resources
from pathlib import Path

from qsmprep.checks import (
    BOOL,
    COUNT,
    NON_NEGATIVE,
    NUMBER,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    TABLE,
    check_table,
    each,
    is_number,
    is_sequence,
    number,
    one_of,
    value_range,
)
from qsmprep.errors import NoInputError, UsageError
from qsmprep.io import read_text_utf8

log = logging.getLogger(__name__)

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
    invalid TOML, override or recipe, or a checkpoint given as the recipe.
    """
    text_source = str(name_or_path)
    path = Path(text_source)
    if path.suffix == ".safetensors" or (path.is_file() and _is_safetensors(path)):
        run = path.parent if (path.parent / "checkpoint.safetensors").is_file() else "RUN_FOLDER"
        raise UsageError(f"{path} names a checkpoint (network weights), not a recipe: to fine-tune it, give a recipe "
                         f"and --set train.init='\"{path}\"'; to continue the run it belongs to, give that run's "
                         f"recipe with --out {run} --resume.")
    if path.suffix == ".toml" or path.is_file():  # a folder named like a recipe (a run's --out) is not one
        if not path.is_file():
            raise NoInputError(f"recipe {path} does not exist: give a TOML file or one of the shipped names.")
        text = read_text_utf8(path, "recipe", error=UsageError)
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
    recipe = validate_recipe(recipe, source=text_source)
    _warn_unused_generator_tables(recipe, text_source)
    return recipe


def _is_safetensors(path):
    """Whether the file ``path`` starts as a safetensors file does: an 8-byte little-endian header length that fits
    the file, then the JSON header's "{" (no TOML text starts so: its first 8 bytes would be a length of 2^61 or
    more)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _apply_override(recipe, override):
    """Set one ``section.key=value`` override (value in TOML syntax) in place.

    The key may be a dotted path into a sub-table, ``data.patterns.amplitude_ppm=0.05`` (created if the recipe
    has none, as TOML's dotted keys do); the section itself must exist.
    """
    target, sep, value_text = override.partition("=")
    names = target.strip().split(".")
    if not sep or len(names) < 2 or not all(names):
        raise UsageError(f"override {override!r} must look like section.key=value, e.g. train.batch_size=2.")
    section, *tables, key = names
    if not isinstance(recipe.get(section), dict):
        raise UsageError(f"override {override!r}: the recipe has no [{section}] section.")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"override {override!r}: {value_text!r} is not a TOML value (quote strings).") from exc
    table, path = recipe[section], section
    for name in tables:
        path += f".{name}"
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            raise UsageError(f"override {override!r}: {path} is a value, not a table, in the recipe.")
    table[key] = value


BETAS = ("two numbers in [0, 1)", lambda v: is_sequence(v, 2) and all(is_number(b) and 0 <= b < 1 for b in v))
B0_ALONG_K = ("[0, 0, 1]: models are trained with B0 along the k axis and inference resamples data to that orientation",
              lambda v: is_sequence(v, 3) and all(map(is_number, v)) and [float(b) for b in v] == [0.0, 0.0, 1.0])
WORKERS = ('an integer >= 0, or "auto"', lambda v: v == "auto" or COUNT[1](v))
TRAIN_CHECKS = {
    "batch_size": POSITIVE_INT, "steps": POSITIVE_INT, "val_every": POSITIVE_INT, "val_samples": POSITIVE_INT,
    "seed": COUNT, "num_workers": WORKERS, "amp": BOOL,  # numpy's generators take no negative seed
    "init": ("a model name or checkpoint path (\"\" for none)", lambda v: isinstance(v, str)),
}
OPTIM_CHECKS = {
    "name": one_of(*OPTIMIZERS), "lr": POSITIVE, "betas": BETAS, "weight_decay": NON_NEGATIVE,
    "schedule": one_of(*SCHEDULES), "decay_steps": POSITIVE_INT, "decay_rate": number("a number in (0, 1]", lambda v: 0 < v <= 1),
}
MODEL_CHECKS = {  # values of the keys an architecture may take; which keys it takes, build_model decides
    "width": POSITIVE_INT, "depth": POSITIVE_INT, "hidden": POSITIVE_INT, "crop_margin": COUNT, "num_domains": POSITIVE_INT,
    "residual": BOOL, "normalise_amplitude": BOOL, "prior": one_of("none", "cfl2"), "prior_lambda": POSITIVE,
}
AUGMENT_CHECKS = {  # qsmprep.deep.augment.Augmenter
    "rot90_b0": BOOL, "flip": BOOL, "amplitude": value_range(POSITIVE), "field_noise_ppm": value_range(POSITIVE),
    "rician_snr": value_range(POSITIVE), "te_s": POSITIVE, "b0_tesla": POSITIVE, "crop": each(POSITIVE_INT, 3, "[X, Y, Z]"),
    "background_residual": value_range(NON_NEGATIVE),
}
ADVERSARIAL_CHECKS = {  # qsmprep.deep.trainer (QSMGAN); all but betas and critic_width are required
    "generator_pretrain_steps": COUNT, "critic_pretrain_steps": COUNT, "n_critic": POSITIVE_INT, "gp_weight": NON_NEGATIVE,
    "lr": POSITIVE, "betas": BETAS, "content_weight": NON_NEGATIVE, "adversarial_weight": NON_NEGATIVE,
    "critic_width": POSITIVE_INT,
}
ADVERSARIAL_OPTIONAL = ("betas", "critic_width")
DOMAIN_CHECKS = {  # qsmprep.deep.trainer (QSMInvNet+)
    "source": ("\"simulated\" or a folder of <name>_field and <name>_mask NIfTI files", lambda v: isinstance(v, str) and v != ""),
    "lambda_max": NON_NEGATIVE, "lambda_ramp_steps": COUNT, "batch_size": POSITIVE_INT, "loss": TABLE, "augment": TABLE,
}


@functools.cache
def library_checks():
    """The tables that need names from the torch-importing modules (kept out of ``import recipes``).

    Returns a dict: "data", "data.patterns", "data.analytic", "data.brain"
    (the generators' keyword options), "loss" and "loss term".
    """
    from qsmprep.deep.data import GENERATORS
    from qsmprep.deep.generators import PATTERN_SHAPES
    from qsmprep.deep.losses import LOSS_NAMES

    def generator_ok(v):
        if isinstance(v, str):
            return v in GENERATORS
        return (isinstance(v, dict) and set(v) <= set(GENERATORS) and all(is_number(w) and w >= 0 for w in v.values())
                and sum(v.values()) > 0)

    count_range, positive_range = value_range(COUNT), value_range(POSITIVE)
    loss_options = {"name": one_of(*LOSS_NAMES), "masked": BOOL, "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE,
                    "gamma": NON_NEGATIVE, "magnitude_weights": BOOL, "b0_dir": B0_ALONG_K, "te_s": POSITIVE,
                    "b0_tesla": POSITIVE, "pad_factor": number("a number >= 1", lambda v: v >= 1)}
    return {
        "data": {  # qsmprep.deep.data
            "generator": (f"one of {list(GENERATORS)} or a table of weights >= 0 over them with a positive sum, "
                          "e.g. {patterns = 0.5, brain = 0.5}", generator_ok),
            "patch": each(POSITIVE_INT, 3, "[X, Y, Z]"), "voxel_size_mm": each(POSITIVE, 3, "[x, y, z] in mm"),
            "voxel_size_range_mm": each(positive_range, 3, "[[low, high], [low, high], [low, high]] in mm"),
            "b0_dir": B0_ALONG_K, "border_vox": COUNT, "pad_factor": number("a number >= 2", lambda v: v >= 2),
            "mask": one_of("full", "border", "blob"), "mask_border_vox": COUNT, "magnitude": one_of("random", "ones"),
            **{name: TABLE for name in GENERATORS},
        },
        "data.patterns": {  # qsmprep.deep.generators.random_patterns_chi
            "border_vox": COUNT, "large_share": PROBABILITY, "n_structures": count_range, "amplitude_ppm": POSITIVE,
            "large_size": positive_range, "small_size": positive_range, "blur_mm": value_range(NON_NEGATIVE),
            "texture_share": PROBABILITY,
            "shapes": (f"a non-empty list of {list(PATTERN_SHAPES)}",
                       lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(s in PATTERN_SHAPES for s in v)),
        },
        "data.analytic": {  # qsmprep.deep.generators.analytic_spheres_cylinders
            "n_spheres": count_range, "n_cylinders": count_range, "chi_max_ppm": POSITIVE,
            "sphere_radius_mm": positive_range, "cylinder_radius_mm": positive_range,
        },
        "data.brain": {  # qsmprep.deep.generators.brain_like_sample
            "subjects": ("a non-empty list of phantom seeds (integers >= 0)",
                         lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(COUNT[1](s) for s in v)),
            "reference_voxel_mm": POSITIVE, "rotation_deg": NON_NEGATIVE, "elastic_mm": NON_NEGATIVE,
            "elastic_correlation_mm": POSITIVE, "contrast_scale": value_range(NON_NEGATIVE), "contrast_offset_ppm": NON_NEGATIVE,
            "n_haemorrhages": count_range, "haemorrhage_ppm": value_range(NUMBER), "haemorrhage_radius_mm": positive_range,
            "n_calcifications": count_range, "calcification_ppm": value_range(NUMBER), "calcification_radius_mm": positive_range,
            "te_s": POSITIVE,
        },
        "loss": {  # qsmprep.deep.losses.build_loss
            **loss_options,
            "terms": ("a non-empty list of tables such as {name = \"l1\", weight = 0.5}",
                      lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(t, dict) for t in v)),
        },
        "loss term": {**loss_options, "weight": NON_NEGATIVE},
    }


RUN_SETTINGS = ("train.steps", "train.num_workers", "train.val_every")
"""Recipe keys that decide how long a run goes, how many processes draw its data and how often it validates and
saves, not what a step does: a resume may change them (raising train.steps is how a run trains longer) without it
being recorded as a change of recipe (``recipe_changes``)."""


def _with_defaults(recipe):
    """A shallow copy of ``recipe`` with the [train] and [optim] defaults filled in."""
    return {**recipe, "train": {**TRAIN_DEFAULTS, **recipe.get("train", {})},
            "optim": {**OPTIM_DEFAULTS, **recipe.get("optim", {})}}


def _flat(table, prefix=""):
    """``table``'s values by dotted key ("optim.lr", "data.patterns.amplitude_ppm"), its sub-tables flattened."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(old, new):
    """Where recipe ``new`` differs from ``old``: {dotted key: (old value, new value)}, sorted by key, None for an
    entry a recipe lacks (TOML has no null). Defaults are filled in both (a checkpoint saved before a default
    existed lacks it) and ``RUN_SETTINGS`` are left out."""
    before, after = _flat(_with_defaults(old)), _flat(_with_defaults(new))
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if key not in RUN_SETTINGS and before.get(key) != after.get(key)}


def toml_like(value):
    """A recipe value as --set would write it ("l1", 0.5, [0.9, 0.999]), or "unset" for an absent one (None)."""
    return "unset" if value is None else json.dumps(value)


def active_generators(data):
    """The generators a [data] table draws samples from: its ``generator``, or those of positive weight."""
    generator = data.get("generator", "patterns")
    return [generator] if isinstance(generator, str) else [name for name, weight in generator.items() if weight > 0]


def _warn_unused_generator_tables(recipe, source):
    """Warn of each key of a [data.<generator>] table that the recipe's generators leave unused (as the pipeline
    warns of a parameters-file table for a method it does not run): it changes nothing but the stored recipe."""
    used = active_generators(recipe["data"])
    if "domain" in recipe and recipe["domain"].get("source", "simulated") == "simulated":
        used.append("brain")  # QSMInvNet+'s simulated target fields are brain-like samples
    generator = recipe["data"].get("generator", "patterns")
    for name, table in recipe["data"].items():
        if name != "generator" and isinstance(table, dict) and table and name not in used:
            log.warning("%s: [data.%s] %s has no effect: this recipe's [data] generator is %r, which does not draw "
                        "from %s.", source, name, ", ".join(table), generator, name)


def _check_loss(loss, where, source):
    """Check a [loss]-like table: its values, its terms, and (``build_loss``) which options each loss takes."""
    from qsmprep.deep.losses import build_loss

    checks = library_checks()
    check_table(loss, checks["loss"], where, source)
    if ("name" in loss) == ("terms" in loss):
        raise UsageError(f"{source}: {where} needs a name or terms (a weighted sum of named losses), not both.")
    for index, term in enumerate(loss.get("terms", []), start=1):
        check_table(term, checks["loss term"], f"{where} term {index}", source, required=("name",))
    try:
        build_loss(loss)
    except UsageError as exc:
        raise UsageError(f"{source}: {where} {exc}.") from exc


def _check_model(model, source):
    """Build the recipe's network once (on the CPU), so an unknown or bad [model] key is a usage error, not a
    crash; returns it."""
    from qsmprep.deep.models import build_model

    params = {k: v for k, v in model.items() if k != "arch"}
    check_table(params, MODEL_CHECKS, "[model]", source, closed=False)
    try:
        return build_model(model["arch"], **params)
    except TypeError as exc:  # an unknown keyword
        raise UsageError(f"{source}: [model] {params} is not a {model['arch']} ({exc}); check the key names.") from exc
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"{source}: [model] {params} does not build a {model['arch']} ({exc}).") from exc


def _check_fit(recipe, network, source):
    """Refuse borders, crops and a crop margin that leave nothing of the [data] patch (defaults: build_dataset's)."""
    from qsmprep.deep.data import build_dataset

    try:
        data = build_dataset(recipe["data"], recipe["augment"], 0).make  # resolves the defaults; draws nothing
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}.") from exc
    patch, largest = list(data.patch), (min(data.patch) - 1) // 2
    border_where = "[data.patterns]" if "border_vox" in recipe["data"].get("patterns", {}) else "[data]"
    borders = [(border_where, "border_vox", data.options["patterns"]["border_vox"], "patterns" in data.names),
               ("[data]", "mask_border_vox", data.mask_border_vox, data.mask == "border" and set(data.names) - {"brain"})]
    for where, key, value, used in borders:
        if used and value > largest:
            raise UsageError(f"{source}: {where} {key} {value} leaves no voxel of the {patch} patch: make it at most "
                             f"{largest}, or the [data] patch larger.")
    augments = [("[augment]", recipe["augment"]), ("[domain.augment]", recipe.get("domain", {}).get("augment", {}))]
    for where, augment in augments:
        if any(c > n for c, n in zip(augment.get("crop") or patch, patch)):
            raise UsageError(f"{source}: {where} crop {augment['crop']} does not fit the [data] patch {patch}: make it "
                             "at most the patch size.")
        shape = list(augment.get("crop") or patch)
        if augment.get("rot90_b0") and shape[0] != shape[1]:  # B0 along k: the turn swaps the first two sides
            raise UsageError(f"{source}: {where} rot90_b0 turns each {shape} sample about B0 (the third axis), which "
                             "swaps its first two sides, and a batch needs one shape: make those two sides equal, or "
                             "set rot90_b0 = false.")
    size = min(recipe["augment"].get("crop") or patch)
    if 2 * network.crop_margin >= size:
        raise UsageError(f"{source}: [model] crop_margin {network.crop_margin} crops all of a {size}-voxel training "
                         f"input: make it below {(size + 1) // 2}, or the [data] patch larger.")
    if "domain" in recipe and network.params["num_domains"] < 2:
        raise UsageError(f"{source}: [model] num_domains must be at least 2 with a [domain] section (domain 0 "
                         f"synthetic, 1 target), got {network.params['num_domains']}.")


def validate_recipe(recipe, source="recipe"):
    """Check a recipe dict and return a copy with defaults filled in.

    Every key of every section is checked against the tables above (unknown
    keys, wrong types, values out of range, NaN and infinity refused), the
    [model] is built once, and the patch must hold the borders, crops and
    crop margin asked of it. Raises UsageError naming ``source``, the
    section and key, what the value must be, and the value.
    """
    recipe = copy.deepcopy(dict(recipe))
    for section in REQUIRED_SECTIONS:
        if section not in recipe:
            raise UsageError(f"{source}: missing [{section}] section.")
    for section in REQUIRED_SECTIONS + OPTIONAL_SECTIONS:
        if section in recipe and not isinstance(recipe[section], dict):
            raise UsageError(f"{source}: [{section}] must be a section (a TOML table), got {recipe[section]!r}.")
    unknown = set(recipe) - set(REQUIRED_SECTIONS) - set(OPTIONAL_SECTIONS) - {"description", "reference"}
    if unknown:
        raise UsageError(f"{source}: unknown section(s) {sorted(unknown)}.")
    from qsmprep.deep.models import ARCHITECTURES

    arch = recipe["model"].get("arch")
    if arch not in ARCHITECTURES:
        raise UsageError(f"{source}: [model] arch {arch!r} is not one of {sorted(ARCHITECTURES)}.")
    if "adversarial" in recipe and arch != "qsmgan":
        raise UsageError(f"{source}: [adversarial] training needs arch 'qsmgan', not {arch!r}.")
    if "domain" in recipe and arch != "qsminvnet":
        raise UsageError(f"{source}: [domain] adaptation needs arch 'qsminvnet' (domain-specific batch norm), not {arch!r}.")
    recipe = _with_defaults(recipe)
    checks = library_checks()
    tables = [(recipe["train"], TRAIN_CHECKS, "[train]", ()), (recipe["optim"], OPTIM_CHECKS, "[optim]", ()),
              (recipe["data"], checks["data"], "[data]", ()), (recipe["augment"], AUGMENT_CHECKS, "[augment]", ())]
    tables += [(recipe["data"].get(key[len("data."):], {}), checks[key], f"[{key}]", ()) for key in checks if key.startswith("data.")]
    if "adversarial" in recipe:
        required = [key for key in ADVERSARIAL_CHECKS if key not in ADVERSARIAL_OPTIONAL]
        tables.append((recipe["adversarial"], ADVERSARIAL_CHECKS, "[adversarial]", required))
    if "domain" in recipe:
        tables.append((recipe["domain"], DOMAIN_CHECKS, "[domain]", ()))
        tables.append((recipe["domain"].get("augment", {}), AUGMENT_CHECKS, "[domain.augment]", ()))
    for table, table_checks, where, required in tables:
        check_table(table, table_checks, where, source, required=required)
    _check_loss(recipe["loss"], "[loss]", source)
    if "loss" in recipe.get("domain", {}):
        _check_loss(recipe["domain"]["loss"], "[domain.loss]", source)
    _check_fit(recipe, _check_model(recipe["model"], source), source)
    return recipe
