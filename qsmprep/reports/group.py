"""The group level: one table of quality measures over every run in a derivatives dataset, and a page with it.

``qsmprep BIDS_DIR OUTPUT_DIR group`` reads what the participant level wrote (brain masks, Chimaps and their
sidecars) and writes ``OUTPUT_DIR/group_Chimap.tsv`` (a row per run and inversion method, described by
``group_Chimap.json``) and ``OUTPUT_DIR/group_Chimap.html`` (the table, flagged rows first, and a figure), as
MRIQC's group reports do, so that a study's failed runs are found without opening every subject's report.
"""

import base64
import html
import json
from pathlib import Path

import numpy as np

from ..bids.derivatives import processed_runs
from ..config import INVERSION_METHODS
from ..io import load_nifti, write_text_atomic
from .mosaic import _png_bytes, _pyplot
from .report import POLARITY_WARNING_RATIO, _sidecar, chimap_percentiles, mask_volume_ml, paramagnetic_tail_ratio

GROUP_STEM = "group_Chimap"

COLUMNS = {
    "run": "run name, as in its derivatives' file names (e.g. sub-01_ses-1)",
    "subject": "subject label without sub-",
    "method": "inversion method of the Chimap (desc-<method>_Chimap)",
    "mask_ml": "brain mask volume in ml (desc-brain_mask)",
    "echoes": "number of echoes (the mask sidecar's EchoTime)",
    "b0_tesla": "field strength in T (MagneticFieldStrength)",
    "phase_inverted": "whether the phase was negated before processing (--invert-phase, PhaseInverted)",
    "chi_p1_ppm": "1st percentile of the Chimap in the brain mask, ppm",
    "chi_median_ppm": "median of the Chimap in the brain mask, ppm",
    "chi_p99_ppm": "99th percentile of the Chimap in the brain mask, ppm",
    "tail_ratio": "(chi_p99_ppm - chi_median_ppm) / (chi_median_ppm - chi_p1_ppm): above 1 in brains; below 1 the "
                  "phase polarity is most likely inverted (docs/outputs.md, The report)",
    "flags": "why the row stands out (tail ratio below 1; brain mask volume more than 3 robust standard deviations "
             "from the group's median, with 5 runs or more), n/a when it does not",
}
"""The table's columns and what each holds (``group_Chimap.json``, the BIDS description of a TSV's columns)."""

MASK_OUTLIER_Z = 3.0
"""Robust z-score (median and 1.4826 x median absolute deviation over the group's runs) beyond which a brain mask
volume is flagged: a mask that lost part of the brain, or kept the scalp."""

MIN_RUNS_FOR_OUTLIERS = 5
"""Fewest runs for which mask volumes are compared with the group's (fewer give no stable median and spread)."""


def run_rows(name, paths):
    """The table's rows of one run (``processed_runs`` paths): one per Chimap, measured from the files."""
    mask_data, affine, _ = load_nifti(paths["mask"], "brain mask")
    mask = mask_data > 0
    meta = _sidecar(paths["mask"])
    common = {"run": name, "subject": name.split("_")[0].removeprefix("sub-"),
              "mask_ml": round(mask_volume_ml(mask, affine), 1), "echoes": len(meta.get("EchoTime") or []) or None,
              "b0_tesla": meta.get("MagneticFieldStrength"), "phase_inverted": meta.get("PhaseInverted")}
    rows = []
    for method in INVERSION_METHODS:
        if f"chimap:{method}" not in paths:
            continue
        chi = load_nifti(paths[f"chimap:{method}"], "susceptibility map")[0]
        percentiles = chimap_percentiles(chi, mask)
        ratio = paramagnetic_tail_ratio(percentiles)
        low, median, high = percentiles or (None, None, None)
        rows.append({**common, "method": method, "chi_p1_ppm": low, "chi_median_ppm": median, "chi_p99_ppm": high,
                     "tail_ratio": ratio})
    return rows


def flag_rows(rows):
    """Add each row's ``flags``: a tail ratio below ``POLARITY_WARNING_RATIO``, and a brain mask volume beyond
    ``MASK_OUTLIER_Z`` robust standard deviations of the runs' median (with ``MIN_RUNS_FOR_OUTLIERS`` runs)."""
    volumes = {row["run"]: row["mask_ml"] for row in rows}
    median = float(np.median(list(volumes.values()))) if volumes else 0.0
    spread = 1.4826 * float(np.median([abs(v - median) for v in volumes.values()])) if volumes else 0.0
    for row in rows:
        flags = []
        if row["tail_ratio"] is not None and row["tail_ratio"] < POLARITY_WARNING_RATIO:
            flags.append(f"tail ratio {row['tail_ratio']:.2f} < 1: phase polarity inverted?")
        if len(volumes) >= MIN_RUNS_FOR_OUTLIERS and spread > 0:
            z = (row["mask_ml"] - median) / spread
            if abs(z) > MASK_OUTLIER_Z:
                flags.append(f"brain mask {row['mask_ml']:g} ml, {z:+.1f} robust SD from the median {median:g} ml")
        row["flags"] = "; ".join(flags)
    return rows


def _cell(value):
    """A TSV cell: n/a for a missing value (BIDS), numbers to 4 significant digits."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def group_figure_png(rows):
    """Brain mask volume per run and each Chimap's tail ratio per run, flagged runs in red; PNG bytes."""
    plt = _pyplot()
    runs = list(dict.fromkeys(row["run"] for row in rows))
    flagged = {row["run"] for row in rows if row["flags"]}
    fig, (volume_ax, ratio_ax) = plt.subplots(1, 2, figsize=(9.0, 0.3 * len(runs) + 1.6), layout="constrained")
    positions = {run: i for i, run in enumerate(runs)}
    volumes = {row["run"]: row["mask_ml"] for row in rows}
    volume_ax.scatter(list(volumes.values()), [positions[r] for r in volumes],
                      c=["tab:red" if r in flagged else "tab:blue" for r in volumes])
    volume_ax.set_xlabel("brain mask (ml)")
    for marker, method in zip("osD^", INVERSION_METHODS):
        points = [(row["tail_ratio"], positions[row["run"]]) for row in rows
                  if row["method"] == method and row["tail_ratio"] is not None]
        if points:
            ratio_ax.scatter(*zip(*points), marker=marker, label=method, facecolors="none",
                             edgecolors=["tab:red" if runs[int(p)] in flagged else "tab:blue" for _, p in points])
    ratio_ax.axvline(POLARITY_WARNING_RATIO, color="0.5", linestyle="--", linewidth=1)
    ratio_ax.set_xlabel("Chimap tail ratio (above 1 in brains)")
    ratio_ax.legend(fontsize=7, loc="best")
    for ax in (volume_ax, ratio_ax):
        ax.set_yticks(range(len(runs)), runs if ax is volume_ax else [""] * len(runs), fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", linewidth=0.3)
    return _png_bytes(fig)


def write_group_report(output_dir, subjects):
    """Measure every run of ``subjects`` (labels without sub-) in the derivatives dataset ``output_dir`` and write
    ``group_Chimap.tsv``, its ``.json`` column descriptions and ``group_Chimap.html`` (its figure inside);
    return (tsv path, html path, rows)."""
    out = Path(output_dir)
    rows = flag_rows([row for subject in subjects
                      for name, paths in processed_runs(out, subject, INVERSION_METHODS).items()
                      for row in run_rows(name, paths)])
    tsv = out / f"{GROUP_STEM}.tsv"
    lines = ["\t".join(COLUMNS)] + ["\t".join(_cell(row[column]) for column in COLUMNS) for row in rows]
    write_text_atomic(tsv, "\n".join(lines) + "\n")
    write_text_atomic(tsv.with_suffix(".json"),
                      json.dumps({c: {"Description": d} for c, d in COLUMNS.items()}, indent=2) + "\n")
    page = write_text_atomic(out / f"{GROUP_STEM}.html", _group_html(rows))
    return tsv, page, rows


def _group_html(rows):
    """The group page: counts, the figure (embedded, so the page is one file), and the table with flagged rows
    first, each run linked to its subject's report."""
    ordered = sorted(rows, key=lambda row: (not row["flags"], row["run"], row["method"]))
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
    runs = len({row["run"] for row in rows})
    figure = base64.b64encode(group_figure_png(rows)).decode("ascii")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>qsmprep: group</title><style>"
            "body { font-family: sans-serif; max-width: 1400px; margin: 2em auto; color: #222; }"
            "table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 2px 8px; text-align: right; }"
            "tr.flagged { background: #fdd; } img { max-width: 100%; }</style></head><body>"
            f"<h1>qsmprep group report</h1><p>{runs} run(s), {len(rows)} Chimap(s); {flagged} run(s) flagged "
            f"(red). Columns are described in {GROUP_STEM}.json; each run links to its subject's report.</p>"
            f'<img src="data:image/png;base64,{figure}" alt="brain mask volumes and Chimap tail ratios per run">'
            f"<table><tr>{header}</tr>{''.join(body)}</table></body></html>")
