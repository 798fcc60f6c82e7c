"""qsmprep-invert: dipole inversion of a local field map.

    qsmprep-invert FIELD.nii.gz MASK.nii.gz OUT.nii.gz --method {tkd,cfl2,ilsqr,tv,deep}
        [--threshold T] [--lambda L] [--alpha A --harmonic-radius MM] [--model NAME|PATH --device D --refine N --refine-lambda L --refine-radius MM --refine-tv A
         --tile N]
        [--units {ppm,hz,rad} --b0-tesla T --te S] [--b0-dir X Y Z] [-v]

Parses, loads, converts the field to ppm, calls ``qsmprep.inversion`` and
writes the susceptibility map (ppm) atomically. See docs/cli-invert.md.
"""

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from ..bgremove.smv import check_high_pass_radius
from ..bids.derivatives import OUTPUTS
from ..config import (
    INVERSION_METHODS, PIPELINE_HIGH_PASS_RADIUS_MM, default_parameters, inversion_high_pass_mm, library_function,
    parameter_checks,
)
from ..errors import DataError, UsageError
from ..inversion.deep import MIN_TILE, TILE_OVERLAP
from ..inversion.tv import TV_ALPHA
from ..io import check_same_grid, load_volume, read_json_object, save_nifti, sidecar_path
from ..masking import check_mask
from ..phase.combine import MAX_PLAUSIBLE_TE_S, milliseconds_hint
from ..physics import (
    TYPICAL_LOCAL_FIELD_PPM,
    b0_dir_given_or_from_affine,
    hz_to_ppm,
    invert_in_ras_order,
    local_field_scale,
    rad_to_ppm,
    voxel_size_from_affine,
)
from .common import (
    DEEP_OPTIONS,
    add_deep_options,
    check_b0_dir_option,
    check_b0_tesla_option,
    check_deep_options,
    check_not_an_input,
    check_writable_folder,
    exit_73_if_unwritable,
    finite_float,
    run_cli,
    torch_on_all_cores,
)

log = logging.getLogger(__name__)


INVERT_DEEP_OPTIONS = {**DEEP_OPTIONS, "device": "device", "tile": "tile_shape"}
"""Command-line options of --method deep (argparse dest) -> keyword of ``deep_invert``."""

EPILOG = """\
units: the field is in ppm of B0 by default; --units hz needs --b0-tesla;
--units rad (phase at one echo time) needs --b0-tesla and --te. A sidecar
FIELD.json stating other Units, a field beyond 1 ppm once converted (in Hz,
or a total field), or qsmprep's total field (*_desc-total_fieldmap) is refused:
invert its desc-local_fieldmap. A field outside the usual 0.002-0.2 ppm
is inverted with a warning (a phase in rad read as ppm, ppm read as Hz).
geometry: voxel size and B0 direction come from FIELD's affine (B0 along
world z, the scanner axis); --b0-dir X Y Z overrides the direction, in voxel
coordinates (i, j, k).
exit codes: 0 success; 64 usage error; 65 unusable data (grid mismatch, NaN
in the mask, empty mask, field beyond 1 ppm); 66 missing or unreadable
input; 70 deep inversion out of GPU memory even in 64^3 tiles; 73 OUT
cannot be written.
example:
  qsmprep-invert sub-01_localfield.nii.gz sub-01_mask.nii.gz sub-01_Chimap.nii.gz --method ilsqr
"""


def build_parser():
    p = argparse.ArgumentParser(
        prog="qsmprep-invert",
        description="Susceptibility map (ppm) from a local (tissue) field map by TKD, closed-form L2, iLSQR, "
                    "total variation or a trained network.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("field", type=Path, metavar="FIELD", help="local field map, NIfTI (3D; units: --units)")
    p.add_argument("mask", type=Path, metavar="MASK", help="brain mask, NIfTI on FIELD's grid (voxels > 0 are inside)")
    p.add_argument("out", type=Path, metavar="OUT", help="output susceptibility map, .nii or .nii.gz (ppm)")
    p.add_argument("--method", required=True, choices=INVERSION_METHODS,
                   help="tkd: thresholded k-space division; cfl2: closed-form L2 with gradient regularisation; "
                        "ilsqr: LSQR with streaking-artefact removal (Li et al. 2015); "
                        "tv: total-variation regularised least squares; "
                        "deep: a trained network (docs/models/)")  # fmt: skip
    p.add_argument("--threshold", type=finite_float, metavar="T",
                   help=f"TKD kernel threshold, in (0, 1/3] (default {default_parameters('inversion', 'tkd')['threshold']:g})")
    p.add_argument("--lambda", dest="lam", type=finite_float, metavar="L",
                   help="closed-form L2 regularisation weight, > 0 "
                        f"(default {default_parameters('inversion', 'cfl2')['lam']:g})")  # fmt: skip
    p.add_argument("--alpha", type=finite_float, metavar="A",
                   help=f"total-variation weight in ppm mm, > 0 (default {TV_ALPHA:g})")
    p.add_argument("--harmonic-radius", dest="harmonic_radius_mm", type=finite_float, metavar="MM",
                   help="tv: compare fields after an MM-radius spherical-mean high-pass, so residual background "
                        "fields are ignored (default 0: off; qsmprep's pipeline uses "
                        f"{PIPELINE_HIGH_PASS_RADIUS_MM:g} on its own local fields)")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="deep: where the network and its refinement run (default auto)")
    add_deep_options(p)
    p.add_argument("--tile", type=int, metavar="N",
                   help="deep: largest block, N^3 voxels, the network sees at once; larger grids are inverted in "
                        "overlapping tiles (default: the whole grid when free memory allows, else the largest "
                        "tile that fits; on a CPU 256 needs about 8 GB, 160 about 2.2 GB)")  # fmt: skip
    p.add_argument("--units", choices=("ppm", "hz", "rad"), default="ppm", help="units of FIELD (default ppm)")
    p.add_argument("--b0-tesla", type=finite_float, metavar="T", help="field strength in tesla (for --units hz or rad)")
    p.add_argument("--te", type=finite_float, metavar="S", help="echo time in seconds (for --units rad)")
    p.add_argument("--b0-dir", type=finite_float, nargs=3, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel coordinates (default: from FIELD's affine)")  # fmt: skip
    return p


METHOD_FLAGS = (("--threshold", "threshold", "tkd"), ("--lambda", "lam", "cfl2"), ("--alpha", "alpha", "tv"),
                ("--harmonic-radius", "harmonic_radius_mm", "tv"))
"""The classical methods' own options: (flag, its argparse dest and the method's keyword, the method)."""


def _check_options(args):
    """Raise UsageError for options that do not fit together."""
    for flag, name, method in METHOD_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if args.method != method:
            raise UsageError(f"{flag} applies to --method {method}, not {args.method}: remove it.")
        what, ok = parameter_checks("inversion", method)[name]  # the pipeline's --parameters check of the same value
        if not ok(value):
            raise UsageError(f"{flag} must be {what}, got {value:g}.")
    check_deep_options(args, INVERT_DEEP_OPTIONS, args.method == "deep", f"--method {args.method}")
    if args.tile is not None and args.tile < MIN_TILE:
        raise UsageError(f"--tile must be at least {MIN_TILE} voxels (tiles overlap by {TILE_OVERLAP}), got {args.tile}.")
    if args.units == "ppm" and args.b0_tesla is not None:  # a forgotten --units would scale chi silently
        raise UsageError("--b0-tesla applies to --units hz or rad; the field is read in ppm: add --units, or remove "
                         "--b0-tesla.")
    if args.units != "rad" and args.te is not None:
        raise UsageError(f"--te applies to --units rad; the field is read in {args.units}: add --units rad, or remove "
                         "--te.")
    if args.units in ("hz", "rad") and args.b0_tesla is None:
        raise UsageError(f"--units {args.units} needs the field strength: add --b0-tesla (in T, e.g. 3).")
    check_b0_tesla_option(args.b0_tesla)
    if args.units == "rad" and args.te is None:
        raise UsageError("--units rad needs the echo time of the phase: add --te (in s, e.g. 0.02).")
    if args.te is not None and not 0 < args.te <= MAX_PLAUSIBLE_TE_S:
        raise UsageError(f"--te is the echo time in seconds, e.g. 0.02 for 20 ms; got {args.te}"
                         f"{milliseconds_hint(args.te)}.")
    check_b0_dir_option(args.b0_dir)
    if args.out.name in (".nii", ".nii.gz") or not args.out.name.endswith((".nii", ".nii.gz")):
        raise UsageError(f"output {args.out} must be a file name ending in .nii or .nii.gz, e.g. chi.nii.gz.")
    check_not_an_input("output", args.out, {"FIELD": args.field, "MASK": args.mask})
    check_writable_folder("output folder", args.out.parent)  # before a deep inversion's minutes


def _check_not_total_field(args):
    """Raise UsageError for a total field map qsmprep wrote (``desc-total_fieldmap``, before background-field removal):
    the Hz the unit check asks for then passed the 1 ppm check at 3 mm voxels (0.64 ppm) and gave a map ten times
    too strong (NRMSE 1054 %), exit 0."""
    total, local_field = (f"desc-{OUTPUTS[key]['desc']}_{OUTPUTS[key]['suffix']}"
                          for key in ("total_field", "local_field"))
    name = Path(args.field).name
    if re.search(rf"(^|_){total}\.nii(\.gz)?$", name):
        local = Path(args.field).with_name(name.replace(total, local_field))
        raise UsageError(f"field map {args.field} is qsmprep's total field, before background-field removal: invert "
                         f"the local field beside it, {local} (in ppm, so without --units).")


def _check_sidecar_units(args):
    """Raise UsageError when FIELD's JSON sidecar states units (ppm, Hz or rad) other than ``--units``: a field map
    qsmprep wrote says Hz (the total field) or ppm (the local field)."""
    sidecar = sidecar_path(args.field)
    if not sidecar.is_file():
        return
    stated = read_json_object(sidecar, "JSON sidecar", "fix or remove it.").get("Units")
    if isinstance(stated, str) and stated.lower() in ("ppm", "hz", "rad") and stated.lower() != args.units:
        fix = {"ppm": "remove --units or give --units ppm", "hz": "add --units hz --b0-tesla T",
               "rad": "add --units rad --b0-tesla T --te S"}[stated.lower()]
        raise UsageError(f"field map {args.field}: its sidecar {sidecar} says \"Units\": \"{stated}\", but the field "
                         f"is read in {args.units}: {fix}.")


def _check_plausible_ppm(field, inside, args):
    """Raise DataError when the field, read in ppm, is far stronger than any tissue field: a field in Hz or a total
    field, which would give a map wrong in scale; warn when it is outside the usual range, as a unit mistake or a
    strong lesion makes it (``qsmprep.physics.units.local_field_scale``)."""
    strong, verdict = local_field_scale(field, inside)
    low, high = TYPICAL_LOCAL_FIELD_PPM
    read = f"field map {args.field}: 1 % of the mask's voxels are beyond {strong:.3g} ppm (read with --units {args.units})"
    if verdict == "weak":
        log.warning("%s; in tissue fields that level is %g-%g ppm: if the map comes out far too weak, check the units "
                    "(a field in ppm needs no --units; --units hz and rad need --b0-tesla in T, rad also --te in s).",
                    read, low, high)
    elif verdict == "strong":
        log.warning("%s; in tissue fields that level is under %g ppm (more only with a large haemorrhage): "
                    "if the map comes out far too strong, check the units (a phase in radians needs --units rad "
                    "--b0-tesla T --te S, a field in Hz --units hz --b0-tesla T).", read, high)
    elif verdict == "implausible":
        raise DataError(f"{read}, but a local (tissue) field is rarely beyond {high:g} ppm: a field in Hz "
                        "needs --units hz --b0-tesla T, a phase in radians --units rad --b0-tesla T --te S; a total "
                        "field needs background-field removal first (qsmprep does both).")


def _load_inputs(args):
    """Field (ppm), mask and the field's affine and header; raise QSMPrepError for unusable inputs."""
    field, affine, header = load_volume(args.field, "field map")
    _check_not_total_field(args)
    _check_sidecar_units(args)
    mask, mask_affine, _ = load_volume(args.mask, "mask")
    check_same_grid(args.field, (field.shape, affine), args.mask, (mask.shape, mask_affine), labels=True)
    inside = check_mask(mask, source=f"mask {args.mask}", region="a brain mask")
    bad = int((~np.isfinite(field[inside])).sum())
    if bad:
        raise DataError(f"field map {args.field} has {bad} NaN or infinite values inside the mask: "
                        "fill them or remove them from the mask.")  # fmt: skip
    if args.units == "hz":
        field = hz_to_ppm(field, args.b0_tesla)
    elif args.units == "rad":
        field = rad_to_ppm(field, args.te, args.b0_tesla)
    _check_plausible_ppm(field, inside, args)
    return np.asarray(field, dtype=np.float32), inside, affine, header


def run(args):
    """Invert FIELD into OUT; raises QSMPrepError for user errors."""
    _check_options(args)
    field, mask, affine, header = _load_inputs(args)
    voxel_size = voxel_size_from_affine(affine)
    b0_dir = b0_dir_given_or_from_affine(args.b0_dir, affine)  # a unit vector, as the log shows it
    options = {name: getattr(args, name) for _, name, _ in METHOD_FLAGS if getattr(args, name) is not None}
    options.update({key: getattr(args, dest) for dest, key in INVERT_DEEP_OPTIONS.items() if getattr(args, dest) is not None})
    high_pass = {"--refine-radius": inversion_high_pass_mm("deep", options),
                 "--harmonic-radius": inversion_high_pass_mm("tv", options)}
    for flag, radius_mm in high_pass.items():
        if not radius_mm:
            continue
        try:
            check_high_pass_radius(radius_mm, voxel_size)
        except ValueError as exc:
            raise UsageError(f"{flag} for {args.field}: {exc}.") from None
    log.info("%s on %s: voxel size %s mm, B0 direction %s", args.method, args.field,
             np.round(voxel_size, 4), np.round(b0_dir, 4))  # fmt: skip
    if args.method == "deep":
        torch_on_all_cores()
    start = time.perf_counter()
    chi = invert_in_ras_order(library_function("inversion", args.method), field, mask, affine, b0_dir, **options)
    log.info("inverted in %.1f s", time.perf_counter() - start)
    with exit_73_if_unwritable(args.out):
        save_nifti(args.out, chi, affine, header)
    log.info("wrote %s", args.out)
    return 0


def main(argv=None):
    """Entry point of ``qsmprep-invert``; returns 0, or the exit code of the error (one line on stderr)."""
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
