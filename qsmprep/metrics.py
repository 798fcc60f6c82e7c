"""Image-quality metrics used by the QSM reconstruction challenges.

All metrics compare a reconstruction ``recon`` (x) with a reference ``ref``
(y), both (i, j, k) arrays in ppm, inside a ``mask`` (non-zero = inside; an
empty one is a DataError). Susceptibility is relative (D(0) = 0 leaves
its mean undetermined), so the error norms demean both images in the mask
first unless stated otherwise. docs/metrics.md gives every formula.

References
----------
Langkammer C et al. Quantitative susceptibility mapping: Report from the 2016
reconstruction challenge. Magn Reson Med 2018;79:1661-73 (NRMSE, HFEN).
Ravishankar S, Bresler Y. MR image reconstruction from highly undersampled
k-space data by dictionary learning. IEEE TMI 2011;30:1028-41 (HFEN).
QSM Challenge 2.0 Organization Committee (Milovic C et al.). QSM
reconstruction challenge 2.0: Design and report of results. Magn Reson Med
2021;86:1241-55 (XSIM, detrended NRMSE, deep grey matter slope, calcification
moment and streaking).
Wang Z, Bovik AC, Sheikh HR, Simoncelli EP. Image quality assessment: from
error visibility to structural similarity. IEEE TIP 2004;13:600-12 (SSIM).
"""

import logging
import re

import numpy as np
from scipy import ndimage

from .errors import DataError, few_named

logger = logging.getLogger(__name__)

DEEP_GM_NAME_PATTERNS = (
    "caudate",
    "putamen",
    "pallid(?:um|us)",
    "thalamus",
    "red nucleus",
    "nigra",
    "sn",
    "subthalamic",
    "dentate(?! gyrus)",
)
"""Regular expressions that mark a label name as a deep grey matter nucleus (``deep_gm_label_ids``), each matched
to whole words of the name (``_name_words``): "Left-Thalamus-Proper" and "Right-Putamen" match,
"Left-Hypothalamus", "Epithalamus" and "dentate_gyrus" do not. "sn" is the substantia nigra's abbreviation ("SN",
"SN and STN"); "nigra" alone also takes the spelling "Substancia-Nigra" (FreeSurfer's colour table)."""


def _mask_bool(mask):
    m = np.asarray(mask) > 0
    if not m.any():
        raise DataError("The evaluation mask is empty: give a mask with at least one voxel > 0.")
    return m


def _in_mask(recon, ref, mask, demean=True):
    """(x, y, m): both maps as float64, zero outside the mask m (bool), demeaned in it with ``demean``. Values
    outside the mask are never read (NaN there, as many tools write, made HFEN NaN through ``x * m``)."""
    m = _mask_bool(mask)
    x = np.where(m, np.asarray(recon, dtype=np.float64), 0.0)
    y = np.where(m, np.asarray(ref, dtype=np.float64), 0.0)
    if demean:  # in place: both are new arrays, and outside the mask they stay 0
        x[m] -= x[m].mean()
        y[m] -= y[m].mean()
    return x, y, m


def nrmse(recon, ref, mask, demean=True):
    """Normalised RMSE in percent: 100 ||x - y||_2 / ||y||_2 over ``mask``.

    With ``demean`` (default True) both images are demeaned in the mask first,
    as in the 2016 challenge (Langkammer 2018).
    """
    x, y, m = _in_mask(recon, ref, mask, demean)
    return float(100 * np.linalg.norm(x[m] - y[m]) / np.linalg.norm(y[m]))


def _linear_fit(x, y):
    """Least-squares (slope, intercept) of y ~ slope * x + intercept.

    ``lstsq`` gives the minimum-norm solution when x is constant, whose fitted
    values are still the projection of y onto span{x, 1}.
    """
    design = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(slope), float(intercept)


def nrmse_detrended(recon, ref, mask):
    """Detrended NRMSE in percent (2019 QSM challenge, Milovic 2021).

    The reconstruction is first fitted to the reference by least squares over
    the mask, y ~ a x + b (slope and intercept), and the NRMSE of the fitted
    map against the reference demeaned in the mask is returned:
    100 ||a x + b - y||_2 / ||y - mean(y)||_2. It scores structure and ignores
    a global scale or offset error; it equals 100 sqrt(1 - r^2) with r the
    Pearson correlation of x and y in the mask, and is 0 for x = a y + b.
    """
    m = _mask_bool(mask)
    x = np.asarray(recon, np.float64)[m]
    y = np.asarray(ref, np.float64)[m]
    slope, intercept = _linear_fit(x, y)
    return float(100 * np.linalg.norm(slope * x + intercept - y) / np.linalg.norm(y - y.mean()))


def hfen(recon, ref, mask, sigma=1.5):
    """High-frequency error norm in percent.

    100 ||LoG(x) - LoG(y)||_2 / ||LoG(y)||_2 over ``mask``, with the
    Laplacian-of-Gaussian of width ``sigma`` voxels (default 1.5, as in the
    2016 challenge) applied to the demeaned, masked images (Langkammer 2018).
    """
    x, y, m = _in_mask(recon, ref, mask)
    lx = ndimage.gaussian_laplace(x, sigma)
    ly = ndimage.gaussian_laplace(y, sigma)
    return float(100 * np.linalg.norm(lx[m] - ly[m]) / np.linalg.norm(ly[m]))


def xsim(recon, ref, mask, data_range_ppm=1.0, k=(0.01, 0.001), sigma=1.5, radius_vox=3, demean=True):
    """XSIM: the structural similarity index adapted to QSM (2019 challenge).

    SSIM (Wang 2004) with the changes of the QSM challenge 2.0 (Milovic 2021):
    maps stay in ppm (no rescaling to 0..255), dynamic range L = 1 ppm and
    K = (0.01, 0.001), which makes the index sensitive to streaking. Local
    means, variances and the covariance come from a Gaussian window of
    ``sigma`` voxels truncated at ``radius_vox`` (7^3 window, image borders
    replicated); the SSIM map is averaged over the mask:

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

    with C1 = (K1 L)^2 and C2 = (K2 L)^2. Both maps are set to zero outside
    the mask before filtering, as the challenge evaluated masked maps.

    Parameters
    ----------
    recon, ref : 3D arrays, ppm
    mask : 3D array, voxels > 0 are evaluated
    data_range_ppm : float, default 1.0
        L, the dynamic range in ppm.
    k : (float, float), default (0.01, 0.001)
    sigma : float, default 1.5
        Gaussian window width in voxels.
    radius_vox : int, default 3
        Window half-width in voxels.
    demean : bool, default True
        Demean both maps in the mask first (our convention for relative
        susceptibility; False reproduces the challenge's formula on maps
        that share the reference's zero).

    Returns
    -------
    float, 1 for identical maps, lower for any difference.
    """
    x, y, m = _in_mask(recon, ref, mask, demean)
    c1 = (k[0] * data_range_ppm) ** 2
    c2 = (k[1] * data_range_ppm) ** 2

    def smooth(a):
        return ndimage.gaussian_filter(a, sigma, mode="nearest", truncate=radius_vox / sigma)

    mu_x, mu_y = smooth(x), smooth(y)
    var_x = smooth(x * x) - mu_x**2
    var_y = smooth(y * y) - mu_y**2
    cov = smooth(x * y) - mu_x * mu_y
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map[m].mean())


def label_stats(labels, *maps):
    """Voxel count and mean of each of ``maps`` over every distinct value of ``labels``.

    Works for any label IDs (e.g. 2**31 - 1): the labels are numbered by ``np.unique``, so no array as long as
    the largest ID is made. Returns (ids, counts, means): the sorted distinct values of ``labels`` (an array),
    their voxel counts (int array) and one array of means per map (float64, in the maps' unit).
    """
    ids, inverse, counts = np.unique(np.asarray(labels).ravel(), return_inverse=True, return_counts=True)
    means = [np.bincount(inverse, weights=np.asarray(v, np.float64).ravel(), minlength=ids.size) / counts
             for v in maps]
    return ids, counts, means


def label_means(chi, labels, label_ids):
    """Mean of ``chi`` over each label: {label_id: mean}.

    A label with no voxel gets NaN, so that a table of several maps keeps
    its rows.
    """
    ids, _, (means,) = label_stats(labels, chi)
    found = dict(zip(ids.tolist(), means.tolist()))
    return {label: found.get(label, float("nan")) for label in label_ids}


def deep_gm_slope(recon, ref, labels, label_ids):
    """Slope of reconstructed vs true mean susceptibility over deep grey matter.

    The per-label means of ``recon`` (x_l) and ``ref`` (y_l) over the labels
    ``label_ids`` (deep grey matter nuclei) are fitted by least squares as
    x_l ~ slope * y_l + intercept; the slope is returned (1 is ideal; < 1
    means underestimation, typical of over-regularisation). 2019 challenge
    (Milovic 2021), "DGM slope".

    Labels with no voxel are left out, with a warning naming them. Raises
    DataError if fewer than two distinct labels have voxels (a label given
    twice counts once: a line through one point twice has no slope).
    """
    ids, _, (x_means, y_means) = label_stats(labels, recon, ref)  # both maps' means in one pass over the labels
    means = {label: (x, y) for label, x, y in zip(ids.tolist(), x_means.tolist(), y_means.tolist())}
    wanted = list(dict.fromkeys(label_ids))
    present = [label for label in wanted if label in means and np.isfinite(means[label]).all()]
    if len(present) < len(wanted):
        logger.warning("deep grey matter slope: label(s) %s have no voxel and are left out",
                       ", ".join(str(label) for label in wanted if label not in present))
    if len(present) < 2:
        raise DataError(f"Deep grey matter slope needs at least two labels with voxels; found {present}.")
    slope, _ = _linear_fit(np.array([means[lab][1] for lab in present]), np.array([means[lab][0] for lab in present]))
    return slope


def _grown_box(region, grow_vox):
    """Boolean mask of the bounding box of ``region`` grown by ``grow_vox`` voxels, clipped to the array."""
    box = np.zeros(region.shape, bool)
    slices = []
    for axis in range(region.ndim):
        hits = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
        slices.append(slice(max(hits[0] - grow_vox, 0), hits[-1] + grow_vox + 1))
    box[tuple(slices)] = True
    return box


def _calcification_regions(calc_mask, margin_vox, rim_vox, shell_vox):
    calc = np.asarray(calc_mask) > 0
    if not calc.any():
        raise DataError("The calcification label is empty: check --calc-label against the label map.")
    box = _grown_box(calc, margin_vox)
    rim = _grown_box(calc, margin_vox + rim_vox) & ~box
    shell = _grown_box(calc, margin_vox + shell_vox) & ~box
    # The rim's straight-line fit needs 3 voxels to leave a residual; the shell sets the segmentation threshold.
    if not shell.any() or (rim_vox and rim.sum() < 3):
        raise DataError(
            f"The calcification label fills its image up to {margin_vox} voxels from every edge, so there is no "
            "surrounding tissue to measure streaking or segment it against: use a smaller calcification label "
            "or a larger field of view."
        )
    return calc, box, rim, shell


def _segment_calcification(recon, box, shell):
    """Voxels of the box below every value of the surrounding shell (and below 0)."""
    threshold = min(0.0, float(recon[shell].min())) if shell.any() else 0.0
    return box & (recon < threshold)


def calcification_moment_error(recon, ref, calc_mask, margin_vox=3, shell_vox=8):
    """Relative error of the susceptibility moment of a calcification.

    2019 challenge (Milovic 2021), "calcification moment". The true moment is
    M_ref = sum of ``ref`` over ``calc_mask`` (ppm x voxels). In the
    reconstruction, smearing spreads the calcification, so it is segmented
    adaptively: in the bounding box of ``calc_mask`` grown by ``margin_vox``
    voxels, the voxels below t = min(0, min of recon over the shell between
    that box and the box grown by ``shell_vox`` more voxels), i.e. more
    diamagnetic than anything around it. M_recon is the sum of ``recon`` over
    them (volume x mean). Returns |M_recon - M_ref| / |M_ref| (0 is ideal;
    a recon scaled by s gives |s - 1|).

    The challenge scanned thresholds from 0 down in 0.01 ppm steps; t here is
    the limit of that scan for a vanishing step.

    Parameters
    ----------
    recon, ref : arrays (i, j, k)
        Reconstruction and reference susceptibility, ppm.
    calc_mask : bool array (i, j, k)
        The calcification's voxels in the reference.
    margin_vox : int, default 3
        Growth of the calcification's bounding box, in voxels, that the segmentation searches.
    shell_vox : int, default 8
        Thickness in voxels of the shell around that box whose minimum sets the segmentation threshold.
    """
    recon = np.asarray(recon, np.float64)
    ref = np.asarray(ref, np.float64)
    calc, box, _, shell = _calcification_regions(calc_mask, margin_vox, 0, shell_vox)
    moment_ref = ref[calc].sum()
    if moment_ref == 0:
        raise DataError("The reference sums to 0 over the calcification label: its moment error is undefined.")
    moment_recon = recon[_segment_calcification(recon, box, shell)].sum()
    return float(abs(moment_recon - moment_ref) / abs(moment_ref))


def calcification_streak(recon, ref, calc_mask, margin_vox=3, rim_vox=4, shell_vox=8):
    """Streaking artefact level around a calcification (2019 challenge).

    Definition (after Milovic 2021): the rim R is the bounding box of
    ``calc_mask`` grown by ``margin_vox + rim_vox`` voxels minus the box grown
    by ``margin_vox``. Inside R the reconstruction is fitted by least squares
    as x ~ a y + b, so that true susceptibility structure (and a scale error)
    is regressed out; the streak level is the standard deviation (N - 1
    normalisation) of the residual x - (a y + b) in R, divided by
    |mean of recon over the segmented calcification| (the segmentation of
    ``calcification_moment_error``). The division keeps over-regularised
    maps, which shrink both streaks and the calcification, from scoring
    well. Dimensionless; 0 is ideal.

    Parameters: ``recon``, ``ref``, ``calc_mask``, ``margin_vox`` (default 3) and ``shell_vox`` (default 8) as in
    ``calcification_moment_error``; ``rim_vox`` (int, default 4), the thickness in voxels of the rim R.
    """
    recon = np.asarray(recon, np.float64)
    ref = np.asarray(ref, np.float64)
    _, box, rim, shell = _calcification_regions(calc_mask, margin_vox, rim_vox, shell_vox)
    segmented = _segment_calcification(recon, box, shell)
    if not segmented.any():
        raise DataError("No calcification found in the reconstruction: nothing is below its surroundings.")
    x, y = recon[rim], ref[rim]
    slope, intercept = _linear_fit(y, x)
    residual = x - (slope * y + intercept)
    return float(residual.std(ddof=1) / abs(recon[segmented].mean()))


def _name_words(name):
    """The words of a label name, lower case, joined by single spaces: runs of letters, split also where a capital
    follows a small letter ("Left-Thalamus-Proper" and "LeftThalamusProper" give "left thalamus proper")."""
    return " ".join(re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name)).lower()))


def deep_gm_label_ids(label_names):
    """The label ids of ``label_names`` ({id: name}) whose name has one of ``DEEP_GM_NAME_PATTERNS`` as whole
    words, in the order given."""
    pattern = re.compile(r"\b(?:" + "|".join(DEEP_GM_NAME_PATTERNS) + r")\b")
    return [label for label, name in label_names.items() if pattern.search(_name_words(name))]


def check_label_names(label_names, source="label names"):
    """Raise DataError, naming ``source`` (e.g. "label names dseg.tsv"), when two labels of ``label_names``
    ({id: name}) would be reported under one key by ``evaluate``: two ids with one name, or a name that is
    another id's number (the key of a label without a name)."""
    first_id = {}
    for label, name in label_names.items():
        name = str(name)
        if re.fullmatch(r"0|[1-9][0-9]*", name) and name != str(label):
            raise DataError(f"{source}: label {label} is named '{name}', which is how label {name} is reported "
                            f"when it has no name: give label {label} a name that is not a number.")
        if name in first_id:
            raise DataError(f"{source}: labels {first_id[name]} and {label} are both named '{name}', so one would "
                            "hide the other in the results: give each label its own name.")
        first_id[name] = label


def _deep_gm(labels, recon, ref, keys, candidates, explicit):
    """``deep_gm_slope`` and ``deep_gm_labels`` (the keys of the labels fitted) for ``evaluate``, over the voxels
    inside its mask (``labels``, ``recon``, ``ref``: 1D arrays).

    ``keys``: {id: key} of the labels with voxels in the mask; ``candidates``: the deep grey matter label ids,
    ``explicit`` when the caller named them (``deep_gm_labels``), else found by name. Fewer than two of them with
    voxels is a DataError when explicit; found by name, the slope is None instead, with a warning.
    """
    fitted = [keys[label] for label in candidates if label in keys]
    if len(fitted) >= 2:
        return {"deep_gm_slope": deep_gm_slope(recon, ref, labels, candidates), "deep_gm_labels": fitted}
    found = f"{len(fitted)} ({', '.join(fitted) or 'none'})"
    if explicit:
        raise DataError(f"--deep-gm-labels: the deep grey matter slope needs at least two of its labels with voxels "
                        f"in the mask; found {found}: give two or more of the labels the label map has inside the mask "
                        f"({few_named(map(str, keys), 8)}).")
    logger.warning("deep grey matter slope skipped: it needs at least two deep grey matter labels with voxels in the "
                   "mask, and the label names mark %s; the other metrics are reported. To fit it, give the nuclei's "
                   "labels with --deep-gm-labels ID ...", found)
    return {"deep_gm_slope": None, "deep_gm_labels": fitted}


def check_label_map(labels, source="label map"):
    """``labels`` as int64, exactly (an integer array is not taken through float64, which rounds IDs above 2**53).

    Raises DataError, naming ``source`` (default "label map"), for values that are not whole numbers (a probability
    or susceptibility map; NaN included), which rounding would silently turn into other labels, or negative ones.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):  # NaN never equals itself, so it is refused too
            raise DataError(f"{source} holds non-integer values: give an integer label map "
                            "(e.g. a *_dseg.nii.gz), not a susceptibility or probability map.")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source} holds negative labels (e.g. {labels.min():g}): labels are 0 "
                        "(background) or positive integers, as in a *_dseg.nii.gz.")
    return labels.astype(np.int64, copy=False)  # an int64 map (as qsmprep-eval passes it) is not copied again


def evaluate(recon, ref, mask, labels=None, label_names=None, calc_label=None, deep_gm_labels=None):
    """All metrics that apply to the inputs, as a dict.

    Always: ``nrmse_pct`` (demeaned), ``nrmse_detrended_pct``, ``hfen_pct``,
    ``xsim``. With ``labels`` (integer label map on the same grid; any
    non-negative IDs, read exactly from an integer array; ``check_label_map``):
    ``label_means_ppm`` = {key: {"recon": mean, "ref": mean, "voxels": n}}
    over each label's voxels inside ``mask`` (raw values, not demeaned), the
    key being the label's name in ``label_names`` ({id: name}) or else its
    number (``check_label_names`` refuses names that would share a key).
    With ``deep_gm_labels`` or ``label_names``: ``deep_gm_slope`` over
    ``deep_gm_labels`` if given, else over the labels whose name marks a deep
    grey matter nucleus (``deep_gm_label_ids``), and ``deep_gm_labels``, the
    keys of the labels fitted. Fewer than two of them with voxels in the mask
    is a DataError when ``deep_gm_labels`` was given; found by name, the slope
    is None instead, with a warning. With ``calc_label``:
    ``calcification_moment_error`` and ``calcification_streak`` on the maps
    demeaned in the mask. The calcification label is excluded from the
    deep grey matter slope.
    """
    m = _mask_bool(mask)
    result = {
        "nrmse_pct": nrmse(recon, ref, m),
        "nrmse_detrended_pct": nrmse_detrended(recon, ref, m),
        "hfen_pct": hfen(recon, ref, m),
        "xsim": xsim(recon, ref, m),
    }
    if labels is None:
        if calc_label is not None or deep_gm_labels is not None:
            raise DataError("A calcification or deep grey matter label needs a label map (--labels).")
        return result
    labels = check_label_map(labels)
    names = dict(label_names or {})
    check_label_names(names)
    inside = labels[m], np.asarray(recon)[m], np.asarray(ref)[m]  # the voxels every label statistic is over
    ids, counts, (recon_means, ref_means) = label_stats(*inside)
    present = ids != 0
    label_ids = ids[present].tolist()
    keys = {label: str(names.get(label, label)) for label in label_ids}
    result["label_means_ppm"] = {
        keys[label]: {"recon": float(x), "ref": float(y), "voxels": int(n)}
        for label, x, y, n in zip(label_ids, recon_means[present], ref_means[present], counts[present])
    }
    if deep_gm_labels is not None or names:
        candidates = list(deep_gm_labels) if deep_gm_labels is not None else deep_gm_label_ids(names)
        candidates = [label for label in dict.fromkeys(candidates) if label != calc_label]
        result.update(_deep_gm(*inside, keys, candidates, deep_gm_labels is not None))
    if calc_label is not None:
        x, y, _ = _in_mask(recon, ref, m)
        calc = labels == calc_label
        result["calcification_moment_error"] = calcification_moment_error(x, y, calc)
        result["calcification_streak"] = calcification_streak(x, y, calc)
    return result
