"""Check discovered GRE runs before any work, and say what to fix.

Every check reports a ``Problem`` naming the file and the fix; a run with
any problem is left out and the others proceed. Runs that differ only in
suffix share a name, and so their output names: they are reported together
and left out unchecked. Checks, per run:

- magnitude and phase images both present, one of each per echo (paired by
  the ``echo`` entity; an echo given twice, e.g. as .nii and .nii.gz, is
  reported with both files), a run stored only as real and imaginary parts
  named as such, and no entity a gradient-echo image does not take (e.g.
  ``flip-2``, which would not tell runs apart);
- ``EchoTime`` in every sidecar, in seconds (> 0 and at most 0.5 s), one number beside
  an image of one echo (a list only beside a 4D file of every echo), equal
  between the magnitude and phase of one echo, and distinct between echoes;
- phase ``Units`` present and one of 'rad' / 'arbitrary';
- one echo only for suffixes ``T2starw`` and ``GRE`` (single-echo GRE is a
  valid acquisition there); a ``MEGRE`` run with one echo is reported,
  since it usually means echoes went missing on export;
- all images 3D (at least ``MIN_VOXELS_PER_AXIS`` voxels along each axis), on one grid (shape and affine), and a 4D file holding as many
  volumes as its ``EchoTime`` list has entries;
- a B0 field strength: the ``--b0-tesla`` override, or the sidecars' ``ImagingFrequency``
  (the proton frequency in MHz, within 10 % of ``MagneticFieldStrength``) or ``MagneticFieldStrength``;
- the data of every image readable in full (not a truncated .nii.gz), with
  no NaN or infinite values, a magnitude that is not all zero and a phase
  that is not one constant value, nor the same as another echo's phase
  (``_copied_phase_problem``);
- a magnitude whose signal is not negative (``_negative_magnitude``: a real
  part exported as part-mag) and that falls with echo time (``_magnitude_decay``);
- phase values that fit the declared ``Units``: wrapped radians for 'rad'
  (not degrees, not vendor integers), signed vendor integers for 'arbitrary'
  (not unsigned 0..4095, not non-integer values filling under half the
  vendor range), and over all echoes most of a wrapped cycle
  (``_phase_span_problem``);
- phase that evolves with echo time as its echo order says: two echoes'
  phase images exchanged are refused (``_phase_echo_order``);
- a user mask (``--mask PATH``), when given, on the run's grid, 3D and
  readable in full.

``check_bids_dataset`` is a light BIDS check with the ``bids_validator``
package (file names only); ``--skip-bids-validation`` skips it.
"""

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..checks import is_number
from ..errors import DataError, NoInputError, few_named
from ..phase.combine import MAX_PLAUSIBLE_TE_S, best_phase_exchange, milliseconds_hint
from ..phase.scaling import phase_to_rad
from .discovery import ENTITY_KEYS, REAL_IMAGINARY_FIX, SINGLE_ECHO_SUFFIXES, metadata_file, require_bids_dir

log = logging.getLogger(__name__)

PHASE_UNITS = ("rad", "arbitrary")
"""Phase ``Units`` qsmprep interprets (see qsmprep.phase.scaling.phase_to_rad)."""

MIN_VOXELS_PER_AXIS = 3
"""Fewest voxels along each axis of an image: the field of a source reaches across slices, and unwrapping,
masking and background removal need neighbours on every side (one or two slices ended in an internal error)."""

VENDOR_RANGE = (-4096, 4095)
"""Integer range that 'arbitrary' phase is read as (``phase_to_rad``'s default, Siemens -pi..pi)."""

RAD_TOLERANCE = 0.01
"""Slack (rad) around [-pi, 2 pi] for 'rad' phase stored with rounding."""


@dataclass(frozen=True)
class Problem:
    """One reason a run cannot be processed: the run, the file, and the fix."""

    subject: str
    run: str
    file: str
    message: str

    def __str__(self):
        return self.message

    @classmethod
    def of(cls, run, file, message):
        """The Problem of ``run`` (a ``GRERun``) with its ``file`` (a path)."""
        return cls(run.subject, run.name, str(file), message)


def check_bids_dataset(bids_dir):
    """Light BIDS check of ``bids_dir``; return the relative paths that are not valid BIDS names.

    Raises NoInputError when ``bids_dir`` is not a folder (``require_bids_dir``)
    and DataError when ``dataset_description.json`` is missing (not a BIDS
    dataset). Files with invalid names are logged as warnings and
    returned; they do not stop the run (pybids still finds what it can).
    """
    from bids_validator import BIDSValidator

    bids_dir = require_bids_dir(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise DataError(
            f"{bids_dir} has no dataset_description.json, so it is not a BIDS dataset: add one "
            "(https://bids-specification.readthedocs.io) or pass --skip-bids-validation."
        )
    validator = BIDSValidator()
    invalid = []
    for root, dirs, files in os.walk(bids_dir):
        rel_root = Path(root).relative_to(bids_dir)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (rel_root.parts or d.startswith("sub-")))
        for name in sorted(files):
            rel = "/" + (rel_root / name).as_posix()
            if rel_root.parts and not name.startswith(".") and not validator.is_bids(rel):
                invalid.append(rel.lstrip("/"))
    if invalid:
        log.warning("%d file(s) in %s do not have valid BIDS names (e.g. %s); they may be ignored.",
                    len(invalid), bids_dir, ", ".join(invalid[:3]))
    return invalid


def _sidecar_named(image, key):
    """"its JSON sidecar <path>": the file that gives, or would give, ``key`` to ``image`` (``metadata_file``); when
    that file is not there, it says so, and that no sidecar above it gives ``key`` either."""
    sidecar = metadata_file(image, key)
    if sidecar.is_file():
        return f"its JSON sidecar {sidecar}"
    return f"its JSON sidecar {sidecar} (missing; no sidecar above it in the dataset gives {key} either)"


def _echo_times(run, problems):
    """Echo times (s) of the run from its phase and magnitude sidecars, or None after a problem."""
    def report(file, message):
        problems.append(Problem.of(run, file, message))

    per_part, unusable = [], 0
    for files, metas in ((run.magnitude, run.magnitude_meta), (run.phase, run.phase_meta)):
        tes = []
        for file, meta in zip(files, metas):  # every sidecar is checked, so one run lists all that need fixing
            te = meta.get("EchoTime")
            values = te if isinstance(te, list) else [te]
            numeric = te is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric and not run.multi_echo_4d and len(values) != 1:  # else the run has more echo times than images
                report(file, f"{file}: its JSON sidecar {metadata_file(file, 'EchoTime')} has \"EchoTime\": {te}, "
                             "but an image of one echo needs exactly one EchoTime, in seconds: write this echo's own, e.g. "
                             "\"EchoTime\": 0.02 (a list of echo times is for a 4D file holding every echo).")
                unusable += 1
                continue
            if not numeric or not values:
                report(file, f"{file}: no numeric EchoTime in {_sidecar_named(file, 'EchoTime')}: "
                             "add \"EchoTime\" in seconds (a list of seconds for a 4D multi-echo file).")
                unusable += 1
                continue
            bad = [v for v in values if not 0 < v <= MAX_PLAUSIBLE_TE_S]
            if bad:
                report(file, f"{file}: EchoTime {bad[0]} is not a gradient-echo time in seconds (over 0 and at most "
                             f"{MAX_PLAUSIBLE_TE_S:g} s){milliseconds_hint(bad[0])}: write it in seconds in "
                             f"{metadata_file(file, 'EchoTime')}, e.g. 0.02 for 20 ms.")
                unusable += 1
                continue
            tes.extend(float(v) for v in values)
        per_part.append(tes)
    if unusable:
        return None
    mag_tes, phase_tes = per_part

    def sidecar_of(files, echo):  # one file per echo, or one 4D file holding every echo
        return metadata_file(files[echo] if len(files) == len(phase_tes) else files[0], "EchoTime")

    if len(mag_tes) != len(phase_tes) or any(abs(a - b) > 1e-6 for a, b in zip(mag_tes, phase_tes)):
        echo = next((i for i, (a, b) in enumerate(zip(mag_tes, phase_tes)) if abs(a - b) > 1e-6), 0)
        report(run.phase[0], f"{run.name}: magnitude echo times {mag_tes} s differ from phase echo times "
                             f"{phase_tes} s (first at echo {echo + 1}: {sidecar_of(run.magnitude, echo)} and "
                             f"{sidecar_of(run.phase, echo)}): check the EchoTime of each part-mag/part-phase "
                             "sidecar pair.")
        return None
    first_echo = {}
    for echo, te in enumerate(phase_tes):
        earlier = first_echo.setdefault(round(te, 9), echo)
        if earlier != echo:
            report(run.phase[earlier if len(run.phase) == len(phase_tes) else 0],
                   f"{run.name}: echoes {earlier + 1} and {echo + 1} have the same EchoTime {te} s "
                   f"({sidecar_of(run.phase, earlier)}, {sidecar_of(run.phase, echo)}): each echo needs its own "
                   "EchoTime in its sidecar.")
            return None
    return tuple(phase_tes)


def _phase_units(run, problems):
    units, unusable = {}, False  # each unit -> the phase images whose sidecars give it
    for file, meta in zip(run.phase, run.phase_meta):  # every sidecar is checked, so one run lists all to fix
        value = meta.get("Units")
        if value is None or str(value).strip().lower() not in PHASE_UNITS:
            what = "no Units" if value is None else f"Units {value!r}, which qsmprep cannot interpret"
            problems.append(Problem.of(run, file,
                                       f"{file}: {_sidecar_named(file, 'Units')} has {what}: set "
                                       "\"Units\" to \"rad\" (radians) or \"arbitrary\" (vendor integers, e.g. -4096..4095)."))
            unusable = True
        else:
            units.setdefault(str(value).strip().lower(), []).append(file)
    if unusable:
        return None
    if len(units) > 1:
        rarest = min(units.values(), key=len)
        stated = "; ".join(f"{unit!r} in {metadata_file(files[0], 'Units')}"
                           + (f" and {len(files) - 1} more" if len(files) > 1 else "") for unit, files in units.items())
        problems.append(Problem.of(run, rarest[0],
                                   f"{run.name}: its phase echoes mix Units ({stated}): store every echo's phase in one "
                                   "unit, and give its sidecars that Units."))
        return None
    return next(iter(units))


def _grid(run, n_echoes, problems):
    """(shape3, affine) shared by every image of the run, or None after a problem."""
    from ..io import check_affine, check_same_grid, read_header

    ref = file = run.magnitude[0]
    try:
        ref_shape, ref_affine = read_header(ref)
        check_affine(ref, ref_affine)  # every other file must share it
        for file in run.files:
            shape, affine = read_header(file)
            if len(shape) < 3 or min(shape[:3]) < MIN_VOXELS_PER_AXIS:
                raise DataError(f"{file} has shape {shape}, not a volume: give each echo as a 3D volume of at least "
                                f"{MIN_VOXELS_PER_AXIS} voxels along each axis (or every echo in one 4D file); "
                                "re-export the whole acquisition, not one slice.")
            if len(shape) > 4:
                raise DataError(f"{file} is {len(shape)}D, shape {shape}: give each echo as a 3D volume, or every "
                                "echo in one 4D file (i, j, k, echo); re-export it without the extra dimensions.")
            check_same_grid(ref, (ref_shape, ref_affine), file, (shape, affine))
            volumes = shape[3] if len(shape) > 3 else 1
            expected = n_echoes if run.multi_echo_4d else 1
            if volumes != expected:
                raise DataError(f"{file} holds {volumes} volume(s) but its sidecar lists {expected} echo time(s): "
                                "give one EchoTime per volume, or one file per echo (echo-<n>).")
    except (DataError, NoInputError) as exc:
        problems.append(Problem.of(run, file, str(exc)))
        return None
    return ref_shape[:3], tuple(tuple(float(v) for v in row) for row in ref_affine)


def _phase_range_problem(file, units, values):
    """Why the phase values of ``file`` (a ``nifti_values`` summary) do not fit ``units``, or None."""
    low, high = values["min"], values["max"]
    if low is None:
        return None
    if units == "rad" and low >= -math.pi - RAD_TOLERANCE and high <= 2 * math.pi + RAD_TOLERANCE:
        return None
    sidecar = metadata_file(file, "Units")
    seen = f"{file}: phase values {low:g}..{high:g}"
    declared = f"its sidecar {sidecar} says \"Units\": \"{units}\""
    lo, hi = VENDOR_RANGE
    if low >= 0 and high <= hi and high - low >= (hi + 1) / 2 and (units == "arbitrary" or values["integral"]):
        read_as = f" (read as signed {lo}..{hi}, which would halve the phase)" if units == "arbitrary" else ""
        return (f"{seen} look like unsigned 12-bit scanner phase (0..4095), but {declared}{read_as}: convert "
                "the image to radians (x * pi / 2048 - pi) and set \"Units\" to \"rad\".")
    if units == "rad":
        if values["integral"]:
            return f"{seen} are whole numbers, as scanner phase is, but {declared}: set \"Units\" to \"arbitrary\"."
        if low >= -180.5 and high <= 360.5 and high - low > 180:
            return f"{seen} look like degrees, but {declared}: convert the image to radians (multiply by pi/180)."
        return (f"{seen} lie outside [-pi, 2pi], so they are not wrapped phase in radians as {declared}: give the "
                "phase as exported from the scanner (not unwrapped or rescaled), or correct \"Units\".")
    if not values["integral"] and high - low < (hi - lo) / 2:
        return (f"{seen} are not whole numbers and fill less than half of the vendor range {lo}..{hi}, so they are "
                f"not scanner integers as {declared}: if they are radians set \"Units\" to \"rad\"; if degrees, "
                "convert them to radians (multiply by pi/180) and set \"Units\" to \"rad\".")
    return None


PHASE_SPAN_NEEDED = {"rad": 0.5, "arbitrary": 0.9}
"""Least fraction of its cycle (2 pi, or ``VENDOR_RANGE``) that a run's wrapped phase must span over all echoes."""


def _phase_span_problem(run, units, low, high):
    """Why the phase of ``run``, values ``low``..``high`` over all its echoes, cannot be wrapped phase in ``units``,
    or None.

    Wrapped phase fills its cycle over a run: the noise outside the head alone takes every value, and later
    echoes wrap inside it. Phase rescaled to another range (radians divided by pi; GE-style milliradians
    -3142..3141 read as Siemens' -4096..4095) would otherwise pass and scale the field and chi wrongly.
    """
    if units == "rad":
        cycle, where = 2 * math.pi, "a 2-pi cycle, though wrapped phase in radians spans -pi..pi"
        fix = "they are not radians as the sidecars say (e.g. divided by pi): convert the phase to radians"
    else:
        lo, hi = VENDOR_RANGE
        cycle, where = hi - lo, f"the range {lo}..{hi} that 'arbitrary' phase is read with as -pi..pi"
        fix = ("another range stands for -pi..pi (e.g. -3142..3141, milliradians): convert the phase to radians "
               "(x * pi / M for values -M..M)")
    if high - low >= PHASE_SPAN_NEEDED[units] * cycle:
        return None
    return (f"{run.name}: the phase of its {len(run.phase)} image(s) spans {low:g}..{high:g}, "
            f"{(high - low) / cycle:.0%} of {where}, so {fix} and set \"Units\" to \"rad\", or give the phase "
            "as exported from the scanner.")


def _swapped_parts_hint(magnitude_signed, phase_low):
    """A sentence for a phase problem where the magnitude images look like phase (``magnitude_signed``: each reaches
    below minus half its largest value, as wrapped phase does) and the phase images like magnitude (none below 0,
    ``phase_low``): part-mag and part-phase swapped got only "set Units", then "spans 18 % of a cycle"; else ""."""
    if not (magnitude_signed and phase_low >= 0):
        return ""
    return (" The part-mag images hold negative values, as phase does, and the part-phase images none, as a "
            "magnitude: magnitude and phase may be swapped; check each file's part entity first.")


def _copied_phase_problem(run, file, digests, seen):
    """Why the phase volumes of ``file`` (their ``digests``) are not echoes of their own, or None: one holds the same
    values as a volume seen before (``seen``: digest -> that volume's name; this file's are added). Each echo's phase
    differs from the others' as the field acts for longer; two equal ones gave a Chimap of round-off noise."""
    for k, digest in enumerate(digests):
        volume = f"volume {k + 1} of {file}" if len(digests) > 1 else str(file)
        if digest in seen:
            return (f"{run.name}: {volume} holds the same phase, voxel for voxel, as {seen[digest]}, though each "
                    "echo's phase differs as the field acts for longer: one echo was probably copied or exported "
                    "twice; re-export the phase of every echo from the scanner.")
        seen[digest] = volume
    return None


def _values(run, units, problems):
    """Read every image of the run in full; report unreadable data, NaN, phase that does not fit ``units``
    (each file by ``_phase_range_problem``, the run's whole span by ``_phase_span_problem``) and the phase of two
    echoes that is one image (``_copied_phase_problem``).

    Stops at the first problem (one message per run), but for phase out of its units' range, which a conversion
    gives every echo alike: that message names every phase image with it, so that one fix serves them all. Returns
    True when all is well.
    """
    from ..io import nifti_values

    out_of_range = []  # (file, message) of the phase images whose values do not fit the units
    phase_low, phase_high = math.inf, -math.inf
    magnitude_signed = True  # every magnitude reaches down to at least half its largest value below zero, as phase does
    phase_volumes = {}  # digest -> the phase volume first seen with it
    parts = [(f, "magnitude") for f in run.magnitude] + [(f, "phase") for f in run.phase]
    for file, part in parts:
        try:
            values = nifti_values(file, f"{part} image")
        except (DataError, NoInputError) as exc:
            problems.append(Problem.of(run, file, str(exc)))
            return False
        message = None
        if values["nonfinite"]:
            message = (f"{file} has {values['nonfinite']} NaN or infinite voxel(s): qsmprep needs finite "
                       f"{part} values everywhere (NaN spreads through unwrapping and the dipole inversion): "
                       "re-export the image from the scanner, or set those voxels to 0 in both the magnitude "
                       "and the phase image of that echo.")
        elif values["min"] is not None and values["min"] == values["max"] and (part == "phase" or values["max"] <= 0):
            what = "no signal" if part == "magnitude" else "no phase information"
            message = (f"{file} holds the single value {values['min']:g} in every voxel, so it has {what}: "
                       f"re-export the {part} image from the scanner (check that the right series was converted).")
        elif part == "phase" and units is not None:
            if values["min"] is not None:
                phase_low, phase_high = min(phase_low, values["min"]), max(phase_high, values["max"])
            range_problem = _phase_range_problem(file, units, values)
            if range_problem:
                out_of_range.append((file, range_problem))
            if out_of_range:  # reported together after the loop
                continue
        if part == "magnitude":
            magnitude_signed &= values["min"] is not None and values["min"] < -0.5 * abs(values["max"])
        if part == "phase" and not message:
            message = _copied_phase_problem(run, file, values["digests"], phase_volumes)
        if message:
            problems.append(Problem.of(run, file, message))
            return False
    if out_of_range:
        (file, message), others = out_of_range[0], [str(f) for f, _ in out_of_range[1:]]
        also = f" The same holds for {', '.join(others)}." if others else ""
        problems.append(Problem.of(run, file,
                                   message + _swapped_parts_hint(magnitude_signed, phase_low) + also))
        return False
    message = _phase_span_problem(run, units, phase_low, phase_high) if units and phase_low <= phase_high else None
    if message:
        message += _swapped_parts_hint(magnitude_signed, phase_low)
        problems.append(Problem.of(run, run.phase[0], message))
    return message is None


def _mask_problem(run, mask_file, grid):
    """Why the user mask ``mask_file`` cannot be used for ``run`` (on ``grid``), or None."""
    from ..io import check_same_grid, nifti_values, read_header

    try:
        shape, affine = read_header(mask_file, "mask")
        check_same_grid(run.magnitude[0], grid, mask_file, (shape, affine), labels=True)
        if any(n != 1 for n in shape[3:]):
            return f"mask {mask_file} has shape {shape}: give a single 3D mask (non-zero = brain)."
        values = nifti_values(mask_file, "mask")
    except (DataError, NoInputError) as exc:
        return str(exc)
    if values["nonfinite"]:
        return f"mask {mask_file} has {values['nonfinite']} NaN or infinite voxels: give a binary brain mask."
    if values["max"] is None or values["max"] <= 0:
        return f"mask {mask_file} is empty (no voxel > 0): give a mask that covers the brain."
    if not values["integral"]:
        return (f"mask {mask_file} has values that are not whole numbers: give a binary brain mask (threshold a "
                "probability map first).")
    return None


MAX_PLAUSIBLE_B0_TESLA = 30.0
"""Largest field strength (T) taken as such: MRI magnets reach about 21 T; 3000 is 3 T written in millitesla."""


def millitesla_hint(value):
    """" (it looks like millitesla)" for a number over ``MAX_PLAUSIBLE_B0_TESLA``, else ""."""
    plausible = not isinstance(value, (int, float)) or isinstance(value, bool) or value <= MAX_PLAUSIBLE_B0_TESLA
    return "" if plausible else " (it looks like millitesla)"


PROTON_FREQUENCY_TOLERANCE = 0.1
"""Largest relative difference between the field strength ``ImagingFrequency`` gives and ``MagneticFieldStrength``
with which the frequency is taken as the magnet's proton frequency (Siemens "3 T" systems run at 2.89 T, 3.5 %
below; a frequency written in Hz, or another nucleus's, is far off)."""


def _stated_value(run, key, problems):
    """The value of ``key`` that the run's sidecars state, as (value, the images whose sidecars state it):
    (None, []) when none states it, (None, None) after a problem when they disagree."""
    files = {}  # the stated value (3 and 3.0 are one; a list, not hashable, by its repr) -> (it, the images stating it)
    for file, meta in zip(run.magnitude + run.phase, run.magnitude_meta + run.phase_meta):
        if meta.get(key) is not None:
            value = meta[key]
            files.setdefault(value if isinstance(value, (int, float, str, bool)) else repr(value), (value, []))[1].append(file)
    if len(files) <= 1:
        return next(iter(files.values()), (None, []))
    stated = "; ".join(f"{value!r} in {metadata_file(names[0], key)}"
                       + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                       for value, names in files.values())
    problems.append(Problem.of(run, min((names for _, names in files.values()), key=len)[0],
                               f"{run.name}: its sidecars disagree on {key} ({stated}): make them agree, or pass "
                               "--b0-tesla."))
    return None, None


def _b0_tesla(run, b0_tesla, problems):
    """The field strength (T) that scales the run's field from Hz to ppm, and where it came from: ``--b0-tesla``;
    else the magnet's proton frequency, ``ImagingFrequency`` (MHz) / ``GAMMA_BAR_MHZ_PER_T``, where the sidecars
    give it (ppm is Hz over the Larmor frequency in MHz; the nominal strength can be 3.5 % off, Siemens "3 T" running
    at 2.89 T); else ``MagneticFieldStrength``. (None, None) after a problem."""
    from ..physics import GAMMA_BAR_MHZ_PER_T

    if b0_tesla is not None:
        _warn_if_sidecars_say_otherwise(run, float(b0_tesla))
        return float(b0_tesla), "--b0-tesla"
    nominal, nominal_files = _stated_value(run, "MagneticFieldStrength", problems)
    frequency, frequency_files = _stated_value(run, "ImagingFrequency", problems)
    if nominal_files is None or frequency_files is None:
        return None, None

    def refuse(file, message):
        problems.append(Problem.of(run, file, message))
        return None, None

    if not nominal_files and not frequency_files:
        return refuse(run.phase[0], f"{run.phase[0]}: no MagneticFieldStrength in the sidecars of {run.name}: add "
                                    "\"MagneticFieldStrength\" (tesla) to its JSON sidecars, or pass --b0-tesla.")
    if nominal_files and not (is_number(nominal) and 0 < nominal <= MAX_PLAUSIBLE_B0_TESLA):
        where = metadata_file(nominal_files[0], "MagneticFieldStrength")
        return refuse(nominal_files[0], f"{where}: MagneticFieldStrength {nominal!r} is not a "
                                        f"field strength in tesla{millitesla_hint(nominal)}: write a positive number, "
                                        "e.g. 3, or pass --b0-tesla.")
    if not frequency_files:
        return float(nominal), "MagneticFieldStrength"
    tesla = frequency / GAMMA_BAR_MHZ_PER_T if is_number(frequency) and frequency > 0 else None
    if tesla is None or not 0 < tesla <= MAX_PLAUSIBLE_B0_TESLA or (
            nominal_files and abs(tesla / nominal - 1) > PROTON_FREQUENCY_TOLERANCE):
        gives = (f" (it gives {tesla:.4g} T" + (f", not the MagneticFieldStrength {nominal:g} T" if nominal_files else "")
                 + ")") if tesla else ""
        where = metadata_file(frequency_files[0], "ImagingFrequency")
        return refuse(frequency_files[0], f"{where}: ImagingFrequency {frequency!r} is not "
                                          f"the magnet's proton frequency in MHz{gives}: fix it (e.g. 123.2 at 3 T), "
                                          "or pass --b0-tesla.")
    return tesla, "ImagingFrequency"


def _warn_if_sidecars_say_otherwise(run, b0_tesla):
    """Warn where the run's sidecars give a field strength more than ``PROTON_FREQUENCY_TOLERANCE`` from
    ``--b0-tesla``'s: it overrides them, and every chi value scales with it, so a mistyped or copied value would
    rescale the maps without a word (``ImagingFrequency`` is checked first, the magnet's own frequency)."""
    from ..physics import GAMMA_BAR_MHZ_PER_T

    for key, tesla_per_unit, unit in (("ImagingFrequency", 1 / GAMMA_BAR_MHZ_PER_T, "MHz"),
                                      ("MagneticFieldStrength", 1.0, "T")):
        stated, files = _stated_value(run, key, [])  # sidecars that disagree among themselves: --b0-tesla decides
        if files and is_number(stated) and stated > 0 and abs(stated * tesla_per_unit / b0_tesla - 1) > \
                PROTON_FREQUENCY_TOLERANCE:
            in_tesla = f" ({stated * tesla_per_unit:.3g} T)" if unit != "T" else ""
            log.warning("%s: --b0-tesla %g T, but %s says %s %g %s%s; the field is scaled to ppm with %g T, and "
                        "every chi value with it: check which is right.", run.name, b0_tesla,
                        metadata_file(files[0], key), key, stated, unit, in_tesla, b0_tesla)
            return


def user_mask_for_run(run, mask):
    """The user mask file for ``run``: ``mask`` itself if it is a file, else its match in a derivatives folder.

    In a folder (e.g. an earlier qsmprep output), the mask is
    ``<name>_desc-brain_mask.nii[.gz]`` next to the run's relative path
    (``sub-X[/ses-Y]/anat/``). Returns None when the folder has none.
    """
    mask = Path(mask)
    if mask.is_file():
        return str(mask)
    folder = mask / f"sub-{run.subject}"
    if run.session:
        folder = folder / f"ses-{run.session}"
    for ext in (".nii.gz", ".nii"):
        candidate = folder / "anat" / f"{run.name}_desc-brain_mask{ext}"
        if candidate.is_file():
            return str(candidate)
    return None


def _echo_volumes(run, part, n_echoes):
    """(volumes, files): the run's ``part`` ("magnitude" or "phase") volume of each of its ``n_echoes`` echo times,
    in sidecar order, and the file each came from."""
    import numpy as np

    from ..io import load_nifti, load_volume

    files = run.magnitude if part == "magnitude" else run.phase
    if run.multi_echo_4d:
        data = load_nifti(files[0], f"{part} image")[0]
        return np.moveaxis(data.reshape(data.shape[:3] + (-1,)), -1, 0), list(files) * n_echoes
    return [load_volume(f, f"{part} image")[0] for f in files], list(files)


MAGNITUDE_SIGNAL_LEVEL = 0.1
"""Fraction of a magnitude image's largest absolute value beyond which a voxel is signal, not noise or the small
negative values that filtering or interpolation can leave (their ringing overshoots an edge by about 9 %)."""

MAX_NEGATIVE_SIGNAL_SHARE = 0.05
"""Largest share of a magnitude's signal voxels (``MAGNITUDE_SIGNAL_LEVEL``) that may be negative. A magnitude |z|
has none; the real part of a complex image exported as part-mag had 62 % and 76 % (the two echoes of a simulated
head), and its TKD Chimap had 122 % NRMSE instead of 67 %."""


def _negative_magnitude(run, volumes, files, problems):
    """Report a magnitude image with clearly negative signal: a magnitude is never negative, and the mask and the
    echo weighting read such an image as it is, giving a poor map without a word."""
    import numpy as np

    for volume, file in zip(volumes, files):
        size = np.abs(volume)
        level = MAGNITUDE_SIGNAL_LEVEL * float(size.max())
        share = np.count_nonzero(volume < -level) / max(np.count_nonzero(size > level), 1)
        if share > MAX_NEGATIVE_SIGNAL_SHARE:
            problems.append(Problem.of(run, file, (
                f"{file}: {share:.0%} of its signal voxels (those beyond {MAGNITUDE_SIGNAL_LEVEL:.0%} of its largest "
                "absolute value) are negative, but a magnitude image is |z| and never negative: the real part (or "
                "another signed image) was probably exported as part-mag; export the magnitude of each echo.")))
            return


def _brighter_half(volumes, echo_times):
    """The voxels brighter than the median of the magnitude at the earliest echo time (``volumes`` in the order of
    ``echo_times``): tissue, not air, for the checks that compare echoes."""
    import numpy as np

    first = volumes[int(np.argmin(echo_times))]
    return first > np.median(first)


MAX_MAGNITUDE_RISE = 1.05
"""Largest median ratio of the magnitude at one echo time to the previous one taken as T2* decay with noise."""


def _magnitude_decay(run, echo_times, volumes, files, problems):
    """Report a magnitude (``volumes`` of ``files``, ``_echo_volumes``) that rises with echo time: T2* decay
    makes it fall, so the EchoTime values do not belong to their images (sidecars swapped or mislabelled), which
    would flip the field's sign silently."""
    import numpy as np

    by_te = sorted(range(len(echo_times)), key=echo_times.__getitem__)  # a 4D file's list may run backwards
    signal = _brighter_half(volumes, echo_times)
    for k, later in zip(by_te, by_te[1:]):
        ratio = float(np.median(volumes[later][signal] / np.maximum(volumes[k][signal], 1e-12)))
        if ratio > MAX_MAGNITUDE_RISE:
            problems.append(Problem.of(run, files[later], (
                f"{run.name}: the magnitude rises by {ratio - 1:.0%} from echo time {echo_times[k] * 1e3:g} ms "
                f"({metadata_file(files[k], 'EchoTime')}) to {echo_times[later] * 1e3:g} ms "
                f"({metadata_file(files[later], 'EchoTime')}), where T2* "
                "decay makes it fall: the EchoTime values do not match their images; fix the sidecars.")))
            return


MIN_PHASE_EXCHANGE_GAIN = 3.0
"""How many times lower the echo-fit residual must be with two echoes' phase images exchanged for the run to be
refused as mislabelled (``_phase_echo_order``). Two exchanged echoes of real 7 T data (ROMEO's test crop) fit 20
times better put back; synthetic voxels of four echoes 12.4, 6.2, 3.1 and 2.0 times at SNR 20, 10, 5 and 3
(tests/test_phase.py)."""

MAX_EXCHANGED_RESIDUAL_RAD = 0.25
"""Largest median echo-fit residual (rad) of the exchanged images for the run to be refused: a real exchange fits
well once undone (0.016 rad on the real data above, 0.037-0.222 rad on the synthetic voxels). Alternating readout
(bipolar) phase offsets, which the fit cannot follow, can also make some exchange fit up to 2.8 times better, but
poorly (0.5 rad and more; tests/test_phase.py)."""

MAX_PHASE_CHECK_VOXELS = 100_000
"""Voxels (evenly spread over the signal) the phase-order check fits; more cost time and change its median little."""


def _phase_echo_order(run, units, echo_times, magnitudes, problems):
    """Report phase images paired with the wrong echo time: their phase then does not evolve linearly with echo time,
    and the total-field fit gives a wrong field with no error. Needs three echo times or more (any two phases fit a
    line)."""
    import numpy as np

    if len(set(echo_times)) < 3:
        return
    phases, files = _echo_volumes(run, "phase", len(echo_times))
    signal = np.flatnonzero(_brighter_half(magnitudes, echo_times))
    signal = signal[::max(1, signal.size // MAX_PHASE_CHECK_VOXELS)]
    scaling_log = logging.getLogger(phase_to_rad.__module__)
    scaling_log.disabled = True  # its notes on the vendor range come again, once, from the pipeline's own scaling
    try:  # whole volumes: 'arbitrary' phase beyond the vendor range is scaled by its observed range, as there
        phase = np.stack([phase_to_rad(v, units, source=str(f)).ravel()[signal] for v, f in zip(phases, files)], -1)
    finally:
        scaling_log.disabled = False
    magnitude = np.stack([v.ravel()[signal] for v in magnitudes], -1)
    given, (a, b), exchanged = best_phase_exchange(phase, echo_times, magnitude)
    if given > MIN_PHASE_EXCHANGE_GAIN * exchanged and exchanged < MAX_EXCHANGED_RESIDUAL_RAD:
        where = [f"{echo_times[k] * 1e3:g} ms ({files[k]}{f', volume {k + 1}' if run.multi_echo_4d else ''})"
                 for k in (a, b)]
        problems.append(Problem.of(run, files[a], (
            f"{run.name}: the phase images of echo times {where[0]} and {where[1]} follow the echo times "
            f"{given / exchanged:.0f} times better exchanged (median echo-fit residual {given:.3f} rad as given, "
            f"{exchanged:.3f} rad exchanged): each is probably paired with the other's EchoTime and magnitude; "
            "check the echo-<n> entities and EchoTime of these phase images against the scanner's export.")))


def _echoes_paired(run, problems):
    """Pair the magnitude and phase images by their ``echo`` entity; report every echo with two images of one part
    (naming both) and every image whose other part is missing. Returns True when each echo has one of each."""
    def report(file, message):
        problems.append(Problem.of(run, file, message))

    def of_echo(echo):
        return "" if echo is None else f" of echo {echo}"

    found = len(problems)
    by_part = {}  # part -> {echo label: file}
    for part, files, echoes in (("mag", run.magnitude, run.magnitude_echoes), ("phase", run.phase, run.phase_echoes)):
        by_part[part] = by_echo = {}
        for file, echo in zip(files, echoes):
            if echo in by_echo:
                report(file, f"{by_echo[echo]} and {file} are both the part-{part} image{of_echo(echo)} of "
                             f"{run.name}: keep one of them (remove the other, or move it out of the dataset), or select one "
                             "with --bids-filter-file, e.g. {\"megre\": {\"extension\": \".nii.gz\"}} or on the "
                             "entity that tells them apart (such as \"reconstruction\").")
            by_echo.setdefault(echo, file)
    counts = f"{run.name} has {len(run.magnitude)} magnitude and {len(run.phase)} phase echo(es)"
    for part, other in (("mag", "phase"), ("phase", "mag")):
        for echo, file in by_part[part].items():
            if echo not in by_part[other]:
                twin = Path(file).name.replace(f"_part-{part}_", f"_part-{other}_")
                report(file, f"{file}: no part-{other} image{of_echo(echo)} ({counts}): add {twin} beside it, "
                             "with its JSON sidecar; each echo needs both a part-mag and a part-phase image.")
    return len(problems) == found


def validate_run(run, b0_tesla=None, mask=None):
    """Check one run; return (validated run or None, list of Problem).

    ``b0_tesla`` overrides ``MagneticFieldStrength``; ``mask`` is a user mask
    file or derivatives folder (``--mask PATH``), or None.
    """
    problems = []

    def report(file, message):
        problems.append(Problem.of(run, file, message))

    if not run.files:  # images qsmprep does not read, alone (discovery's _files_by_run)
        complex_parts = [file for file, part in run.unread if part in ("real", "imag")]
        if complex_parts:
            report(complex_parts[0], f"{complex_parts[0]}: {run.name} is stored as real and imaginary parts (part-real, "
                                     f"part-imag), which qsmprep does not read: {REAL_IMAGINARY_FIX}")
        else:
            file = run.unread[0][0]
            report(file, f"{file}: {run.name}'s images have no part entity, and sub-{run.subject} has no magnitude or "
                         "phase image: name the magnitude images with part-mag and the phase images with part-phase "
                         "(an image without a part entity is not read as either).")
        return None, problems
    if not run.magnitude:
        report(run.phase[0], f"{run.phase[0]}: no magnitude image (part-mag) for {run.name}: add the magnitude "
                             "images of the same acquisition, named with part-mag (one without a part entity is "
                             "not read as magnitude); qsmprep needs them for the mask and echo weighting.")
        return None, problems
    if not run.phase:
        report(run.magnitude[0], f"{run.magnitude[0]}: no phase image (part-phase) for {run.name}: export the phase "
                                 "images too; QSM is computed from phase.")
        return None, problems
    if run.foreign_entities:
        file = run.foreign_entities[0][0]
        keys = sorted({key for _, key in run.foreign_entities})
        one = len(keys) == 1
        report(file, f"{file}: {'entity' if one else 'entities'} {', '.join(keys)} in this run's file names "
                     f"{'is' if one else 'are'} not among those BIDS gives gradient-echo images "
                     f"({', '.join(ENTITY_KEYS.values())}, echo, part), so qsmprep cannot tell its runs apart or name "
                     "their derivatives: rename the files, e.g. with acq-<label> in its place.")
        return None, problems
    if not _echoes_paired(run, problems):
        return None, problems

    echo_times = _echo_times(run, problems)
    units = _phase_units(run, problems)
    if echo_times is not None and len(echo_times) == 1 and run.suffix not in SINGLE_ECHO_SUFFIXES:
        report(run.phase[0], f"{run.phase[0]}: {run.name} has a single echo but suffix {run.suffix}, which means "
                             "multi-echo: add the missing echoes, or name a single-echo acquisition _T2starw.")
    grid = _grid(run, len(echo_times), problems) if echo_times is not None else None
    if grid is not None:
        _values(run, units, problems)
    if grid is not None and not problems:
        volumes, files = _echo_volumes(run, "magnitude", len(echo_times))
        _negative_magnitude(run, volumes, files, problems)
        if not problems and len(echo_times) > 1:
            _magnitude_decay(run, echo_times, volumes, files, problems)
        if not problems:
            _phase_echo_order(run, units, echo_times, volumes, problems)
    b0, b0_source = _b0_tesla(run, b0_tesla, problems)
    mask_file = None
    if mask is not None and grid is not None:
        mask_file = user_mask_for_run(run, mask)
        if mask_file is None:
            report(mask, f"no mask for {run.name} in {mask} (looked for "
                         f"sub-{run.subject}/.../anat/{run.name}_desc-brain_mask.nii.gz): add it or drop --mask.")
        else:
            message = _mask_problem(run, mask_file, grid)
            if message:
                report(mask_file, message)
    if problems:
        return None, problems
    _warn_if_two_d(run)
    _warn_if_echoes_missing(run, len(echo_times))
    return replace(run, echo_times_s=echo_times, phase_units=units, b0_tesla=b0, b0_source=b0_source,
                   shape=grid[0], affine=grid[1], mask=mask_file), problems


def acquisition_type(run):
    """(``MRAcquisitionType``, an image whose sidecars state it) for the run: "2D" where any of its sidecars says
    "2D" (any case or padding), as one 2D echo is enough to need the checks a 2D run does, else "3D" where one says
    "3D", else (None, None)."""
    stated = [(str(meta.get("MRAcquisitionType", "")).strip().upper(), file)
              for file, meta in zip(run.magnitude + run.phase, run.magnitude_meta + run.phase_meta)]
    return next(((kind, file) for wanted in ("2D", "3D") for kind, file in stated if kind == wanted), (None, None))


def _warn_if_two_d(run):
    """Warn where the run's sidecars say ``MRAcquisitionType`` "2D": a multi-slice acquisition, which the ISMRM QSM
    consensus (MRM 2024) advises against. Each slice is excited on its own, so the phase can carry a different offset
    in each, which no 3D unwrapping or background removal expects, and thick slices lose signal to through-slice
    field gradients. qsmprep processes it as a 3D volume, so the user is told what to check, not refused."""
    stated, file = acquisition_type(run)
    if stated == "2D":
        log.warning("%s is a 2D multi-slice acquisition (MRAcquisitionType \"2D\" in the sidecars of %s, or a JSON "
                    "they inherit from): its slices were excited one by one and can each carry their own phase "
                    "offset, which qsmprep, processing it as one 3D volume, does not correct. The ISMRM QSM consensus "
                    "recommends 3D gradient echo; check the local field and Chimap for steps between slices.",
                    run.name, file)


def _warn_if_echoes_missing(run, n_echoes):
    """Warn where the run has fewer echoes than its file names or sidecars say it should: a gap in its echo-<n>
    numbers, or an ``EchoTrainLength`` above the ``n_echoes`` found. An echo lost on export still leaves a usable
    run, so it is processed with the echoes found, but the field is noisier than the acquisition allows."""
    numbers = {echo for echo in run.magnitude_echoes + run.phase_echoes if echo is not None}
    gaps = sorted(set(range(1, max(numbers, default=0) + 1)) - numbers)
    stated = [meta.get("EchoTrainLength") for meta in run.phase_meta + run.magnitude_meta]
    train = max((v for v in stated if isinstance(v, int) and not isinstance(v, bool)), default=0)
    if not gaps and train <= n_echoes:
        return
    why = [f"no files for echo-{', echo-'.join(map(str, gaps))}"] if gaps else []
    why += [f"its sidecars say EchoTrainLength {train}"] if train > n_echoes else []
    log.warning("%s: %d echo(es) found, but %s: processing the echoes found; if some were lost on export, export "
                "them all (each echo lowers the field's noise).", run.name, n_echoes, " and ".join(why))


def _same_name_problems(runs):
    """A Problem for each group of runs with one name: runs that differ only in suffix (e.g. a MEGRE and a
    T2starw run with the same entities) would write the same output files, so none of them is processed."""
    by_name = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    problems = []
    for name, group in by_name.items():
        if len(group) > 1:
            listed = " and ".join(f"the {run.suffix} run ({few_named(map(str, run.files), shown=1)})" for run in group)
            problems.append(Problem.of(group[0], group[0].files[0], (
                f"{name}: {listed} have the same entities, so their outputs would have the same names "
                f"({name}_*): process one of them, chosen with --bids-filter-file (e.g. {{\"megre\": "
                f"{{\"suffix\": \"{group[0].suffix}\"}}}}), or give one of them an acq-<label> or run-<index> entity "
                "of its own (rename its images and sidecars) to tell them apart.")))
    return problems


def validate_runs(runs, b0_tesla=None, mask=None):
    """Check every run; return (valid runs, problems). Each problem is logged as an error.

    Runs that share a name (``_same_name_problems``) are left out unchecked; the others are checked one by one.
    """
    problems = _same_name_problems(runs)
    clashing = {problem.run for problem in problems}
    valid = []
    for run in (run for run in runs if run.name not in clashing):
        checked, found = validate_run(run, b0_tesla=b0_tesla, mask=mask)
        problems.extend(found)
        if checked is not None:
            valid.append(checked)
    for problem in problems:
        log.error("%s", problem.message)
    return valid, problems
