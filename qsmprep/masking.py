"""Brain masks from GRE magnitude (and an optional phase quality map).

Structuring elements are built in millimetres, so erosion by ``erode_mm``
removes the same physical thickness along every axis of anisotropic voxels.
See docs/methods/masking.md.
"""

import logging

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from .errors import DataError
from .physics import checked_voxel_size_mm

log = logging.getLogger(__name__)

VOXEL_SIZE_RTOL = 1e-6
"""Relative tolerance when a distance in mm is compared with whole voxels. Voxel sizes read from the float32 affine
of an oblique grid are off by about 1e-7 (3.00000011 mm for 3 mm), which must not decide whether the voxel next
door is within a 3 mm radius: with a tolerance of 1e-9 it did, and the same oblique data stored with their
orientation in the qform (exact sizes) or the sform (rounded) gave 4 % different brain masks."""


def ball_mm(radius_mm, voxel_size_mm=(1.0, 1.0, 1.0)):
    """Boolean ball of radius ``radius_mm`` (mm) on a grid of ``voxel_size_mm``.

    A voxel offset (a, b, c) belongs to the ball when
    (a dx)^2 + (b dy)^2 + (c dz)^2 <= radius_mm^2 (within ``VOXEL_SIZE_RTOL``), so on anisotropic voxels the
    element is an ellipsoid in index space and a sphere in mm. The centre voxel
    is always included; an axis whose voxel is larger than the radius gets
    extent 1 along it.

    Parameters
    ----------
    radius_mm : float
        Radius in mm; must be >= 0.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm along i, j, k.

    Returns
    -------
    bool array of odd shape (2 ri + 1, 2 rj + 1, 2 rk + 1), ri = floor(r / di).
    """
    if radius_mm < 0:
        raise ValueError(f"radius must be >= 0 mm, got {radius_mm!r}")
    vox = checked_voxel_size_mm(voxel_size_mm)
    half = np.floor(radius_mm / vox * (1 + VOXEL_SIZE_RTOL)).astype(int)
    axes = [np.arange(-h, h + 1) * d for h, d in zip(half, vox)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x**2 + y**2 + z**2 <= radius_mm**2 * (1 + VOXEL_SIZE_RTOL) ** 2


DISTANCE_TRANSFORM_MIN_BALL_VOXELS = 1000
"""Balls of at least this many voxels are applied by the Euclidean distance transform (``dilation_mm``,
``erosion_mm``), smaller ones by scipy's binary morphology; both give the same voxels. scipy's time and memory grow
with the ball, the transform's do not: on a 0.7 mm head (240 x 292 x 240) a 3 mm ball (about 330 voxels) erodes in
1.3 s by ``binary_erosion`` and 3.0 s by the transform, a 6 mm ball (about 2,600) dilates in 26 s and 3.4 s, and an
erosion by 100 mm ran out of memory (docs/methods/masking.md)."""


def dilation_mm(mask, radius_mm, voxel_size_mm=(1.0, 1.0, 1.0)):
    """Binary dilation of ``mask`` by ``ball_mm(radius_mm, voxel_size_mm)``: every voxel within ``radius_mm`` of a
    mask voxel (``ball_mm``'s tolerance); by the distance transform for large balls
    (``DISTANCE_TRANSFORM_MIN_BALL_VOXELS``).

    Parameters
    ----------
    mask : bool array (i, j, k)
    radius_mm : float
        Ball radius in mm.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
    """
    mask = np.asarray(mask, dtype=bool)
    ball = ball_mm(radius_mm, voxel_size_mm)
    if ball.sum() < DISTANCE_TRANSFORM_MIN_BALL_VOXELS:
        return ndimage.binary_dilation(mask, ball)
    return ndimage.distance_transform_edt(~mask, sampling=voxel_size_mm) <= radius_mm * (1 + VOXEL_SIZE_RTOL)


def erosion_mm(mask, radius_mm, voxel_size_mm=(1.0, 1.0, 1.0)):
    """Binary erosion of ``mask`` by ``ball_mm(radius_mm, voxel_size_mm)``, outside the grid counting as background
    (as ``scipy.ndimage.binary_erosion``): the voxels farther than ``radius_mm`` from any voxel outside the mask; by
    the distance transform for large balls (``DISTANCE_TRANSFORM_MIN_BALL_VOXELS``). Parameters as ``dilation_mm``.
    """
    mask = np.asarray(mask, dtype=bool)
    ball = ball_mm(radius_mm, voxel_size_mm)
    if ball.sum() < DISTANCE_TRANSFORM_MIN_BALL_VOXELS:
        return ndimage.binary_erosion(mask, ball)
    # one background voxel around the grid: the nearest voxel outside it is always on that ring
    distance_mm = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=voxel_size_mm)[1:-1, 1:-1, 1:-1]
    return distance_mm > radius_mm * (1 + VOXEL_SIZE_RTOL)


def largest_component(mask):
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def _fill_holes(mask, slice_axis):
    """Fill enclosed holes in 3D, then in every 2D slice across ``slice_axis``."""
    filled = ndimage.binary_fill_holes(mask)
    moved = np.moveaxis(filled, slice_axis, 0)
    for index in range(moved.shape[0]):
        moved[index] = ndimage.binary_fill_holes(moved[index])
    return filled


SEPARATION_MARGIN_MM = 2.0
"""How far (mm) the separated core is dilated beyond ``radius_mm``: restores thin gyri that an
opening by the same ball would round off (Dice against the 2016 challenge mask 0.983 -> 0.997),
while staying short of the scalp across the skull (at least 4-5 mm of bone and dura)."""


def separate_largest(mask, radius_mm, voxel_size_mm=(1.0, 1.0, 1.0)):
    """The largest object of ``mask`` after cutting bridges thinner than 2 ``radius_mm``.

    Erosion by a ball of ``radius_mm`` breaks thin connections (scalp to brain
    through noise, vessels, the optic nerves) and removes thin shells such as
    the scalp; the largest 26-connected remaining core is dilated back by a
    ball of ``radius_mm + SEPARATION_MARGIN_MM`` and intersected with
    ``mask``, which restores its own boundary but nothing across a gap wider
    than the margin. Morphological reconstruction in the spirit of
    Soille P, Morphological Image Analysis, Springer 2003, ch. 6.

    Parameters
    ----------
    mask : bool array (i, j, k)
    radius_mm : float
        Ball radius in mm; 0 returns the largest component of ``mask``.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)

    Returns
    -------
    bool array (i, j, k), a subset of ``mask``.
    """
    if radius_mm <= 0:
        return largest_component(mask)
    core = largest_component(erosion_mm(mask, radius_mm, voxel_size_mm))
    if not core.any():  # everything thinner than the ball: keep the plain largest component
        return largest_component(mask)
    return dilation_mm(core, radius_mm + SEPARATION_MARGIN_MM, voxel_size_mm) & mask


def brain_mask(magnitude, voxel_size_mm=(1.0, 1.0, 1.0), quality=None, threshold=None, erode_mm=3.0,
               fill_holes=True, smooth_mm=2.0, separate_mm=4.0, exclude=None):
    """Brain mask from GRE magnitude by Otsu thresholding and morphology in mm.

    Steps: (1) magnitude image: the volume itself, or the root-sum-of-squares
    over echoes when 4D; (2) threshold: voxels above ``threshold``, by default
    Otsu's threshold of the magnitude; with a ``quality`` map, also above the
    Otsu threshold of the quality; (3) the brain is separated from the scalp
    (``separate_largest`` with ``separate_mm``): before any hole filling, which
    would otherwise fill the dark skull between scalp and brain; (4) hole
    filling in 3D and slice by slice across the axis with the largest voxel
    size (the slice axis; the last such, the third array axis for isotropic
    voxels: the pipeline passes arrays in RAS+ order, so that this is the
    superior axis however the data are stored); (5) erosion by a ball of ``erode_mm``; (6) opening
    by a ball of ``smooth_mm`` (cuts remaining thin bridges), largest
    component again; (7) closing by the same ball, restricted to the eroded
    mask; (8) voxels in ``exclude`` are removed, then the largest component
    is kept and holes are filled again: excluded voxels inside the brain come
    back, the surface retreats where it is excluded.

    Reference: Otsu N. A threshold selection method from gray-level
    histograms. IEEE Trans Syst Man Cybern 1979;9:62-66.

    Parameters
    ----------
    magnitude : array (i, j, k) or (i, j, k, E)
        Magnitude image(s); NaN is treated as 0.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm; all structuring elements are balls in mm.
    quality : array (i, j, k) or None, default None
        Phase quality map in [0, 1] (``qsmprep.phase.phase_quality_map``).
    threshold : float or None, default None
        Magnitude threshold in the units of ``magnitude`` (of the RSS when 4D);
        None uses Otsu's threshold.
    erode_mm : float, default 3.0
        Erosion radius in mm (0 disables). Removes the rim of unreliable
        phase at the brain surface (QSMxT issue #169): partial volume with
        skull and CSF and steep field gradients there cause 2 pi unwrapping
        errors that background removal cannot undo. 3 mm removes one voxel
        at 3 mm and three at 1 mm; on the simulated 3 mm head the former
        1 mm (no erosion at that voxel size) left 2 pi errors in 0.5 % of
        the mask and TKD NRMSE 201 %, 3 mm gives 69 % (docs/methods/masking.md).
    fill_holes : bool, default True
        Fill enclosed holes (ventricles, dark iron-rich nuclei, vessels).
    smooth_mm : float, default 2.0
        Radius in mm of the opening and closing balls (0 disables).
    separate_mm : float, default 4.0
        Radius in mm of the ball that separates brain from scalp in step 3:
        tissue thinner than 8 mm (the adult scalp is 5-7 mm at the vertex)
        and bridges of that width are cut; 0 keeps the plain largest
        component.
    exclude : bool array (i, j, k) or None, default None
        Voxels to keep out of the surface, e.g. where the phase is too steep
        to unwrap (``qsmprep.phase.steep_phase_voxels``) next to sinuses.

    Returns
    -------
    bool array (i, j, k).

    Raises
    ------
    DataError when the mask comes out empty (a ``threshold`` above the brain's magnitude, or no signal), naming
    the fix.
    """
    mag = np.nan_to_num(np.asarray(magnitude, dtype=np.float64))
    if mag.ndim == 4:
        mag = np.sqrt((mag**2).sum(-1))
    if mag.ndim != 3:
        raise ValueError(f"magnitude must be 3D or 4D, got shape {mag.shape}")
    vox = tuple(float(v) for v in voxel_size_mm)
    cut = threshold_otsu(mag) if threshold is None else float(threshold)
    mask = mag > cut
    log.debug("brain mask: magnitude threshold %.4g (%s)", cut, "Otsu" if threshold is None else "given")
    if quality is not None:
        quality = np.nan_to_num(np.asarray(quality, dtype=np.float64))
        if quality.shape != mag.shape:
            raise ValueError(f"quality shape {quality.shape} differs from magnitude shape {mag.shape}")
        mask &= quality > threshold_otsu(quality)
    slice_axis = 2 - int(np.argmax(vox[::-1]))  # the last axis with the largest voxel size
    kept = [("the threshold", mask.mean())]  # what each step kept: an empty mask is refused naming them
    mask = separate_largest(mask, separate_mm, vox)
    if fill_holes:
        mask = _fill_holes(mask, slice_axis)
    kept.append((f"the scalp separation (separate_mm {separate_mm:g})", mask.mean()))
    if erode_mm > 0:
        mask = erosion_mm(mask, erode_mm, vox)
    kept.append((f"the erosion (erode_mm {erode_mm:g})", mask.mean()))
    eroded = mask
    if smooth_mm > 0:
        mask = largest_component(dilation_mm(erosion_mm(mask, smooth_mm, vox), smooth_mm, vox))  # opening
        padding = [(h, h) for h in np.asarray(ball_mm(smooth_mm, vox).shape) // 2]  # closing, the grid's faces kept
        closed = erosion_mm(dilation_mm(np.pad(mask, padding), smooth_mm, vox), smooth_mm, vox)
        mask = closed[tuple(slice(h, h + n) for (h, _), n in zip(padding, mask.shape))] & eroded
    kept.append((f"the opening (smooth_mm {smooth_mm:g})", mask.mean()))
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != mag.shape:
            raise ValueError(f"exclude shape {exclude.shape} differs from magnitude shape {mag.shape}")
        mask = largest_component(mask & ~exclude)
    kept.append(("leaving out phase too steep to unwrap", mask.mean()))
    if fill_holes:
        mask = _fill_holes(mask, slice_axis)
    if not mask.any():  # nothing to process: every later step would fail on it, less clearly
        raise DataError(f"the brain mask is empty: {_empty_mask_reason(kept, threshold)}.")
    return mask


def _empty_mask_reason(kept, threshold):
    """Why ``brain_mask`` came out empty and what to change, from the fraction of the field of view each step
    ``kept`` (label, fraction), in order."""
    if kept[0][1] == 0:
        return (f"the threshold {threshold:g} (--parameters [mask.quality], or [mask.magnitude] with --mask magnitude) "
                "is above the brain's magnitude: lower it or leave it to Otsu's method" if threshold is not None else
                "no voxel is above the Otsu thresholds of the magnitude and phase quality: check the magnitude images, "
                "or give a brain mask with --mask")
    last = next(i for i, (_, fraction) in enumerate(kept) if fraction == 0)
    steps = [f"{label} {f'{100 * fraction:.2g} %' if fraction else 'none'}" for label, fraction in kept[1:last + 1]]
    return (f"of the field of view, the threshold kept {100 * kept[0][1]:.2g} %, {', '.join(steps)}: each step "
            "removes tissue thinner than twice its radius, and a field of view inside the head (a slab or a crop) has "
            "no scalp to separate; set separate_mm = 0 and lower erode_mm and smooth_mm in --parameters [mask.quality] "
            "([mask.magnitude] with --mask magnitude), or give a brain mask with --mask")


def check_mask(mask, shape=None, source="mask", region="a mask that covers the brain"):
    """Validate a user-supplied mask array and return it as bool (mask > 0).

    Parameters
    ----------
    mask : array
        The mask as read from file; 3D, or 4D with a single volume.
    shape : tuple of int or None, default None
        The (i, j, k) shape of the images it must match; None skips the check.
    source : str, default "mask"
        What it came from (e.g. "mask sub-01_mask.nii.gz"), named in errors.
    region : str, default "a mask that covers the brain"
        What it should cover, for the message when it is empty.

    Raises
    ------
    DataError if its shape differs, it holds values that are not whole numbers (a probability, field or
    susceptibility map; NaN included) or no voxel > 0. Whole numbers other than 0 and 1 (labels) are accepted,
    as mask > 0.
    """
    arr = np.asarray(mask)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if shape is not None and arr.shape != tuple(shape[:3]):
        raise DataError(f"{source} has shape {arr.shape} but the images have {tuple(shape[:3])}: "
                        "resample the mask onto the image grid.")
    not_whole = arr[arr != np.round(arr)]  # NaN never equals itself
    if not_whole.size:
        raise DataError(f"{source} has {not_whole.size} voxels that are not whole numbers (e.g. {not_whole[0]:g}): "
                        "give a binary mask (threshold a probability map first); is it perhaps a field or "
                        "susceptibility map?")
    inside = arr > 0
    if not inside.any():
        raise DataError(f"{source} is empty (no voxel > 0): give {region}.")
    return inside
