"""The per-subject HTML report: mosaics of every run's maps and the methods text.

Layout follows fMRIPrep: ``OUTPUT_DIR/sub-<label>.html`` with its figures in
``OUTPUT_DIR/sub-<label>/figures/``, linked by relative paths so the
derivatives folder can be moved or shared as a whole.
"""

import fcntl
import html
import logging
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from .. import __version__
from ..bids.derivatives import logged_runs, processed_runs
from ..checks import is_number
from ..config import INVERSION_METHODS
from ..errors import DataError, QSMPrepError
from ..io import load_nifti, read_json_object, sidecar_path, write_atomic, write_text_atomic
from ..physics import b0_dir_from_affine, b0_tilt_deg, ras_voxel_size, to_ras, voxel_size_from_affine
from .mosaic import (
    CHI_WINDOW_PPM,
    LOCAL_FIELD_WINDOW_PPM,
    in_plane_box,
    mosaic_png,
    robust_window,
    slice_indices,
)

log = logging.getLogger(__name__)

ORIENTATION_NOTE = ("Axial slices from inferior (top left) to superior (bottom right), row by row, each in "
                    "neurological convention: the subject's left on the left (L and R marked on the first slice), "
                    "anterior at the top.")

# The script marks each figure once the browser has decoded it, and replaces
# a missing one with a visible warning instead of a broken-image icon.
_IMAGE_CHECK = """<script>
function markFigure(img, ok) {
  img.dataset.loaded = ok && img.naturalWidth > 0 ? "1" : "0";
  if (img.dataset.loaded === "0") {
    img.insertAdjacentHTML("afterend", '<p class="missing">Figure missing: ' + img.getAttribute("src") + "</p>");
  }
}
window.addEventListener("load", function () {
  document.querySelectorAll("img").forEach(function (img) {
    markFigure(img, img.complete);
  });
});
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #446; } h2 { color: #446; margin-top: 2em; }
figure { margin: 0.5em 0 1.5em 0; } img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; } .missing { color: #b00; font-weight: bold; }
pre { white-space: pre-wrap; background: #f5f5f5; padding: 1em; }
table.summary th { text-align: left; font-weight: normal; color: #555; padding-right: 1.5em; }
</style>"""


def _figure_html(path, output_dir, caption):
    """A figure element showing ``path`` (a PNG under ``output_dir``), linked relative to the report."""
    rel = path.relative_to(output_dir).as_posix()
    return (
        f'<figure><img src="{html.escape(rel)}" alt="{html.escape(path.stem)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _figure(figures_dir, output_dir, name, png_bytes, caption):
    path = write_atomic(figures_dir / f"{name}.png", lambda tmp: Path(tmp).write_bytes(png_bytes))
    return _figure_html(path, output_dir, caption)


DAMAGED = "it was cut short or damaged (e.g. by an interrupted copy or a full disk)"
"""What ``load_nifti`` says of a derivative it cannot read, in place of its advice to re-export an input."""


def _load_ras(path, what):
    """A NIfTI file's data in RAS+ voxel order (``to_ras``), so all figures share one orientation."""
    data, affine, _ = load_nifti(path, what, fix=DAMAGED)
    return to_ras(data, affine)


def run_mosaic(mask, voxel_size=None):
    """``mosaic_png`` as a run's figures use it, for volumes in RAS+ order (``to_ras``) like ``mask``, with
    ``voxel_size`` (mm, ``ras_voxel_size``; None: square pixels): 8 axial slices through the mask in two rows of 4,
    drawn to scale, each cropped to the mask's box with a margin (``in_plane_box``), L and R marked. Further
    keywords of the returned function go to ``mosaic_png`` (and may override these)."""
    return partial(mosaic_png, slices=slice_indices(mask), side_labels=("L", "R"), columns=4, crop=in_plane_box(mask),
                   voxel_size=voxel_size)


def read_sidecar(path):
    """The JSON sidecar beside a NIfTI file ({} when there is none, it cannot be read, or it holds no JSON object,
    as a hand-edited one may: its fields are read with ``.get``)."""
    try:
        return read_json_object(sidecar_path(path))
    except (OSError, DataError):
        return {}


B0_AGREES_DEG = 0.1
"""Largest angle (degrees) between the B0 direction a Chimap was computed with and the one its images' affine gives
at which the report says the direction came from the affine (float32 affines of oblique grids are off by 1e-5)."""


def b0_direction_text(b0_dir, affine):
    """The report's words on the B0 direction ``b0_dir`` (voxel coordinates) a run's Chimaps were computed with: its
    angle to the third voxel axis, and whether it is the direction the images' ``affine`` gives or another one (given
    with ``--b0-dir``)."""
    given = np.asarray(b0_dir, dtype=np.float64)
    from_affine = b0_dir_from_affine(np.asarray(affine, dtype=np.float64))
    source = ("from the image orientation" if b0_tilt_deg(given, from_affine) <= B0_AGREES_DEG else
              f"given with --b0-dir; the image orientation gives {b0_tilt_deg(from_affine):.1f} degrees")
    return f"{b0_tilt_deg(given):.1f} degrees from the third voxel axis ({source})"


def mask_volume_ml(mask, affine):
    """Volume of a mask in ml: its voxel count times the voxel volume of ``affine``."""
    return float(np.count_nonzero(mask) * np.prod(voxel_size_from_affine(affine)) / 1000)


ACQUISITION_TYPES = {
    "3D": "3D",
    "2D": "2D multi-slice: each slice can carry its own phase offset, which qsmprep does not correct; look for steps "
          "between slices in the local field and the Chimaps",
}
"""The report's summary of the sidecars' ``MRAcquisitionType`` (the QSM consensus recommends 3D acquisitions)."""


def run_summary_html(mask, affine, mask_sidecar, chimap_sidecar):
    """A table of what a run's figures show: grid and voxel size, echoes, field strength (with its source), 2D or 3D
    acquisition, B0 direction (with its source, ``b0_direction_text``) and the brain mask's volume, from the mask
    (array as stored, affine) and the sidecars of the mask and of one Chimap (dicts)."""
    voxels = int(np.count_nonzero(mask))
    volume_ml = mask_volume_ml(mask, affine)
    rows = [("Grid", f"{' x '.join(map(str, np.shape(mask)[:3]))} voxels of "
                     f"{' x '.join(f'{v:.3g}' for v in voxel_size_from_affine(affine))} mm")]
    # sidecars of an earlier invocation may have been edited by hand: a field of another type is left out
    echo_times = mask_sidecar.get("EchoTime")
    if isinstance(echo_times, list) and echo_times and all(map(is_number, echo_times)):
        rows.append(("Echo times", f"{', '.join(f'{1000 * t:.4g}' for t in echo_times)} ms ({len(echo_times)} "
                                   f"echo{'es' if len(echo_times) > 1 else ''})"))
    if is_number(mask_sidecar.get("MagneticFieldStrength")):
        source = mask_sidecar.get("MagneticFieldStrengthSource")  # ImagingFrequency, MagneticFieldStrength, --b0-tesla
        rows.append(("Field strength", f"{mask_sidecar['MagneticFieldStrength']:.4g} T"
                                       + (f" (from {source})" if isinstance(source, str) else "")))
    acquisition = mask_sidecar.get("MRAcquisitionType")
    if isinstance(acquisition, str) and acquisition in ACQUISITION_TYPES:
        rows.append(("Acquisition", ACQUISITION_TYPES[acquisition]))
    if isinstance(mask_sidecar.get("PhaseInverted"), bool):
        rows.append(("Phase", "negated before processing (--invert-phase)" if mask_sidecar["PhaseInverted"]
                     else "used with the sign stored"))
    b0_dir = chimap_sidecar.get("B0Direction")
    if isinstance(b0_dir, list) and len(b0_dir) == 3 and all(map(is_number, b0_dir)) and any(b0_dir):
        rows.append(("B0 direction", b0_direction_text(b0_dir, affine)))
    rows.append(("Brain mask", f"{volume_ml:.0f} ml ({voxels} voxels), where the local "
                               "field and the Chimaps are defined"))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{cells}</table>'


def inference_device_text(device):
    """The deep Chimap caption's sentence on where its network ran, from its sidecar's ``DeepInferenceDevice``
    (``qsmprep.inversion.deep.inference_device``); "" for other Chimaps, or a field edited out of shape."""
    if not (isinstance(device, dict) and all(isinstance(device.get(key), str)
                                             for key in ("Device", "Name", "NetworkPrecision"))):
        return ""
    where = "the CPU" if device["Device"] == "cpu" else f"{device['Name']} ({device['Device']})"
    return f" Its network ran on {where} in {device['NetworkPrecision']}."


def chimap_percentiles(chi, mask):
    """(1st percentile, median, 99th percentile) in ppm of a Chimap in the brain mask; None for an empty mask."""
    values = np.asarray(chi)[np.asarray(mask, dtype=bool)]
    return tuple(float(p) for p in np.percentile(values, (1, 50, 99))) if values.size else None


def paramagnetic_tail_ratio(percentiles):
    """How far a Chimap's positive tail reaches against its negative one, from its ``chimap_percentiles``:
    (99th percentile - median) / (median - 1st percentile), or None for a map without contrast
    (``no_contrast_reason``), whose tails are noise, or without a negative tail.

    Veins and iron-rich deep grey matter are strongly paramagnetic and few brain tissues strongly diamagnetic, so a
    brain's positive tail is the longer: 1.37-1.66 on the 2016 challenge data by TKD, CFL2 and the deep model (2.00
    for its COSMOS map) and 4.46 for the deep map of the simulated head. A map of phase stored with the opposite
    polarity has the tails swapped (the 2016 deep map of the negated field: 0.60), so a ratio below
    ``POLARITY_WARNING_RATIO`` makes the report warn (docs/outputs.md, The report).
    """
    if no_contrast_reason(percentiles):
        return None
    low, median, high = percentiles
    return (high - median) / (median - low) if median > low else None


POLARITY_WARNING_RATIO = 1.0
"""``paramagnetic_tail_ratio`` below which the report and the log say the phase polarity may be inverted."""


SINGLE_ECHO_TAIL_NOTE = ("This run has a single echo, whose receive-phase offset background removal leaves in "
                         "part (docs/methods/phase.md, A single echo): that shortens the tail too.")
"""Why a single-echo run's tail ratio may be below 1 with the polarity right: the simulated head's TKD map, one echo
with the simulator's 1 rad phase offset, scores 0.80 (three echoes: above 1, no warning)."""


def polarity_warning(method, ratio, inverted, single_echo=False):
    """The report's warning on a Chimap whose ``paramagnetic_tail_ratio`` is below ``POLARITY_WARNING_RATIO``
    (``inverted``: whether ``--invert-phase`` was given; ``single_echo``: a run of one echo, default False, gets
    ``SINGLE_ECHO_TAIL_NOTE``), or "" when there is none to give."""
    if ratio is None or ratio >= POLARITY_WARNING_RATIO:
        return ""
    fix = "without --invert-phase" if inverted else "with --invert-phase"
    return (f"The {method} Chimap's positive tail is shorter than its negative one (ratio {ratio:.2f}; in brains it "
            "is above 1, as veins and iron-rich deep grey matter are paramagnetic). If veins and the deep grey "
            f"nuclei look dark in it, the phase polarity is most likely inverted: run qsmprep again {fix}. If they "
            "look bright, the polarity is right and the map's own errors shorten its tail (streaks, as TKD gives on a "
            "thin slab): compare with the other inversions." + (f" {SINGLE_ECHO_TAIL_NOTE}" if single_echo else ""))


def single_echo(sidecar):
    """Whether a derivative's ``sidecar`` (a dict) says its run had one echo (its ``EchoTime``, a list of one or a
    number); False where it does not say."""
    echo_times = sidecar.get("EchoTime")
    return is_number(echo_times) or (isinstance(echo_times, list) and len(echo_times) == 1)


NO_CONTRAST_PPM = 1e-4
"""Spread of a Chimap in the brain mask (99th minus 1st percentile, ppm) below which it shows no contrast: a brain's
is about 0.15 ppm (-0.05 to 0.1), over 1000 times more, while TKD of two echoes with one phase image (a local field
of zeros but for float32 round-off) gave 8e-7 ppm, over 100 times less, and its tail ratio of 0.79 made the report
advise --invert-phase."""


def no_contrast_reason(percentiles):
    """Why a Chimap shows no susceptibility contrast in the brain mask, from its ``chimap_percentiles``, or "" when
    it does: an empty mask, values that are not finite, or 1st and 99th percentiles within ``NO_CONTRAST_PPM``, as
    in the map of zeros, or of round-off, that a step which lost the signal leaves (a local field of zeros, as
    V-SHARP radii smaller than a voxel gave before they were refused, ``check_high_pass_radius``). Such a map has no
    tail ratio, so ``polarity_warning`` says nothing of it."""
    if percentiles is None:
        return "the brain mask is empty"
    low, _, high = percentiles
    if not np.all(np.isfinite(percentiles)):
        return "it holds values that are not finite (NaN or infinite) in the brain mask"
    if high - low >= NO_CONTRAST_PPM:
        return ""
    if high == low:
        return f"its 1st and 99th percentiles in the brain mask are both {low:.3g} ppm"
    return (f"its 1st and 99th percentiles in the brain mask, {low:.3g} and {high:.3g} ppm, are less than "
            f"{NO_CONTRAST_PPM:g} ppm apart (round-off, not tissue)")


def no_contrast_warning(method, percentiles):
    """The report's warning on a Chimap with no susceptibility contrast (``no_contrast_reason``), or ""."""
    reason = no_contrast_reason(percentiles)
    return (f"The {method} Chimap shows no susceptibility contrast: {reason}. A processing step lost the signal: "
            "check the local field figure above and the method parameters in the run's logs/<run_id>/config.json, "
            "then run qsmprep again.") if reason else ""


FIGURE_DESCS = ("mask", "total", "local")
"""What a run's figures show besides its Chimaps (one figure per inversion method, named by the method)."""


def figure_stem(run_name, desc):
    """File name, without .png, of a run's report figure of ``desc`` (in ``FIGURE_DESCS``, or an inversion method)."""
    return f"{run_name}_desc-{desc}_mosaic"


def _run_section(run, figures_dir, output_dir):
    """HTML for one run: magnitude with mask outline, fields, each Chimap, axial in neurological convention."""
    name = run["name"]
    data, affine, _ = load_nifti(run["mask"], "brain mask", fix=DAMAGED)
    mask = to_ras(data, affine) > 0
    mosaic = run_mosaic(mask, ras_voxel_size(affine))
    chimaps = sorted(run.get("chimaps", {}).items())
    parts = [f"<h2>{html.escape(name)}</h2>",
             # the file's grid, in its storage order (the figures are in RAS order)
             run_summary_html(data > 0, affine, read_sidecar(run["mask"]),
                              read_sidecar(chimaps[0][1]) if chimaps else {})]
    earlier = run.get("earlier")
    if earlier:
        folder = (f'<a href="{html.escape(earlier)}/">{html.escape(earlier)}</a>' if isinstance(earlier, str)
                  else "that invocation's <code>logs/</code> folder")
        parts.append(f"<p>Processed by an earlier qsmprep invocation, not this one: its command and methods text "
                     f"are in {folder}.</p>")
    mask_caption = "Brain mask (red) on the first-echo magnitude (arbitrary units, window its 1st to 99th percentile)."
    mask_figure = figures_dir / f"{figure_stem(name, 'mask')}.png"
    if run.get("magnitude"):
        magnitude = _load_ras(run["magnitude"], "magnitude")
        if magnitude.ndim == 4:
            magnitude = magnitude[..., 0]
        png = mosaic(magnitude, outline=mask, title="Magnitude (first echo) and brain mask", units="a.u.")
        parts.append(_figure(figures_dir, output_dir, mask_figure.stem, png, mask_caption))
    elif mask_figure.is_file():  # drawn by the earlier invocation that read the magnitude
        parts.append(_figure_html(mask_figure, output_dir, mask_caption))
    if run.get("total_field"):
        total = _load_ras(run["total_field"], "total field")
        window = robust_window(total, mask)
        png = mosaic(total, window=window, cmap="RdBu_r", title="Total field", units="Hz")
        caption = (f"Total field map (Hz), before background removal, window {window[0]:.3g} to {window[1]:.3g} Hz "
                   "(the larger of its 2nd and 98th percentiles in the mask, both ways).")
        parts.append(_figure(figures_dir, output_dir, figure_stem(name, "total"), png, caption))
    if run.get("local_field"):
        local = _load_ras(run["local_field"], "local field") * mask
        png = mosaic(local, window=LOCAL_FIELD_WINDOW_PPM, cmap="RdBu_r", title="Local field", units="ppm")
        caption = (f"Local field map (ppm) after background removal, window {LOCAL_FIELD_WINDOW_PPM[0]} to "
                   f"{LOCAL_FIELD_WINDOW_PPM[1]} ppm.")
        parts.append(_figure(figures_dir, output_dir, figure_stem(name, "local"), png, caption))
    for method, path in chimaps:
        chi = _load_ras(path, "susceptibility map") * mask
        sidecar = read_sidecar(path)
        png = mosaic(chi, window=CHI_WINDOW_PPM, title=f"Susceptibility ({method})", units="ppm")
        percentiles = chimap_percentiles(chi, mask)
        low, _, high = percentiles or (0.0, 0.0, 0.0)
        ratio = paramagnetic_tail_ratio(percentiles)
        tails = ("" if ratio is None else f" Its positive tail (99th percentile minus median) is {ratio:.2f} times "
                 "its negative one (median minus 1st percentile).")
        caption = (f"Chimap, {method} inversion, window {CHI_WINDOW_PPM[0]} to {CHI_WINDOW_PPM[1]} ppm; in the brain "
                   f"mask its 1st to 99th percentile is {low:.3f} to {high:.3f} ppm.{tails}"
                   f"{inference_device_text(sidecar.get('DeepInferenceDevice'))}")
        parts.append(_figure(figures_dir, output_dir, figure_stem(name, method), png, caption))
        for warning in (no_contrast_warning(method, percentiles),
                        polarity_warning(method, ratio, sidecar.get("PhaseInverted", False), single_echo(sidecar))):
            if warning:
                log.warning(warning)
                parts.append(f'<p class="missing">{html.escape(warning)}</p>')
    return "\n".join(parts)


def build_subject_report(output_dir, subject, runs, methods_text="", command=None, errors=(), log_dir=None):
    """Write ``OUTPUT_DIR/sub-<subject>.html`` and its figures; return its path.

    Parameters
    ----------
    output_dir : str or Path
        The derivatives dataset root.
    subject : str
        Subject label without the ``sub-`` prefix.
    runs : list of dict
        One per run: ``name`` (e.g. ``sub-01_ses-1``), ``mask`` (path, required),
        and optionally ``magnitude``, ``total_field``, ``local_field`` (paths),
        ``chimaps`` (dict method -> path) and ``earlier`` (for a run an
        earlier invocation processed: its log folder, "logs/<run_id>" relative
        to ``output_dir``, or True where none names the run; its section says
        so).
    methods_text : str
        The boilerplate methods paragraph with references (plain text) of the
        runs this invocation processed.
    command : str or None
        The command line that produced the outputs.
    errors : sequence of str
        Problems met for this subject (e.g. runs skipped by validation).
    log_dir : str or Path or None
        This invocation's log folder (``OUTPUT_DIR/logs/<run_id>``), linked
        from the report relative to it.
    """
    output_dir = Path(output_dir)
    figures_dir = output_dir / f"sub-{subject}" / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    earlier = sum(bool(run.get("earlier")) for run in runs)
    counts = f"{len(runs) - earlier} run(s)" + (f", and {earlier} from an earlier invocation" if earlier else "")
    body = [f"<h1>qsmprep report: sub-{html.escape(subject)}</h1>",
            f"<p>qsmprep {__version__}; {counts}. {ORIENTATION_NOTE}</p>"]
    if errors:
        items = "".join(f"<li>{html.escape(e)}</li>" for e in errors)
        body.append(f'<h2>Errors</h2><ul class="missing">{items}</ul>')
    for run in runs:
        try:
            body.append(_run_section(run, figures_dir, output_dir))
        except QSMPrepError as exc:  # an earlier invocation's file, gone or broken since; this run's report stands
            if not run.get("earlier"):
                raise
            body.append(f"<h2>{html.escape(run['name'])}</h2>"
                        f'<p class="missing">Processed by an earlier invocation; its outputs cannot be read: '
                        f"{html.escape(str(exc))}</p>")
    if methods_text:
        body.append(f"<h2>Methods</h2><pre>{html.escape(methods_text)}</pre>")
    if command:
        body.append(f"<h2>About</h2><p>Command:</p><pre>{html.escape(command)}</pre>")
    if log_dir:
        folder = Path(os.path.relpath(log_dir, output_dir)).as_posix()
        body.append(f'<p>Log: <a href="{html.escape(folder)}/qsmprep.log">{html.escape(folder)}/qsmprep.log</a>; '
                    "the command, configuration, citations and any crash files are beside it.</p>")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>qsmprep: sub-{html.escape(subject)}</title>{_STYLE}</head><body>"
        + "\n".join(body) + _IMAGE_CHECK + "</body></html>"
    )
    return write_text_atomic(output_dir / f"sub-{subject}.html", page)


def report_entry(name, paths, **extra):
    """One run of ``build_subject_report``: its name, derivative paths (``run_output_paths`` keys) and ``extra``."""
    chimaps = {key.split(":", 1)[1]: str(path) for key, path in paths.items() if key.startswith("chimap:")}
    return {"name": name, "mask": str(paths["mask"]), "total_field": str(paths.get("total_field", "")),
            "local_field": str(paths.get("local_field", "")), "chimaps": chimaps, **extra}


def other_report_runs(output_dir, subject, runs):
    """``build_subject_report`` entries of ``subject``'s runs in ``output_dir`` other than ``runs`` (entries): those
    an earlier invocation processed, or a concurrent one has finished; their derivatives stay, so the report shows
    them, each with the log folder of the invocation that processed it (``logged_runs``) where one names it."""
    current = {run["name"] for run in runs}
    try:
        logged = logged_runs(output_dir)
    except DataError as exc:  # another invocation's config.json, broken since: this report stands without it
        log.warning("The report of sub-%s names no earlier invocation's log folder: %s", subject, exc)
        logged = {}
    return [report_entry(name, paths, earlier=logged.get(name, (None, True))[1])
            for name, paths in processed_runs(output_dir, subject, INVERSION_METHODS).items()
            if name not in current and "mask" in paths]  # the report shows a run within its brain mask


@contextmanager
def subject_report_lock(output_dir, subject):
    """Hold an exclusive lock on ``sub-<subject>``'s report while in the block: ``fcntl.flock`` on
    ``OUTPUT_DIR/.sub-<subject>.html.lock``, a file that lives only as long as the lock (so none is left among the
    derivatives). Two invocations processing sessions of one subject at once (an HPC array job per session) then
    write its report one after the other, the second seeing the first's finished runs. On a file system without
    locks (Lustre mounted without ``flock``) the report is written unlocked, with a warning."""
    path = Path(output_dir) / f".sub-{subject}.html.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            handle.close()
            path.unlink(missing_ok=True)
            log.warning("sub-%s's report is written without a lock (%s: %s); an invocation processing other "
                        "sessions of this subject at the same time may leave them out of it", subject, path, exc)
            yield
            return
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:  # its holder removed it while this one waited: lock a new one
            pass
        handle.close()
    try:
        yield
    finally:
        path.unlink()  # before the lock goes with the handle: a waiter then finds it gone and locks a new one
        handle.close()


def write_subject_report(output_dir, subject, runs, **options):
    """``build_subject_report`` of ``runs`` (this invocation's entries) and the subject's other runs found in
    ``output_dir`` when it is written (``other_report_runs``), under ``subject_report_lock``; return its path.
    ``options``: those of ``build_subject_report``."""
    with subject_report_lock(output_dir, subject):
        return build_subject_report(output_dir, subject, list(runs) + other_report_runs(output_dir, subject, runs),
                                    **options)
