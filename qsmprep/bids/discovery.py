"""Find multi-echo gradient-echo (GRE) runs in a BIDS dataset with pybids.

A *run* is every magnitude and phase image of one acquisition: the files
that share subject, session, acquisition, run and suffix, split by the
``part`` entity (``mag`` / ``phase``). Suffixes searched: ``MEGRE`` (one
file per echo, ``echo-<n>``), ``T2starw`` and ``GRE`` (single echo, or one
4D file with all echoes and an ``EchoTime`` list in its sidecar).

Echoes are ordered by their numeric ``EchoTime`` (never as strings: echo-10
after echo-9); where an ``EchoTime`` is missing the numeric ``echo`` entity
is used, and validation (``qsmprep.bids.validation``) reports the problem.
Discovery only finds files; it judges nothing.
"""

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DataError, NoInputError, UsageError, few_named
from ..io import read_json_object, sidecar_path

log = logging.getLogger(__name__)

GRE_SUFFIXES = ("MEGRE", "T2starw", "GRE")
"""BIDS suffixes searched for gradient-echo magnitude and phase images."""

SINGLE_ECHO_SUFFIXES = ("T2starw", "GRE")
"""Suffixes for which a single echo is a valid acquisition (MEGRE needs two or more)."""

GRE_QUERY = {"suffix": list(GRE_SUFFIXES), "part": ["mag", "phase"], "extension": [".nii", ".nii.gz"]}
"""The pybids query for GRE magnitude and phase images; a ``--bids-filter-file`` may not change these entities."""

FILTER_FILE_KEY = "megre"
"""Key of the ``--bids-filter-file`` JSON whose entities restrict the GRE query."""

PYBIDS_CONFIG = "bids"
"""The pybids configuration ``BIDSLayout`` uses (its default): it names the entities a query may filter on."""


ENTITY_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "ceagent": "ce", "reconstruction": "rec",
               "run": "run", "chunk": "chunk"}
"""The BIDS entities that tell a run apart, in file-name order, and their keys in file names: those BIDS gives
MEGRE and T2starw images besides ``echo`` and ``part`` (a ``rec-norm`` and a ``rec-orig`` image are two runs)."""

FILE_ENTITIES = frozenset({"echo", "part", "suffix", "extension", "datatype"})
"""Entities of an input file that are not the run's (``ENTITY_KEYS``): one file's within its run, or its type."""


@dataclass(frozen=True)
class GRERun:
    """The magnitude and phase files of one gradient-echo acquisition.

    ``magnitude`` and ``phase`` hold one file per echo, ordered by echo time,
    or a single 4D file each (``multi_echo_4d``). ``*_meta`` are their sidecar
    metadata (BIDS inheritance applied), ``*_echoes`` their ``echo`` entity
    numbers (None where a file has none). The fields from ``echo_times_s``
    to ``mask`` are filled in by ``qsmprep.bids.validation.validate_runs``
    once the run passed every check; they are None before. Discovery fills
    ``foreign_entities`` and ``unread``, for validation to refuse.
    """

    subject: str
    session: str | None
    acquisition: str | None
    run: str | None
    suffix: str
    ceagent: str | None = None
    reconstruction: str | None = None
    chunk: str | None = None
    magnitude: tuple = ()
    phase: tuple = ()
    magnitude_meta: tuple = field(default=(), compare=False, repr=False)
    phase_meta: tuple = field(default=(), compare=False, repr=False)
    magnitude_echoes: tuple = field(default=(), compare=False, repr=False)
    phase_echoes: tuple = field(default=(), compare=False, repr=False)
    multi_echo_4d: bool = False
    echo_times_s: tuple | None = None
    phase_units: str | None = None
    b0_tesla: float | None = None
    b0_source: str | None = None
    """Where ``b0_tesla`` came from: "--b0-tesla", "ImagingFrequency" or "MagneticFieldStrength"."""
    shape: tuple | None = None
    affine: tuple | None = None
    mask: str | None = None
    foreign_entities: tuple = field(default=(), compare=False, repr=False)
    """(file, "key-value") for each entity of an input file that a gradient-echo image does not take in BIDS
    (e.g. ``flip-2``): it would not tell runs apart, so validation refuses the run."""
    unread: tuple = field(default=(), compare=False, repr=False)
    """(file, part or None) for each of the run's images that is neither part-mag nor part-phase (part-real,
    part-imag, or no part entity); a run of such images alone is refused by validation, with the fix."""

    @property
    def entities(self):
        """BIDS entities of the run (those that are set), in filename order."""
        return {k: getattr(self, k) for k in ENTITY_KEYS if getattr(self, k) is not None}

    @property
    def name(self):
        """Filename prefix of the run, e.g. ``sub-01_ses-2_acq-fast_run-1``."""
        return "_".join(f"{ENTITY_KEYS[k]}-{v}" for k, v in self.entities.items())

    @property
    def files(self):
        """Every input image of the run: magnitudes, then phases."""
        return tuple(self.magnitude) + tuple(self.phase)

    def to_dict(self):
        """JSON-able description (paths, entities, validated properties)."""
        out = asdict(self)
        out.pop("magnitude_meta")
        out.pop("phase_meta")
        out.pop("unread")
        out["name"] = self.name
        return out


def read_filter_file(path):
    """Read a ``--bids-filter-file``: JSON ``{"megre": {entity: value(s)}}``.

    Returns the entity dict for the GRE query (empty when the key is absent).
    Raises UsageError when the file is missing, is not such a JSON object,
    has other top-level keys (which would filter nothing), or names an entity
    pybids does not know or one qsmprep's own query sets
    (``_check_filter_entities``).
    """
    path = Path(path)
    example = f'{{"{FILTER_FILE_KEY}": {{"acquisition": "fast"}}}}'
    try:
        content = read_json_object(path, "BIDS filter file", f"it must be a JSON object like {example}.", UsageError)
    except FileNotFoundError as exc:
        raise UsageError(f"BIDS filter file {path} does not exist: check the --bids-filter-file path.") from exc
    except OSError as exc:
        raise UsageError(f"BIDS filter file {path} cannot be read ({exc.strerror or exc}): give a JSON file "
                         "to --bids-filter-file.") from exc
    if not isinstance(content.get(FILTER_FILE_KEY, {}), dict):
        raise UsageError(f"BIDS filter file {path} must be a JSON object like {example}.")
    unknown = sorted(set(content) - {FILTER_FILE_KEY})
    if unknown:  # e.g. "t2starw" or an fMRIPrep key: it would filter nothing, and every run would be processed
        raise UsageError(
            f"BIDS filter file {path} has keys qsmprep does not read ({', '.join(map(repr, unknown))}): put the "
            f'entities under "{FILTER_FILE_KEY}", which selects every gradient-echo run (MEGRE, T2starw, GRE).'
        )
    filters = dict(content.get(FILTER_FILE_KEY, {}))
    _check_filter_entities(path, filters)
    return filters


def _check_filter_entities(path, filters):
    """Raise UsageError, naming the filter file ``path``, when ``filters`` has a key that is not an entity of
    pybids' ``PYBIDS_CONFIG`` (e.g. the file-name key "acq" for "acquisition"), or one of ``GRE_QUERY``'s keys,
    which qsmprep sets itself (a filter on them would find other files and mislead the later checks)."""
    from bids.layout.models import Config  # heavy import: only with a filter file

    entities = Config.load(PYBIDS_CONFIG).entities
    allowed = ", ".join(sorted(set(entities) - set(GRE_QUERY)))
    unknown = sorted(set(filters) - set(entities))
    if unknown:
        full_names = {key: name for name, entity in entities.items() if (key := _key_in_file_names(entity.pattern))}
        named = [f"{key!r} (did you mean {full_names[key]!r}?)" if key in full_names else repr(key) for key in unknown]
        raise UsageError(f"BIDS filter file {path} filters on {', '.join(named)}, which pybids does not know as "
                         f"entities: use the full entity names, one of {allowed}.")
    empty = sorted(key for key, value in filters.items() if value == [])
    if empty:  # pybids reads an empty list as no filter at all, so every run would be processed
        raise UsageError(f"BIDS filter file {path} filters on {', '.join(map(repr, empty))} with an empty list, "
                         "which would select every run: give the value(s) to keep, or remove the key.")
    widened = sorted(key for key in set(filters) & set(GRE_QUERY) if not _narrows(filters[key], GRE_QUERY[key]))
    if widened:
        query = "; ".join(f"{key} {'/'.join(values)}" for key, values in GRE_QUERY.items())
        raise UsageError(f"BIDS filter file {path} filters on {', '.join(map(repr, widened))} with values outside "
                         f"qsmprep's own query ({query}): choose among those (e.g. {{\"suffix\": \"MEGRE\"}}), or "
                         f"filter on other entities, one of {allowed}.")
    parts = filters.get("part", GRE_QUERY["part"])
    if set(parts if isinstance(parts, list) else [parts]) != set(GRE_QUERY["part"]):  # each run needs both parts
        raise UsageError(f"BIDS filter file {path} filters on 'part' {parts!r}, but every run needs its magnitude "
                         "and its phase images (part-mag and part-phase): remove 'part' from the filter.")


def require_bids_dir(bids_dir):
    """``bids_dir`` as a Path; NoInputError, saying which, when it does not exist or is a file."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        what = "is a file, not a folder" if bids_dir.exists() else "does not exist"
        raise NoInputError(f"BIDS directory {bids_dir} {what}: check the first positional argument.")
    return bids_dir


def _narrows(value, own_values):
    """Whether a filter value (one or a list) only selects among ``own_values``, as ``{"suffix": "MEGRE"}`` does."""
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(v in own_values for v in values)


def _key_in_file_names(pattern):
    """The key a pybids entity takes in file names (``acq`` for ``acquisition``, ``mt`` for ``mtransfer``), read
    from its ``pattern`` (a ``[_/\\]+key-(...)`` regular expression), or None where it has none."""
    found = re.search(r"([a-zA-Z]+)-\(", pattern or "")
    return found.group(1) if found else None


def _file_key(name, value, patterns):
    """``name``-``value`` as a file name writes it (``flip-2`` for pybids' ``flip``; ``mt-on`` for ``mtransfer``),
    from the entity's pybids ``patterns``."""
    return f"{_key_in_file_names(patterns.get(name)) or name}-{value}"


NO_FILTER = object()
"""What ``_narrowed`` is given for an entity the ``--bids-filter-file`` does not filter on (its null means: none)."""

LABELS_SHOWN = 10
"""How many of a dataset's subject or session labels a message about a missing one lists."""


def _narrowed(wanted, filtered, what, option):
    """The labels ``wanted`` by ``option`` that a ``--bids-filter-file`` value ``filtered`` (a label, a list, None
    for files without the entity, or ``NO_FILTER``) also selects: both narrow the query. NoInputError when none is
    left (a filter label the dataset lacks is refused before, ``_check_filter_labels``)."""
    if filtered is NO_FILTER:
        return wanted
    allowed = {str(v) for v in (filtered if isinstance(filtered, list) else [filtered])} if filtered is not None else set()
    both = [label for label in wanted if label in allowed]
    if not both:
        stated = " ".join(sorted(allowed)) if filtered is not None else f"null (files without a {what})"
        raise NoInputError(f"{option} {' '.join(wanted)} and the --bids-filter-file's {what} {stated} select no "
                           f"{what} in common: change one of them.")
    return both


def _echo_label(entities):
    """The ``echo`` entity of a file as its number (``_echo_number``: echo-02 is echo 2, as BIDS reads it), or
    None when it has none."""
    return None if entities.get("echo") is None else _echo_number(entities)


def _echo_number(entities):
    try:
        return int(entities.get("echo", 0))
    except (TypeError, ValueError):
        return 0


PYBIDS_IGNORED = ("code", "derivatives", "models", "sourcedata", "stimuli")
"""Top-level folders pybids does not index (with dot-folders); their JSON files are not read."""


def metadata_file(image, key):
    """The JSON file that gives ``key`` to the NIfTI ``image`` under the BIDS inheritance principle, as pybids reads
    it: the most specific applicable sidecar holding ``key``, from the image's folder up to the dataset's root (the
    first folder above with a dataset_description.json), a sidecar applying where its entities are among the image's
    and its suffix is the image's (e.g. ``part-phase_MEGRE.json`` at the root for every phase image). The sidecar
    beside the image, where ``key`` would be added, when none holds it. So a message about a value names the file
    to fix."""
    image = Path(image)
    *entities, suffix = image.name.removesuffix(".gz").removesuffix(".nii").split("_")
    folder = image.parent
    while True:
        applicable = [path for path in folder.glob(f"*{suffix}.json")
                      if path.stem.split("_")[-1] == suffix and set(path.stem.split("_")[:-1]) <= set(entities)]
        for path in sorted(applicable, key=lambda path: -len(path.stem.split("_"))):  # most entities first
            try:
                if key in read_json_object(path, "a JSON sidecar"):
                    return path
            except DataError:  # not JSON: validation names it on its own
                continue
        if (folder / "dataset_description.json").is_file() or folder.parent == folder:
            return sidecar_path(image)
        folder = folder.parent


def invalid_json_file(bids_dir):
    """The DataError naming the first JSON file pybids would read in ``bids_dir`` that is not a UTF-8 JSON object,
    and the fix, or None."""
    bids_dir = Path(bids_dir)
    for path in sorted(bids_dir.rglob("*.json")):
        rel = path.relative_to(bids_dir).parts
        if rel[0] in PYBIDS_IGNORED or any(part.startswith(".") for part in rel):
            continue
        try:
            read_json_object(path, "JSON sidecar", "fix it (e.g. a trailing comma, a missing quote, or a list around "
                                                   "the object); every sidecar must be a JSON object {...}.")
        except DataError as problem:
            return problem
        except OSError as exc:
            return DataError(f"JSON sidecar {path} cannot be read ({exc.strerror or exc}): check its permissions.")
    return None


def _echo_sort_key(item):
    """Sort by numeric EchoTime, then numeric echo entity (files lacking EchoTime last)."""
    path, entities, meta = item
    te = meta.get("EchoTime")
    numeric_te = isinstance(te, (int, float)) and not isinstance(te, bool)
    return (0 if numeric_te else 1, float(te) if numeric_te else 0.0, _echo_number(entities), path)


def _check_filter_labels(filters, layout, bids_dir):
    """Raise NoInputError when a ``--bids-filter-file`` names a subject or session label ``bids_dir`` lacks (e.g.
    "2" for "02"), as ``--participant-label`` does: pybids would select nothing for it, and drop it without a word."""
    for entity, prefix, present in (("subject", "sub-", layout.get_subjects()),
                                    ("session", "ses-", layout.get_sessions())):
        value = filters.get(entity)
        labels = {str(v) for v in (value if isinstance(value, list) else [value]) if v is not None}
        missing = sorted(labels - set(present))
        if missing:
            raise NoInputError(f"the --bids-filter-file's {entity} {', '.join(map(repr, missing))} not found in "
                               f"{bids_dir} ({labels_it_has(entity, prefix, present, missing)}): check the filter file.")


def labels_it_has(entity, prefix, present, missing):
    """"its <entity> labels: 01, 02, ..." (at most ``LABELS_SHOWN``), for a message about ``missing`` labels; it
    says "without the 'sub-' prefix" when a missing label carries the prefix the labels are listed without."""
    hint = f", without the '{prefix}' prefix" if any(label.startswith(prefix) for label in missing) else ""
    return f"its {entity} labels{hint}: {few_named(sorted(present), LABELS_SHOWN) or 'none'}"


def _restricted_to_labels(query, layout, bids_dir, participant_label, session_label):
    """``query`` narrowed to the participants and sessions asked for; NoInputError names any ``bids_dir`` lacks."""
    query = dict(query)
    if participant_label:
        wanted = [str(label).removeprefix("sub-") for label in participant_label]
        present = layout.get_subjects()
        missing = sorted(set(wanted) - set(present))
        if missing:
            raise NoInputError(f"participant(s) {', '.join('sub-' + m for m in missing)} not found in {bids_dir} "
                               f"({labels_it_has('subject', 'sub-', present, missing)}): check --participant-label.")
        query["subject"] = _narrowed(wanted, query.get("subject", NO_FILTER), "participant", "--participant-label")
    if session_label:
        wanted = [str(label).removeprefix("ses-") for label in session_label]
        subjects = {"subject": query["subject"]} if participant_label else {}
        present = layout.get_sessions(**subjects)
        missing = sorted(set(wanted) - set(present))
        if missing:
            whose = f" for participant(s) {', '.join('sub-' + s for s in subjects['subject'])}" if subjects else ""
            raise NoInputError(f"session(s) {', '.join('ses-' + m for m in missing)} not found in {bids_dir}{whose} "
                               f"({labels_it_has('session', 'ses-', present, missing)}): check --session-label.")
        query["session"] = _narrowed(wanted, query.get("session", NO_FILTER), "session", "--session-label")
    return query


REAL_IMAGINARY_FIX = ("convert each echo to magnitude |real + i imag| (part-mag) and phase atan2(imag, real) in radians "
                      "(part-phase, \"Units\": \"rad\").")
"""The fix for a gradient-echo run stored as real and imaginary parts (part-real, part-imag), which qsmprep does not read."""


def _files_by_run(layout, query):
    """Group the GRE images of ``query``'s scope into runs: {run key: {"mag": [(path, entities, metadata)], "phase":
    [...], "unread": [(path, part or None)]}}, "unread" holding images with another part (real, imag) or none.

    A group of unread images alone is a run, for validation to refuse with its fix, where they are real and imaginary
    parts (QSM data qsmprep cannot read) or where its subject has no magnitude or phase image (a subject would
    otherwise be skipped without a word); a subject's magnitude-only T2starw beside its MEGRE runs is left alone."""
    groups = {}
    for bids_file in layout.get(return_type="object", **{k: v for k, v in query.items() if k != "part"}):
        ent = bids_file.get_entities()
        key = tuple(None if ent.get(k) is None else str(ent[k]) for k in (*ENTITY_KEYS, "suffix"))
        parts = groups.setdefault(key, {"mag": [], "phase": [], "unread": []})
        if ent.get("part") in ("mag", "phase"):
            parts[ent["part"]].append((bids_file.path, ent, bids_file.get_metadata()))
        else:
            parts["unread"].append((bids_file.path, ent.get("part")))
    read = {key[0] for key, parts in groups.items() if parts["mag"] or parts["phase"]}
    return {key: parts for key, parts in groups.items()
            if parts["mag"] or parts["phase"] or key[0] not in read
            or any(part in ("real", "imag") for _, part in parts["unread"])}


def _real_imaginary_hint(layout, query):
    """A sentence naming the query's images stored as real and imaginary parts (part-real, part-imag), which qsmprep
    does not read, with the fix; "" when there are none."""
    found = layout.get(return_type="filename", **{**query, "part": ["real", "imag"]})
    if not found:
        return ""
    return f" The {len(found)} image(s) stored as real and imaginary parts (e.g. {sorted(found)[0]}) are not read: {REAL_IMAGINARY_FIX}"


def _gre_run(key, parts, entity_patterns):
    """The GRERun of one ``_files_by_run`` group, files in echo-time order (``entity_patterns``: for ``_file_key``)."""
    *values, suffix = key
    mag = sorted(parts["mag"], key=_echo_sort_key)
    phase = sorted(parts["phase"], key=_echo_sort_key)
    multi_echo_4d = any("echo" not in ent for _, ent, _ in mag + phase) and any(
        isinstance(meta.get("EchoTime"), list) for _, _, meta in mag + phase
    )
    return GRERun(
        **dict(zip(ENTITY_KEYS, values)), suffix=suffix,
        foreign_entities=tuple((path, _file_key(name, value, entity_patterns)) for path, ent, _ in mag + phase
                               for name, value in ent.items() if name not in {*ENTITY_KEYS, *FILE_ENTITIES}),
        magnitude=tuple(p for p, _, _ in mag), phase=tuple(p for p, _, _ in phase),
        magnitude_meta=tuple(m for _, _, m in mag), phase_meta=tuple(m for _, _, m in phase),
        magnitude_echoes=tuple(_echo_label(e) for _, e, _ in mag),
        phase_echoes=tuple(_echo_label(e) for _, e, _ in phase),
        multi_echo_4d=multi_echo_4d, unread=tuple(sorted(parts["unread"])),
    )


def discover_runs(bids_dir, participant_label=None, session_label=None, bids_filters=None):
    """Find every gradient-echo run (magnitude + phase) in ``bids_dir``.

    Parameters
    ----------
    bids_dir : str or Path
        Root of the BIDS dataset.
    participant_label, session_label : list of str or None
        Restrict to these labels (a leading ``sub-`` / ``ses-`` is dropped);
        None means all.
    bids_filters : dict or None
        Extra pybids entities for the query (from ``read_filter_file``).

    Returns
    -------
    list of GRERun, sorted by name then suffix; files ordered by echo time.

    Raises
    ------
    NoInputError when ``bids_dir`` is missing, when a requested participant
    or session does not exist, or when no GRE magnitude/phase image is found;
    DataError when a JSON sidecar is not valid JSON (named, with the fix).
    """
    from bids import BIDSLayout  # heavy import: only when discovering
    from bids.layout.models import Config

    bids_dir = require_bids_dir(bids_dir).absolute()
    try:
        layout = BIDSLayout(str(bids_dir), validate=False, derivatives=False)
    except (OSError, ValueError, TypeError) as exc:  # pybids wraps a sidecar's JSON syntax error in an OSError
        problem = invalid_json_file(bids_dir)
        if problem is None:
            raise
        raise problem from exc
    _check_filter_labels(bids_filters or {}, layout, bids_dir)
    query = _restricted_to_labels({**GRE_QUERY, **(bids_filters or {})}, layout, bids_dir, participant_label,
                                  session_label)
    groups = _files_by_run(layout, query)
    if not any(parts["mag"] or parts["phase"] for parts in groups.values()):
        where = f" for participant(s) {', '.join(participant_label)}" if participant_label else ""
        raise NoInputError(
            f"no gradient-echo magnitude/phase images ({'/'.join(GRE_SUFFIXES)} with part-mag and part-phase)"
            f" found in {bids_dir}{where}: check the dataset and the --participant-label/--session-label/"
            f"--bids-filter-file options.{_real_imaginary_hint(layout, query)}"
        )
    entity_patterns = {name: entity.pattern for name, entity in Config.load(PYBIDS_CONFIG).entities.items()}
    runs = [_gre_run(key, parts, entity_patterns) for key, parts in groups.items()]
    runs.sort(key=lambda r: (r.name, r.suffix))
    log.info("found %d gradient-echo run(s) in %s", len(runs), bids_dir)
    return runs
