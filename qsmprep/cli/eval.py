"""qsmprep-eval: score a susceptibility map against a reference.

    qsmprep-eval CHI.nii.gz REF.nii.gz MASK.nii.gz [--labels LABELS.nii.gz]
        [--label-names LABELS.tsv] [--deep-gm-labels ID ...] [--calc-label N]
        [--json OUT.json | --json -]

Prints an aligned table of the metrics of ``qsmprep.metrics.evaluate``
(docs/metrics.md); ``--json OUT`` also writes them as JSON, ``--json -``
prints JSON instead of the table.
"""

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..errors import DataError, NoInputError, UsageError
from ..io import check_same_grid, load_volume, read_text_utf8, write_text_atomic
from ..masking import check_mask
from ..metrics import check_label_map, check_label_names, evaluate
from .common import check_not_an_input, exit_73_if_unwritable, run_cli

log = logging.getLogger(__name__)

METRIC_ROWS = (
    ("nrmse_pct", "NRMSE (demeaned)", "%"),
    ("nrmse_detrended_pct", "NRMSE (detrended)", "%"),
    ("hfen_pct", "HFEN", "%"),
    ("xsim", "XSIM", ""),
    ("deep_gm_slope", "Deep GM slope", ""),
    ("calcification_moment_error", "Calcification moment error", ""),
    ("calcification_streak", "Calcification streaking", ""),
)


def build_parser():
    p = argparse.ArgumentParser(
        prog="qsmprep-eval",
        description="Score a susceptibility map (ppm) against a reference inside a mask with the QSM challenge "
        "metrics (NRMSE, detrended NRMSE, HFEN, XSIM, per-label means, deep grey matter slope, calcification "
        "moment and streaking). See docs/metrics.md.",
    )
    p.add_argument("chi", type=Path, help="reconstructed susceptibility map (ppm)")
    p.add_argument("ref", type=Path, help="reference susceptibility map (ppm), same grid")
    p.add_argument("mask", type=Path, help="evaluation mask (voxels > 0), same grid")
    p.add_argument("--labels", type=Path, help="integer label map (e.g. a *_dseg.nii.gz), same grid")
    p.add_argument(
        "--label-names", type=Path, metavar="TSV",
        help="BIDS dseg.tsv with columns 'index' and 'name'; deep grey matter labels are found by name",
    )  # fmt: skip
    p.add_argument(
        "--deep-gm-labels", type=int, nargs="+", action="extend", metavar="ID",
        help="label values of the deep grey matter nuclei for the slope (default: found by name)",
    )  # fmt: skip
    p.add_argument("--calc-label", type=int, metavar="N", help="label value of a calcification (moment, streaking)")
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON to OUT ('-' for standard output)")
    return p


def read_label_names(path):
    """{index: name} from a BIDS dseg.tsv (tab-separated, columns 'index' and 'name'; names stripped of spaces).

    Raises DataError naming the file and the line of a row without a name or an index that is not an integer,
    an index on two rows, and names that would report two labels under one key (``check_label_names``).
    """
    try:
        reader = csv.DictReader(io.StringIO(read_text_utf8(path, "label names"), newline=""), delimiter="\t")
        rows = [(reader.line_num, row) for row in reader]  # line numbers for the messages (blank lines are skipped)
    except OSError as exc:
        raise NoInputError(f"label names {path} cannot be read ({exc.strerror}): check the path.") from exc
    if not rows or not {"index", "name"} <= set(reader.fieldnames):
        raise DataError(f"label names {path} needs tab-separated columns 'index' and 'name' (a BIDS dseg.tsv).")
    names, lines = {}, {}
    for line, row in rows:
        try:
            index = int(row["index"])
        except (TypeError, ValueError):
            raise DataError(f"label names {path}, line {line}: index {row['index']!r} is not an integer: every "
                            "'index' must be the label's value in the label map.") from None
        name = (row["name"] or "").strip()  # None: the row ends before its name
        if not name:
            raise DataError(f"label names {path}, line {line}: label {index} has no name: write it after the "
                            "index, separated by a tab.")
        if index in names:
            raise DataError(f"label names {path}: index {index} is on lines {lines[index]} ('{names[index]}') and "
                            f"{line} ('{name}'): give each label one row.")
        names[index], lines[index] = name, line
    check_label_names(names, source=f"label names {path}")
    return names


def load_label_map(path):
    """The integer label map at ``path`` as an array, its affine: integer IDs exactly (not through float32, which
    merges IDs above 2**24). Raises DataError for non-integer or negative values."""
    labels, affine, _ = load_volume(path, "label map", dtype=None)  # readable, real, one 3D volume, a sound affine
    return check_label_map(labels, f"label map {path}"), affine


def _load_inputs(args):
    chi, chi_affine, _ = load_volume(args.chi, "reconstruction")
    ref, ref_affine, _ = load_volume(args.ref, "reference")
    mask, mask_affine, _ = load_volume(args.mask, "mask")
    check_same_grid(args.ref, (ref.shape, ref_affine), args.chi, (chi.shape, chi_affine))
    check_same_grid(args.ref, (ref.shape, ref_affine), args.mask, (mask.shape, mask_affine), labels=True)
    labels = None
    if args.labels is not None:
        labels, labels_affine = load_label_map(args.labels)
        check_same_grid(args.ref, (ref.shape, ref_affine), args.labels, (labels.shape, labels_affine), labels=True)
    inside = check_mask(mask, source=f"mask {args.mask}", region="a mask of the region to evaluate")
    for path, data in ((args.chi, chi), (args.ref, ref)):
        if not np.isfinite(data[inside]).all():
            raise DataError(f"{path} has NaN or infinite values inside the mask: fix the map or shrink the mask.")
    if np.ptp(ref[inside]) == 0:  # NRMSE and HFEN divide by the reference's variation in the mask
        raise DataError(f"reference {args.ref} is constant inside the mask ({int(inside.sum())} voxels): the metrics "
                        "are relative to its variation; give a reference map and a mask of a region where it varies.")
    return chi, ref, inside, labels


MAX_SPREAD_RATIO = 10.0
"""Largest ratio of the two maps' spreads (1st to 99th percentile in the mask) taken as maps in one unit. A poor
reconstruction is off by a factor of two or so; a map in ppb against one in ppm by 1000, a field in Hz by about
128 (at 3 T), which made NRMSE 102027 % without a word."""


def warn_if_units_differ(chi, ref, inside, chi_path, ref_path):
    """Log a warning when CHI and REF spread over ranges more than ``MAX_SPREAD_RATIO`` apart: most likely not one
    unit, which the metrics (relative to REF) cannot tell."""
    spread = [float(np.ptp(np.percentile(m[inside], (1, 99)))) for m in (chi, ref)]
    if spread[0] == spread[1] == 0:  # both flat but for under 1 % of the mask (a calcification): no scale to compare
        return
    ratio = spread[0] / spread[1] if spread[1] > 0 else np.inf
    if not 1 / MAX_SPREAD_RATIO <= ratio <= MAX_SPREAD_RATIO:
        log.warning("%s spreads %.3g times as far as %s inside the mask (1st to 99th percentile: %.3g against %.3g): "
                    "are both in ppm? A map in ppb or a field in Hz gives meaningless metrics.",
                    chi_path, ratio, ref_path, *spread)


def format_table(result):
    """The metrics as aligned text: one row per metric (a skipped deep grey matter slope reads "skipped"), the
    labels the slope was fitted over, then one row per label."""
    rows = [(name, "skipped" if result[key] is None else f"{result[key]:.4f}", unit)
            for key, name, unit in METRIC_ROWS if key in result]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{name:<{width}}  {value:>10} {unit}".rstrip() for name, value, unit in rows]
    if "deep_gm_labels" in result:
        fitted = ", ".join(result["deep_gm_labels"]) or "none"
        lines.append(f"Deep GM slope labels: {fitted}"
                     + (" (it needs at least two)" if result["deep_gm_slope"] is None else ""))
    means = result.get("label_means_ppm")
    if means:
        label_width = max(5, *(len(label) for label in means))
        lines += ["", f"{'label':<{label_width}}  {'voxels':>8}  {'chi (ppm)':>10}  {'ref (ppm)':>10}"]
        lines += [
            f"{label:<{label_width}}  {m['voxels']:>8d}  {m['recon']:>10.4f}  {m['ref']:>10.4f}"
            for label, m in means.items()
        ]
    return "\n".join(lines)


def run(args):
    """Evaluate and write the report; raises QSMPrepError for user errors."""
    if args.json not in (None, "-") and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json} is a folder: give a file name, e.g. {Path(args.json) / 'metrics.json'}.")
    if args.json not in (None, "-"):
        check_not_an_input("--json", args.json, {"CHI": args.chi, "REF": args.ref, "MASK": args.mask,
                                                 "--labels": args.labels, "--label-names": args.label_names})
    chi, ref, mask, labels = _load_inputs(args)
    if labels is None and (args.calc_label is not None or args.deep_gm_labels or args.label_names):
        raise UsageError("--calc-label, --deep-gm-labels and --label-names need a label map: add --labels.")
    if args.calc_label == 0:
        raise UsageError("--calc-label 0 is the label map's background: give the calcification's own label, e.g. 11.")
    warn_if_units_differ(chi, ref, mask, args.chi, args.ref)
    names = read_label_names(args.label_names) if args.label_names else None
    result = evaluate(
        chi, ref, mask, labels=labels, label_names=names, calc_label=args.calc_label,
        deep_gm_labels=args.deep_gm_labels,
    )  # fmt: skip
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        with exit_73_if_unwritable(args.json):
            write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(format_table(result))
    else:
        print(format_table(result))
    return 0



def main(argv=None):
    """Entry point; returns 0, or the exit code of a QSMPrepError (one-line message)."""
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
