"""Procedural numerical head phantom: susceptibility, labels, proton density, R2*.

The head is built from ellipsoids, cylinders and smooth random fields whose
geometry lives in world millimetres (RAS+: x left->right, y posterior->
anterior, z inferior->superior, origin at the grid centre), so the same seed
gives the same head at any matrix size, field of view or voxel size.

Susceptibility values (ppm, relative to CSF = 0; ``CHI_PPM``) are rounded
literature means:

- deep grey matter and white/grey matter: Deistung A, Schaefer A, Schweser F,
  et al. Toward in vivo histology: a comparison of quantitative
  susceptibility mapping (QSM) with magnitude-, phase-, and R2*-imaging at
  ultra-high magnetic field strength. NeuroImage 2013;65:299-314; Lim IAL,
  Faria AV, Li X, et al. Human brain atlas for automated region of interest
  selection in quantitative susceptibility mapping: application to
  determine iron content in deep gray matter structures. NeuroImage
  2013;82:449-69.
- venous blood (Hct 0.4, oxygenation 0.65): Haacke EM, Liu S, Buch S, et al.
  Quantitative susceptibility mapping: current status and future
  directions. Magn Reson Imaging 2015;33:1-25.
- calcification and haemorrhage: Chen W, Zhu W, Kovanlikaya I, et al.
  Intracranial calcifications and hemorrhages: characterization with
  quantitative susceptibility mapping. Radiology 2014;270:496-505.
- bone: Hopkins JA, Wehrli FW. Magnetic susceptibility measurement of
  insoluble solids by NMR: magnetic susceptibility of bone. Magn Reson Med
  1997;37:494-500.
- air (chi_air - chi_water = 0.36 - (-9.05) ppm, SI) and soft tissue
  (~ water): Schenck JF. The role of magnetic susceptibility in magnetic
  resonance imaging. Med Phys 1996;23:815-50.

Proton density (relative) and R2* (Hz, at 3 T) are typical in vivo values
(R2*: Deistung 2013 above; Yao B, Li TQ, van Gelderen P, et al.
Susceptibility contrast in high field MRI of human brain as a function of
tissue iron content. NeuroImage 2009;44:1259-66).
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LABELS = {
    "background": 0,
    "csf": 1,
    "cortical_gm": 2,
    "white_matter": 3,
    "caudate": 4,
    "putamen": 5,
    "globus_pallidus": 6,
    "thalamus": 7,
    "red_nucleus": 8,
    "substantia_nigra": 9,
    "vein": 10,
    "calcification": 11,
    "haemorrhage": 12,
    "scalp": 13,
    "skull": 14,
    "sinus": 15,
}
"""Label name -> integer value of the label map. ``scalp`` stands for all
extracranial soft tissue (scalp, face, neck); ``sinus`` for air inside the
head (paranasal sinuses, mastoid air cells); ``background`` is the air
around the head."""

DEEP_GREY_LABELS = frozenset(
    LABELS[n] for n in ("caudate", "putamen", "globus_pallidus", "thalamus", "red_nucleus", "substantia_nigra")
)
"""Deep grey-matter nuclei (both hemispheres share a label)."""

BRAIN_LABELS = frozenset(
    {LABELS[n] for n in ("csf", "cortical_gm", "white_matter", "vein", "calcification", "haemorrhage")}
    | DEEP_GREY_LABELS
)
"""Everything inside the inner skull surface: the ground-truth brain mask."""

CHI_PPM = {
    "background": 9.4,
    "csf": 0.0,
    "cortical_gm": 0.02,
    "white_matter": -0.03,
    "caudate": 0.07,
    "putamen": 0.09,
    "globus_pallidus": 0.19,
    "thalamus": 0.03,
    "red_nucleus": 0.13,
    "substantia_nigra": 0.16,
    "vein": 0.45,
    "calcification": -1.5,
    "haemorrhage": 0.9,
    "scalp": 0.0,
    "skull": -2.0,
    "sinus": 9.4,
}
"""Mean susceptibility (ppm) of each label relative to CSF/water; see the
module docstring for references. Air (background, sinus) is +9.4 ppm."""

_PROTON_DENSITY = {
    "background": 0.0, "csf": 1.0, "cortical_gm": 0.85, "white_matter": 0.70, "caudate": 0.82,
    "putamen": 0.80, "globus_pallidus": 0.75, "thalamus": 0.78, "red_nucleus": 0.75,
    "substantia_nigra": 0.75, "vein": 0.80, "calcification": 0.15, "haemorrhage": 0.75,
    "scalp": 0.75, "skull": 0.05, "sinus": 0.0,
}  # fmt: skip

_R2STAR_HZ_3T = {
    "background": 0.0, "csf": 3.0, "cortical_gm": 16.0, "white_matter": 21.0, "caudate": 23.0,
    "putamen": 28.0, "globus_pallidus": 45.0, "thalamus": 20.0, "red_nucleus": 35.0,
    "substantia_nigra": 40.0, "vein": 40.0, "calcification": 120.0, "haemorrhage": 80.0,
    "scalp": 30.0, "skull": 300.0, "sinus": 0.0,
}  # fmt: skip

_CHI_TEXTURE_PPM = {
    "cortical_gm": 0.01, "white_matter": 0.008, "caudate": 0.015, "putamen": 0.02,
    "globus_pallidus": 0.03, "thalamus": 0.01, "red_nucleus": 0.02, "substantia_nigra": 0.025,
    "vein": 0.03, "haemorrhage": 0.1, "scalp": 0.02,
}  # fmt: skip
"""Scale (ppm) of the smooth within-tissue chi texture: its standard deviation at the random field's lattice nodes;
about 0.88 of it over the voxels of a 1 mm grid (``lowpass_random_field``)."""

# Geometry in mm relative to the brain centre, before the per-subject scale.
_BRAIN_CENTRE_MM = (0.0, -2.0, 5.0)
_BRAIN_SEMI_AXES_MM = (60.0, 78.0, 56.0)
_FACE = ((0.0, 22.0, -75.0), (62.0, 72.0, 50.0))
_SCALP_MM, _SKULL_OUTER_MM, _SKULL_INNER_MM = 15.0, 10.0, 3.0  # outward distances from the brain ellipsoid
_CALLOSAL_CORE = ((-5.0, -8.0), (45.0, 26.0))  # (y, z) centre and semi-axes of the midline block the fissure stops at
_GM_THICKNESS_MM, _GYRAL_AMPLITUDE_MM = 4.0, 3.0
_SINUSES = [  # (centre, semi-axes): frontal, sphenoid, maxillary and mastoid air
    ((0.0, 82.0, -20.0), (14.0, 5.0, 9.0)),
    ((0.0, 18.0, -65.0), (11.0, 10.0, 8.0)),
    ((30.0, 50.0, -85.0), (12.0, 16.0, 16.0)),
    ((-30.0, 50.0, -85.0), (12.0, 16.0, 16.0)),
    ((52.0, -28.0, -50.0), (8.0, 8.0, 8.0)),
    ((-52.0, -28.0, -50.0), (8.0, 8.0, 8.0)),
]
_NUCLEI = [  # (label, centre of the right one (x > 0), semi-axes, rotation about z in degrees); mirrored in x
    ("thalamus", (10.0, -16.0, 2.0), (7.5, 13.0, 8.0), 0.0),
    ("caudate", (12.0, 14.0, 6.0), (4.5, 11.0, 7.0), 0.0),
    ("putamen", (24.0, 4.0, -4.0), (5.0, 15.0, 9.0), 0.0),
    ("globus_pallidus", (18.0, 0.0, -5.0), (3.5, 8.0, 5.5), 0.0),
    ("red_nucleus", (4.5, -20.0, -14.0), (3.0, 3.5, 3.5), 0.0),
    ("substantia_nigra", (10.0, -17.0, -19.0), (2.5, 8.0, 3.0), -25.0),
    ("csf", (7.0, 2.0, 14.0), (4.0, 24.0, 6.0), -8.0),  # lateral ventricles
]
_THIRD_VENTRICLE = ((0.0, -10.0, -2.0), (1.5, 10.0, 7.0))
_VEINS = [  # (start, end, radius) in mm
    ((2.0, 8.0, 10.0), (2.0, -28.0, 8.0), 1.2),  # internal cerebral veins
    ((-2.0, 8.0, 10.0), (-2.0, -28.0, 8.0), 1.2),
    ((0.0, -28.0, 8.0), (0.0, -60.0, 24.0), 2.0),  # straight sinus
    ((30.0, 20.0, 25.0), (38.0, -10.0, 30.0), 1.0),  # medullary / cortical veins
    ((-32.0, 10.0, 20.0), (-40.0, -25.0, 15.0), 1.0),
    ((20.0, -40.0, 25.0), (30.0, -55.0, 10.0), 1.0),
]
_SAGITTAL_SINUS_RADIUS_MM = 3.0
_HAEMORRHAGE = ((28.0, 38.0, 16.0), (6.0, 7.0, 5.0))
_CALCIFICATION = ((-26.0, -32.0, 12.0), (2.5, 2.5, 2.5))
_SUBJECT_SCALE_RANGE = 0.04  # head size varies by +-4 % between seeds
_LATTICE_HALF_WIDTH_MM = 160.0


@dataclass
class HeadPhantom:
    """A numerical head on a grid (all float32 except ``labels``/``brain_mask``).

    chi_ppm: susceptibility in ppm relative to CSF, air = +9.4 (whole head).
    labels: uint8 label map (``LABELS``). brain_mask: bool, labels in
    ``BRAIN_LABELS``. proton_density: relative (CSF = 1). r2star_hz: R2* in
    Hz at 3 T. voxel_size_mm: 3-tuple. affine: voxel -> world (mm, RAS+),
    axis-aligned, origin at the grid centre; B0 is along world z.
    """

    chi_ppm: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    proton_density: np.ndarray
    r2star_hz: np.ndarray
    voxel_size_mm: tuple
    affine: np.ndarray


def centred_affine(shape, voxel_size_mm):
    """Axis-aligned voxel -> world affine (mm) with the world origin at the grid centre."""
    affine = np.diag([*map(float, voxel_size_mm), 1.0])
    affine[:3, 3] = -(np.asarray(shape[:3]) - 1) / 2 * np.asarray(voxel_size_mm, dtype=float)
    return affine


def lowpass_random_field(shape, affine, correlation_mm, seed):
    """Smooth Gaussian random field, anchored in world coordinates, of unit variance at its lattice nodes.

    White Gaussian noise on a lattice with spacing ``correlation_mm / 2``
    fixed in world space (spanning +-160 mm), smoothed by a Gaussian of one
    lattice spacing, normalised to unit standard deviation and interpolated
    (trilinear) at the voxel centres of the grid. The same ``seed`` gives the
    same field on any grid (resolution, field of view, orientation). Between
    the nodes the interpolation lowers the standard deviation: on 1 mm grids
    it is about 0.88 (0.87-0.89 for ``correlation_mm`` 4-8, tests/test_phantom.py).

    Parameters
    ----------
    shape : tuple of 3 int
        Output grid shape.
    affine : (4, 4) array
        Voxel -> world (mm) affine of the output grid.
    correlation_mm : float
        Spatial scale of the field in mm (about twice its Gaussian width).
    seed : int or sequence of int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    float32 array of ``shape``.
    """
    spacing = correlation_mm / 2.0
    n = int(np.ceil(2 * _LATTICE_HALF_WIDTH_MM / spacing)) + 1
    lattice = np.random.default_rng(seed).standard_normal((n, n, n), dtype=np.float32)
    lattice = ndimage.gaussian_filter(lattice, 1.0, mode="wrap")
    lattice /= lattice.std()
    a = np.asarray(affine, dtype=np.float64)
    return ndimage.affine_transform(
        lattice,
        a[:3, :3] / spacing,
        offset=(a[:3, 3] + _LATTICE_HALF_WIDTH_MM) / spacing,
        output_shape=tuple(shape[:3]),
        order=1,
        mode="nearest",
    )


class _Grid:
    """World coordinates (mm, divided by the subject scale) of an axis-aligned grid, as 1-D axes."""

    def __init__(self, shape, voxel_size_mm, scale):
        affine = centred_affine(shape, voxel_size_mm)
        self.axes = [(np.arange(n) * affine[a, a] + affine[a, 3]) / scale for a, n in enumerate(shape)]
        self.shape = tuple(shape)

    def box(self, centre, half_extent):
        """Slices of the grid covering centre +- half_extent (mm), and the local 1-D coordinates."""
        slices, coords = [], []
        for axis, c, h in zip(self.axes, centre, half_extent):
            lo, hi = np.searchsorted(axis, [c - h, c + h])
            slices.append(slice(lo, hi))
            coords.append(axis[lo:hi])
        return tuple(slices), np.ix_(*coords)

    def ellipsoid_distance_mm(self, centre, semi_axes, rotation_z_deg=0.0, full=False):
        """Approximate signed distance (mm, negative inside) to an ellipsoid, in its bounding box.

        First-order estimate F / |grad F| of F = sum((x_i / a_i)^2) - 1:
        exact on the surface, monotone inside. Returns (slices, distance).
        """
        reach = max(semi_axes)
        if full:
            slices = (slice(None),) * 3
            x, y, z = np.ix_(*self.axes)
        else:
            slices, (x, y, z) = self.box(centre, (reach, reach, reach))
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        if rotation_z_deg:
            t = np.radians(rotation_z_deg)
            dx, dy = np.cos(t) * dx + np.sin(t) * dy, -np.sin(t) * dx + np.cos(t) * dy
        a, b, c = semi_axes
        f = (dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2 - 1.0
        grad = 2.0 * np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2 + (dz / c**2) ** 2)
        return slices, (f / np.maximum(grad, 1e-6)).astype(np.float32)

    def segment_distance_mm(self, start, end, radius_mm):
        """Distance (mm) to the segment start-end, in its bounding box. Returns (slices, distance)."""
        p0, p1 = np.asarray(start, float), np.asarray(end, float)
        centre, half = (p0 + p1) / 2, np.abs(p1 - p0) / 2 + radius_mm + 1.0
        slices, (x, y, z) = self.box(centre, half)
        d = p1 - p0
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / d.dot(d), 0.0, 1.0)
        dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        return slices, np.sqrt(dist2)


def _shift(point, origin):
    return tuple(p + o for p, o in zip(point, origin))


def _paint(labels, slices, inside, label, only=None):
    """Set ``labels[slices]`` to ``label`` where ``inside`` (and where the old label is in ``only``)."""
    region = labels[slices]
    if only is not None:
        inside = inside & np.isin(region, list(only))
    region[inside] = label


def _label_table(values):
    table = np.zeros(max(LABELS.values()) + 1, dtype=np.float32)
    for name, value in values.items():
        table[LABELS[name]] = value
    return table


def head_phantom(shape=(160, 192, 160), voxel_size_mm=(1.0, 1.0, 1.0), seed=0):
    """Procedural numerical head phantom on an axis-aligned grid.

    Brain (an ellipsoid with a smoothly perturbed surface) with a cortical
    grey-matter ribbon of varying thickness around white matter, sulci
    (zero sheets of a random field) and an interhemispheric fissure filled
    with CSF, lateral and third ventricles, bilateral deep grey nuclei
    (caudate, putamen, globus pallidus, thalamus, red nucleus, substantia
    nigra), veins (internal cerebral veins, straight and superior sagittal
    sinuses, medullary veins as cylinders), a calcification and a
    haemorrhage-like lesion; CSF up to the inner skull surface, skull, scalp
    and a face/neck block holding air sinuses. Within-tissue texture is a
    low-pass random field (``lowpass_random_field``); chi texture and R2*
    texture share it (both follow iron). The whole head scales by
    1 +- 4 % with the seed, so subjects differ in size and texture.

    Parameters
    ----------
    shape : tuple of 3 int, default (160, 192, 160)
        Matrix size (i = x L->R, j = y P->A, k = z I->S).
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm. The brain spans about 130 x 168 x 122 mm and the
        head with its face and neck about 160 x 196 x 205 mm (seed 0), so
        the default field of view holds the brain and cuts the neck and the
        lower face, as a brain acquisition does.
    seed : int, default 0
        Seed of all random parts; the same seed gives identical arrays.

    Returns
    -------
    HeadPhantom
    """
    shape = tuple(int(n) for n in shape)
    voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
    affine = centred_affine(shape, voxel_size_mm)
    seeds = np.random.SeedSequence(seed).spawn(6)
    scale = 1.0 + _SUBJECT_SCALE_RANGE * np.random.default_rng(seeds[0]).uniform(-1.0, 1.0)
    # Random fields are evaluated in the subject's own (scaled) frame.
    scaled_affine = affine.copy()
    scaled_affine[:3] /= scale
    grid = _Grid(shape, voxel_size_mm, scale)
    origin = _BRAIN_CENTRE_MM
    labels = np.zeros(shape, dtype=np.uint8)

    # Head: a shell around the brain ellipsoid plus a face/neck block.
    _, d_brain = grid.ellipsoid_distance_mm(origin, _BRAIN_SEMI_AXES_MM, full=True)
    face_slices, d_face = grid.ellipsoid_distance_mm(_shift(_FACE[0], origin), _FACE[1])
    labels[d_brain < _SCALP_MM] = LABELS["scalp"]
    _paint(labels, face_slices, d_face < 0, LABELS["scalp"])
    labels[d_brain < _SKULL_OUTER_MM] = LABELS["skull"]
    for centre, semi in _SINUSES:
        slices, d = grid.ellipsoid_distance_mm(_shift(centre, origin), semi)
        _paint(labels, slices, d < 0, LABELS["sinus"], only=(LABELS["scalp"], LABELS["skull"]))
    labels[d_brain < _SKULL_INNER_MM] = LABELS["csf"]

    # Cortex: perturbed brain surface, grey ribbon of varying depth, sulci, fissure.
    surface = d_brain + 1.5 * lowpass_random_field(shape, scaled_affine, 25.0, seeds[1])
    del d_brain
    depth = _GM_THICKNESS_MM + _GYRAL_AMPLITUDE_MM * lowpass_random_field(shape, scaled_affine, 8.0, seeds[2])
    labels[surface < 0] = LABELS["cortical_gm"]
    labels[surface < -np.maximum(depth, 1.0)] = LABELS["white_matter"]
    del depth
    sulci = np.abs(lowpass_random_field(shape, scaled_affine, 10.0, seeds[3])) < 0.12
    labels[sulci & (labels == LABELS["cortical_gm"])] = LABELS["csf"]
    del sulci, surface
    x, y, z = np.ix_(*grid.axes)
    core = ((y - origin[1] - _CALLOSAL_CORE[0][0]) / _CALLOSAL_CORE[1][0]) ** 2 + (
        (z - origin[2] - _CALLOSAL_CORE[0][1]) / _CALLOSAL_CORE[1][1]
    ) ** 2 < 1.0
    fissure = (np.abs(x - origin[0]) < 1.5) & ~core
    labels[fissure & np.isin(labels, [LABELS["cortical_gm"], LABELS["white_matter"]])] = LABELS["csf"]
    del fissure

    # Deep grey nuclei (both hemispheres), then ventricles.
    for name, centre, semi, rot in _NUCLEI:
        for side in (1.0, -1.0):
            c = _shift((side * centre[0], centre[1], centre[2]), origin)
            slices, d = grid.ellipsoid_distance_mm(c, semi, rotation_z_deg=side * rot)
            _paint(labels, slices, d < 0, LABELS[name])
    slices, d = grid.ellipsoid_distance_mm(_shift(_THIRD_VENTRICLE[0], origin), _THIRD_VENTRICLE[1])
    _paint(labels, slices, d < 0, LABELS["csf"])

    # Veins: straight segments, and the superior sagittal sinus along the midline just above the brain.
    angles = np.radians(np.linspace(15.0, 170.0, 10))
    a_y, a_z = _BRAIN_SEMI_AXES_MM[1] + 2.0, _BRAIN_SEMI_AXES_MM[2] + 2.0
    arc = [(0.0, a_y * np.cos(t), a_z * np.sin(t)) for t in angles]
    sss = [(p, q, _SAGITTAL_SINUS_RADIUS_MM) for p, q in zip(arc[:-1], arc[1:])]
    for start, end, radius in _VEINS + sss:
        slices, d = grid.segment_distance_mm(_shift(start, origin), _shift(end, origin), radius)
        _paint(labels, slices, d < radius, LABELS["vein"], only=BRAIN_LABELS)

    # Lesions.
    for name, (centre, semi) in (("haemorrhage", _HAEMORRHAGE), ("calcification", _CALCIFICATION)):
        slices, d = grid.ellipsoid_distance_mm(_shift(centre, origin), semi)
        _paint(labels, slices, d < 0, LABELS[name])

    # Tissue properties from the labels, with smooth texture.
    texture = lowpass_random_field(shape, scaled_affine, 4.0, seeds[4])
    chi = _label_table(CHI_PPM)[labels]
    chi += _label_table(_CHI_TEXTURE_PPM)[labels] * texture
    r2star = _label_table(_R2STAR_HZ_3T)[labels] * (1.0 + 0.08 * texture)
    del texture
    pd = _label_table(_PROTON_DENSITY)[labels] * (1.0 + 0.03 * lowpass_random_field(shape, scaled_affine, 4.0, seeds[5]))
    brain_mask = np.isin(labels, list(BRAIN_LABELS))
    return HeadPhantom(
        chi_ppm=chi.astype(np.float32),
        labels=labels,
        brain_mask=brain_mask,
        proton_density=pd.astype(np.float32),
        r2star_hz=r2star.astype(np.float32),
        voxel_size_mm=voxel_size_mm,
        affine=affine,
    )
