"""The group level: one table of quality measures over every run in a derivatives dataset, and a page with it.

``qsmprep BIDS_DIR OUTPUT_DIR group`` reads what the participant level wrote (brain masks, Chimaps and their
sidecars) and writes ``OUTPUT_DIR/group_qsm.tsv`` (a row per run and inversion method, described by
``group_qsm.json``) and ``OUTPUT_DIR/group_qsm.html`` (the table, flagged rows first, and a figure), as
MRIQC's group reports do, so that a study's failed runs are found without opening every subject's report.
"""

import base64
import html
import json
from itertools import cycle
from pathlib import Path

import numpy as np

from ..bids.derivatives import logged_runs, named_run_paths, processed_runs, refused_runs, run_name_labels
from ..config import INVERSION_METHODS
from ..errors import CantCreateError, QSMPrepError
from ..io import check_same_grid, load_nifti, write_text_atomic
from .mosaic import png_bytes, pyplot_agg
from .report import (
    DAMAGED,
    POLARITY_WARNING_RATIO,
    chimap_percentiles,
    mask_volume_ml,
    no_contrast_reason,
    paramagnetic_tail_ratio,
    read_sidecar,
)

GROUP_STEM = "group_qsm"
"""Name of the group level's files. Not ``group_Chimap``: pybids reads a top-level ``*_Chimap.json`` as metadata every
Chimap inherits, and its column descriptions ("subject") then conflict with the files' entities, so that
``BIDSLayout`` could not load the output folder."""

COLUMNS = {
    "run": "run name, as in its derivatives' file names (e.g. sub-01_ses-1)",
    "subject": "subject label without sub-",
    "session": "session label without ses-; n/a for a run without one",
    "method": "inversion method of the Chimap (desc-<method>_Chimap); n/a for a row of the whole run (flagged): it "
              "has no derivatives, a brain mask or field map that is missing or cannot be read, or no Chimap, or the "
              "last participant run refused its input",
    "mask_ml": "brain mask volume in ml (desc-brain_mask)",
    "echoes": "number of echoes (the mask sidecar's EchoTime)",
    "b0_tesla": "field strength in T that scaled the field to ppm (the sidecars' MagneticFieldStrength; their "
                "MagneticFieldStrengthSource says where it came from: ImagingFrequency, MagneticFieldStrength or "
                "--b0-tesla)",
    "phase_inverted": "whether the phase was negated before processing (--invert-phase, PhaseInverted)",
    "chi_p1_ppm": "1st percentile of the Chimap in the brain mask, ppm",
    "chi_median_ppm": "median of the Chimap in the brain mask, ppm",
    "chi_p99_ppm": "99th percentile of the Chimap in the brain mask, ppm",
    "tail_ratio": "(chi_p99_ppm - chi_median_ppm) / (chi_median_ppm - chi_p1_ppm): above 1 in brains; below 1 the "
                  "phase polarity is most likely inverted, or a single echo's phase offset shortens the tail "
                  "(docs/outputs.md, The report)",
    "flags": "why the row stands out (a file that is missing or cannot be read, or no Chimap: run the participant "
             "level again; input the last participant run refused: fix it as the flag says; a Chimap with no "
             "contrast in the brain mask, e.g. all zeros; tail ratio below 1; brain mask volume more than 3 robust "
             "standard deviations from the group's median, with 5 runs or more), n/a when it does not",
}
"""The table's columns and what each holds (``group_qsm.json``, the BIDS description of a TSV's columns)."""

MASK_OUTLIER_Z = 3.0
"""Robust z-score (median and 1.4826 x median absolute deviation over the group's runs) beyond which a brain mask
volume is flagged: a mask that lost part of the brain, or kept the scalp."""

MIN_RUNS_FOR_OUTLIERS = 5
"""Fewest runs for which mask volumes are compared with the group's (fewer give no stable median and spread)."""


def run_rows(name, paths, log_dir=None):
    """The table's rows of one run: one per Chimap of ``paths`` (``named_run_paths``: every file it should have),
    measured from the files (``chimap_row``). A run is listed rather than left out when a file is missing or its brain
    mask cannot be read: such rows have no measures and a ``problem`` saying why (flagged, and ``run_group`` exits
    65), the run's only row (method None) where nothing can be measured. ``log_dir``: the log folder of the
    participant run that processed it (``logged_runs``), named where it wrote nothing."""
    row = empty_row(name)
    missing = {key: path.name for key, path in paths.items() if not path.is_file()}
    if len(missing) == len(paths):
        return [with_problem(row, None, f"no derivatives: its participant run ({log_dir}) wrote none, as a run that "
                                        f"failed or was stopped does (sub-{row['subject']}.html says why)")]
    if "mask" in missing:
        return [with_problem(row, None, f"missing {', '.join(missing.values())}: without its brain mask its Chimaps "
                                        "cannot be measured")]
    try:
        mask_data, affine, _ = load_nifti(paths["mask"], "brain mask", fix=DAMAGED)
    except QSMPrepError as exc:
        return [with_problem(row, None, f"cannot be measured: {exc}")]
    mask = mask_data > 0
    meta = read_sidecar(paths["mask"])
    echo_times = meta.get("EchoTime")
    row.update(mask_ml=round(mask_volume_ml(mask, affine), 1),
               echoes=len(echo_times) if isinstance(echo_times, list) and echo_times else None,
               b0_tesla=meta.get("MagneticFieldStrength"), phase_inverted=meta.get("PhaseInverted"))
    methods = [key.removeprefix("chimap:") for key in paths if key.startswith("chimap:")]
    if not methods:
        return [with_problem(row, None, "no Chimap beside its brain mask")]
    run_missing = [file for key, file in missing.items() if not key.startswith("chimap:")]  # a field map
    rows = [with_problem(row, None, f"missing {', '.join(run_missing)}")] if run_missing else []
    for method in methods:
        key = f"chimap:{method}"
        rows.append(with_problem(row, method, f"missing {missing[key]} (its participant run, {log_dir}, was asked for "
                                              f"{method})") if key in missing
                    else chimap_row(row, method, paths[key], paths["mask"], mask, affine))
    return rows


def empty_row(name):
    """A row of run ``name`` with no measures yet."""
    labels = run_name_labels(name)
    return {**dict.fromkeys(COLUMNS), "run": name, "subject": labels.get("sub"), "session": labels.get("ses"),
            "problem": ""}


def refused_row(name, messages, log_dir, earlier_derivatives=False):
    """The only row of run ``name``, whose input the participant run logged in ``log_dir`` refused for ``messages``
    (``refused_runs``; they name the file and the fix); ``earlier_derivatives``: it has derivatives from an earlier
    participant run, which are not measured (they are not of its input as it is now)."""
    earlier = "; its derivatives there are from an earlier participant run" if earlier_derivatives else ""
    return {**empty_row(name), "problem": f"input refused by its participant run ({log_dir}): {messages.rstrip('.')}"
                                          f"{earlier}"}


def with_problem(row, method, why):
    """``row`` of ``method`` (None: the run's only row) with the ``problem`` ``why`` no Chimap of it was measured,
    and its fix."""
    return {**row, "method": method, "problem": f"{why.rstrip('.')}; run the participant level again for this run"}


def chimap_row(row, method, path, mask_path, mask, affine):
    """``row`` (a run's measures) completed with its ``method`` Chimap's at ``path``: percentiles in the brain
    ``mask`` (read from ``mask_path`` with ``affine``), tail ratio and ``no_contrast`` (``no_contrast_reason``); a
    Chimap that cannot be read, or lies on another grid than the mask, gives its ``problem`` instead."""
    try:
        chi, chi_affine, _ = load_nifti(path, "susceptibility map", fix=DAMAGED)
        check_same_grid(mask_path, (mask.shape, affine), path, (chi.shape, chi_affine))
    except QSMPrepError as exc:
        return with_problem(row, method, f"cannot be measured: {exc}")
    percentiles = chimap_percentiles(chi, mask)
    low, median, high = percentiles or (None, None, None)
    return {**row, "method": method, "chi_p1_ppm": low, "chi_median_ppm": median, "chi_p99_ppm": high,
            "tail_ratio": paramagnetic_tail_ratio(percentiles), "no_contrast": no_contrast_reason(percentiles)}


def flag_rows(rows):
    """Add each row's ``flags``: its ``problem`` and ``no_contrast`` (optional keys, set by ``run_rows``), a tail
    ratio below ``POLARITY_WARNING_RATIO``, and a brain mask volume beyond ``MASK_OUTLIER_Z`` robust standard
    deviations of the runs' median (with ``MIN_RUNS_FOR_OUTLIERS`` runs whose mask was measured)."""
    volumes = {row["run"]: row["mask_ml"] for row in rows if row["mask_ml"] is not None}
    median = float(np.median(list(volumes.values()))) if volumes else 0.0
    spread = 1.4826 * float(np.median([abs(v - median) for v in volumes.values()])) if volumes else 0.0
    for row in rows:
        row["mask_outlier"] = False
        flags = [row["problem"]] if row.get("problem") else []
        if row.get("no_contrast"):
            flags.append(f"no contrast: {row['no_contrast']}")
        if row["tail_ratio"] is not None and row["tail_ratio"] < POLARITY_WARNING_RATIO:
            offset = " or a single echo's phase offset" if row.get("echoes") == 1 else ""  # SINGLE_ECHO_TAIL_NOTE
            flags.append(f"tail ratio {row['tail_ratio']:.2f} < 1: phase polarity inverted{offset}?")
        if len(volumes) >= MIN_RUNS_FOR_OUTLIERS and spread > 0 and row["mask_ml"] is not None:
            z = (row["mask_ml"] - median) / spread
            if abs(z) > MASK_OUTLIER_Z:
                row["mask_outlier"] = True
                flags.append(f"brain mask {row['mask_ml']:g} ml, {z:+.1f} robust SD from the median {median:g} ml")
        row["flags"] = "; ".join(flags)
    return rows


def counts(rows):
    """How many runs, and how many measured Chimaps, ``rows`` (``group_rows``) hold: the console's and page's counts."""
    return len({row["run"] for row in rows}), sum(not row["problem"] for row in rows)


def _cell(value):
    """A TSV cell: n/a for a missing value (BIDS), numbers to 4 significant digits, text on one line (a flag may quote
    an error message over several, or with tabs)."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4g}" if isinstance(value, float) else " ".join(str(value).split())


def group_figure_png(rows):
    """Brain mask volume per run and each Chimap's tail ratio per run (``flag_rows``' rows), in red where that value
    is flagged (a mask volume far from the others', a tail ratio below ``POLARITY_WARNING_RATIO``); PNG bytes."""
    plt = pyplot_agg()
    runs = list(dict.fromkeys(row["run"] for row in rows))
    outliers = {row["run"] for row in rows if row["mask_outlier"]}
    fig, (volume_ax, ratio_ax) = plt.subplots(1, 2, figsize=(9.0, 0.3 * len(runs) + 1.6), layout="constrained")
    positions = {run: i for i, run in enumerate(runs)}
    volumes = {row["run"]: row["mask_ml"] for row in rows if row["mask_ml"] is not None}
    volume_ax.scatter(list(volumes.values()), [positions[r] for r in volumes],
                      c=["tab:red" if r in outliers else "tab:blue" for r in volumes])
    volume_ax.set_xlabel("brain mask (ml)")
    for marker, method in zip(cycle("osD^v<>p"), INVERSION_METHODS):
        points = [(row["tail_ratio"], positions[row["run"]]) for row in rows
                  if row["method"] == method and row["tail_ratio"] is not None]
        if points:
            colours = ["tab:red" if ratio < POLARITY_WARNING_RATIO else "tab:blue" for ratio, _ in points]
            ratio_ax.scatter(*zip(*points), marker=marker, label=method, facecolors="none", edgecolors=colours)
    ratio_ax.axvline(POLARITY_WARNING_RATIO, color="0.5", linestyle="--", linewidth=1)
    ratio_ax.set_xlabel("Chimap tail ratio (above 1 in brains)")
    if ratio_ax.get_legend_handles_labels()[0]:  # no Chimap with a tail ratio: no legend to draw
        ratio_ax.legend(fontsize=7, loc="best")
    for ax in (volume_ax, ratio_ax):
        ax.set_yticks(range(len(runs)), runs if ax is volume_ax else [""] * len(runs), fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", linewidth=0.3)
    return png_bytes(fig)


def group_rows(output_dir, subjects, sessions=(), logged=None, refused=None):
    """The flagged rows (``run_rows``, ``flag_rows``) of every run of ``subjects`` (labels without sub-) in the
    derivatives dataset ``output_dir``, only of ``sessions`` (labels without ses-) if any are given. A run is one
    that has a derivative there (``processed_runs``), that a participant run processed (``logged``, default
    ``logged_runs(output_dir)``) or whose input the last participant run naming it refused (``refused``, default
    ``refused_runs(output_dir)``: ``refused_row``); it should have the Chimaps of the methods that run was asked for,
    and of any other present."""
    logged = logged_runs(output_dir) if logged is None else logged
    refused = refused_runs(output_dir) if refused is None else refused
    rows = []
    for subject in subjects:
        found = processed_runs(output_dir, subject, INVERSION_METHODS)
        names = sorted(found.keys() | {name for name in [*logged, *refused] if run_name_labels(name).get("sub") == subject})
        for name in names:
            if sessions and run_name_labels(name).get("ses") not in sessions:
                continue
            if name in refused:
                rows.append(refused_row(name, *refused[name], earlier_derivatives=name in found))
                continue
            asked, log_dir = logged.get(name, ((), None))
            present = [key.removeprefix("chimap:") for key in found.get(name, {}) if key.startswith("chimap:")]
            methods = [method for method in INVERSION_METHODS if method in asked or method in present]
            rows += run_rows(name, named_run_paths(output_dir, name, methods), log_dir)
    return flag_rows(rows)


def write_group_report(output_dir, rows, selection="every run"):
    """Write ``group_qsm.tsv`` of ``rows`` (``group_rows``), its ``.json`` column descriptions and
    ``group_qsm.html`` (its figure inside, and ``selection``: which runs were asked for, e.g. "the runs of
    subject(s) 01") into ``output_dir``; return (tsv path, html path). Every text is made
    before the first is written, so that a failure leaves the earlier files; CantCreateError when one cannot be."""
    out = Path(output_dir)
    lines = ["\t".join(COLUMNS)] + ["\t".join(_cell(row[column]) for column in COLUMNS) for row in rows]
    texts = {out / f"{GROUP_STEM}.tsv": "\n".join(lines) + "\n",
             out / f"{GROUP_STEM}.json": json.dumps({c: {"Description": d} for c, d in COLUMNS.items()}, indent=2) + "\n",
             out / f"{GROUP_STEM}.html": _group_html(rows, selection)}
    for path, text in texts.items():
        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise CantCreateError(f"cannot write {path} ({exc.strerror or exc}): make OUTPUT_DIR writable and "
                                  "remove what stands in the way.") from exc
    return out / f"{GROUP_STEM}.tsv", out / f"{GROUP_STEM}.html"


def _group_html(rows, selection):
    """The group page: which runs (``selection``) and counts, the figure (embedded, so the page is one file), and
    the table with flagged rows first, each run linked to its subject's report."""
    ordered = sorted(rows, key=lambda row: (not row["flags"], row["run"], row["method"] or ""))
    header = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for row in ordered:
        cells = []
        for column in COLUMNS:
            text = html.escape(_cell(row[column]))
            if column == "run":
                text = f'<a href="sub-{html.escape(row["subject"])}.html">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append(f'<tr class="{"flagged" if row["flags"] else ""}">{"".join(cells)}</tr>')
    flagged = len({row["run"] for row in rows if row["flags"]})
    runs, chimaps = counts(rows)
    figure = base64.b64encode(group_figure_png(rows)).decode("ascii")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>qsmprep: group</title><style>"
            "body { font-family: sans-serif; max-width: 1400px; margin: 2em auto; color: #222; }"
            "table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 2px 8px; text-align: right; }"
            "tr.flagged { background: #fdd; } img { max-width: 100%; }</style></head><body>"
            f"<h1>qsmprep group report</h1><p>Of {html.escape(selection)} in this folder: "
            f"{runs} run(s), {chimaps} Chimap(s); {flagged} run(s) flagged "
            f"(red). Columns are described in {GROUP_STEM}.json; each run links to its subject's report.</p>"
            f'<img src="data:image/png;base64,{figure}" alt="brain mask volumes and Chimap tail ratios per run">'
            f"<table><tr>{header}</tr>{''.join(body)}</table></body></html>")
