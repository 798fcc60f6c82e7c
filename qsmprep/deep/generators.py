"""Synthetic susceptibility sources for training deep dipole inversion.

Every generator is a pure function of a ``numpy.random.Generator``: the same
generator state gives the same sample. Arrays are float32 in voxel order
(i, j, k); lengths are in mm, so any voxel size works, anisotropic included;
susceptibility and field are in ppm.

- ``random_patterns_chi``: random blurred shapes with a source-free border
  (Jochmann, Haueisen, Schweser, ISMRM poster).
- ``analytic_spheres_cylinders``: spheres and infinite cylinders with their
  closed-form fields (SI-QSM, Larrain 2022).
- ``brain_like_sample``: the built-in head phantom, elastically deformed, with
  contrast changes and lesion-like shapes (Meta-QSM; QSMInvNet+, Liu & Koch).
- ``random_magnitude`` and ``random_blob_mask``: a smooth magnitude image (for
  magnitude-modulated noise) and a smooth blob-shaped region of interest.

Fields of the pattern and brain sources come from
``qsmprep.physics.forward_field_ppm`` (see ``qsmprep.deep.data``).
"""

import functools

import numpy as np
from scipy import fft as spfft
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial.transform import Rotation

from qsmprep.physics.forward import padded_shape
from qsmprep.physics.kernel import kspace_grid
from qsmprep.physics.orientation import checked_voxel_size_mm
from qsmprep.sim.phantom import BRAIN_LABELS, LABELS, head_phantom

PATTERN_SHAPES = ("ellipsoid", "box", "blob")
"""Structure types drawn by ``random_patterns_chi``."""
BORDER_VOX = 10
"""Default source-free border of the pattern generator, voxels (Jochmann's ~10)."""


def _shape_and_voxel(shape, voxel_size_mm):
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes, got {shape}")
    return shape, checked_voxel_size_mm(voxel_size_mm)


def _axes_mm(shape, voxel):
    """Voxel-centre coordinates (mm) along each axis, voxel 0 at 0."""
    return [np.arange(n, dtype=np.float32) * np.float32(d) for n, d in zip(shape, voxel)]


def _unit(vector):
    v = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(v)
    if v.shape != (3,) or norm == 0:
        raise ValueError(f"a direction must be a non-zero 3-vector, got {vector}")
    return v / norm


def _smooth_noise(rng, shape, voxel, correlation_mm):
    """Zero-mean, unit-std Gaussian random field with Gaussian correlation length (mm).

    Filtered in k-space on a grid of fast FFT sizes, then cropped to ``shape``.
    """
    fast = tuple(spfft.next_fast_len(int(n), real=True) for n in shape)
    white = rng.standard_normal(fast, dtype=np.float32)
    spectrum = spfft.rfftn(white)
    kx, ky, kz = kspace_grid(fast, voxel, rfft=True)
    spectrum *= np.exp(-2 * np.pi**2 * correlation_mm**2 * (kx**2 + ky**2 + kz**2))
    noise = spfft.irfftn(spectrum, s=fast)[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    noise -= noise.mean()
    std = noise.std()
    return noise / std if std > 0 else noise


def _box_slices(centre_mm, radius_mm, voxel, shape):
    """Index slices of the voxels within ``radius_mm`` of ``centre_mm`` per axis (may be empty)."""
    lo = np.floor((centre_mm - radius_mm) / voxel).astype(int)
    hi = np.ceil((centre_mm + radius_mm) / voxel).astype(int) + 1
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, 0, shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _occupancy(depth_mm, width_mm):
    """Partial-volume fraction from the signed depth below a surface (mm).

    A linear ramp across the voxel's width along the surface normal, centred
    on the surface, so the volume of a smooth object is kept to first order.
    """
    return np.clip(0.5 + depth_mm / width_mm, 0.0, 1.0).astype(np.float32)


def _random_structure(rng, axes, voxel, kind, semi_mm, centre_mm, sigma_mm, texture_share):
    """One randomly rotated structure on the grid spanned by ``axes`` (mm): (box slices, values) or None.

    ``kind`` is "ellipsoid", "box" or "blob" (an ellipsoid whose surface is
    perturbed by smooth noise); values are 1 inside, 0 outside, optionally
    modulated by a +-50 % smooth texture (probability ``texture_share``),
    then Gaussian-blurred with ``sigma_mm``.
    """
    shape = tuple(a.size for a in axes)
    semi = np.maximum(np.asarray(semi_mm, dtype=np.float64), voxel.min())
    rotation = Rotation.random(random_state=rng).as_matrix()
    reach = {"ellipsoid": semi.max(), "box": np.linalg.norm(semi), "blob": 1.5 * semi.max()}[kind]
    box = _box_slices(np.asarray(centre_mm), reach + 3 * sigma_mm, voxel, shape)
    if any(s.stop <= s.start for s in box):
        return None
    d = [a[s] - np.float32(c) for a, s, c in zip(axes, box, centre_mm)]
    # coordinates in the structure's own (rotated) frame, in units of its semi-axes
    local = [
        (rotation[0, i] * d[0][:, None, None] + rotation[1, i] * d[1][None, :, None] + rotation[2, i] * d[2])
        / np.float32(semi[i])
        for i in range(3)
    ]
    box_shape = local[0].shape
    if kind == "box":
        inside = np.maximum(np.maximum(np.abs(local[0]), np.abs(local[1])), np.abs(local[2])) <= 1
    else:
        q = local[0] ** 2 + local[1] ** 2 + local[2] ** 2
        if kind == "blob":
            q -= 0.6 * _smooth_noise(rng, box_shape, voxel, semi.min() / 2)
        inside = q <= 1
    structure = inside.astype(np.float32)
    if rng.random() < texture_share:
        structure *= 1 + 0.5 * _smooth_noise(rng, box_shape, voxel, semi.min() / 3)
    if sigma_mm > 0:
        structure = gaussian_filter(structure, sigma_mm / voxel, mode="constant", truncate=3.0)
    return box, structure


def random_patterns_chi(
    rng,
    shape,
    voxel_size_mm=(1.0, 1.0, 1.0),
    border_vox=BORDER_VOX,
    large_share=0.3,
    n_structures=(16, 48),
    amplitude_ppm=0.2,
    large_size=(0.25, 0.6),
    small_size=(0.03, 0.15),
    blur_mm=(0.0, 3.0),
    texture_share=0.3,
    shapes=PATTERN_SHAPES,
):
    """Random blurred shapes with random amplitudes and a source-free border.

    Each structure is an ellipsoid, a box or a blob (an ellipsoid whose
    surface is perturbed by smooth noise), randomly rotated, with a uniform
    random amplitude, optionally a smooth internal texture, and its own
    Gaussian blur of random width; the structures add up. A border of
    ``border_vox`` voxels on every face is left exactly zero, so the field
    decays before the zero-padded edge of the forward model; a share of the
    structures is large, so that large uniform regions (white matter) are
    represented and the volume is not mostly empty background.

    Reference: Jochmann T, Haueisen J, Schweser F. How to train a deep
    convolutional neural network for quantitative susceptibility mapping
    (QSM). ISMRM poster (random patterns, per-structure blur, ~10 voxel
    source-free border).

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : tuple of 3 int
        Grid shape in voxels.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm; structure sizes and blur are in mm.
    border_vox : int, default 10
        Source-free border width in voxels on each face (Jochmann: ~10).
    large_share : float, default 0.3
        Probability that a structure is large.
    n_structures : (int, int), default (16, 48)
        Inclusive range of the number of structures.
    amplitude_ppm : float, default 0.2
        Amplitudes are uniform in [-amplitude_ppm, amplitude_ppm].
    large_size, small_size : (float, float), default (0.25, 0.6), (0.03, 0.15)
        Semi-axis ranges of large and small structures, as a fraction of
        the geometric mean extent (mm) of the source region.
    blur_mm : (float, float), default (0, 3)
        Range of the Gaussian blur sigma in mm, drawn per structure.
    texture_share : float, default 0.3
        Probability that a structure carries a smooth internal texture
        (amplitude modulated by +-50 % smooth noise).
    shapes : sequence of str, default ("ellipsoid", "box", "blob")
        Structure types to draw from.

    Returns
    -------
    float32 array ``shape``: chi in ppm, zero in the border.
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    border_vox = int(border_vox)
    inner_shape = tuple(n - 2 * border_vox for n in shape)
    if min(inner_shape) < 1 or border_vox < 0:
        raise ValueError(f"border_vox={border_vox} leaves no source region in a {shape} grid")
    unknown = set(shapes) - set(PATTERN_SHAPES)
    if unknown or not shapes:
        raise ValueError(f"unknown pattern shapes {sorted(unknown)}; choose from {PATTERN_SHAPES}")
    extent = np.asarray(inner_shape) * voxel
    mean_extent = float(np.prod(extent) ** (1 / 3))
    axes = _axes_mm(inner_shape, voxel)
    inner = np.zeros(inner_shape, dtype=np.float32)

    for _ in range(int(rng.integers(n_structures[0], n_structures[1] + 1))):
        size_range = large_size if rng.random() < large_share else small_size
        semi = rng.uniform(*size_range) * mean_extent * rng.uniform(0.4, 1.0, 3)
        kind = shapes[int(rng.integers(len(shapes)))]
        painted = _random_structure(
            rng, axes, voxel, kind, semi, rng.uniform(0, 1, 3) * extent, rng.uniform(*blur_mm), texture_share
        )
        if painted is not None:
            box, structure = painted
            inner[box] += np.float32(rng.uniform(-amplitude_ppm, amplitude_ppm)) * structure

    chi = np.zeros(shape, dtype=np.float32)
    chi[tuple(slice(border_vox, n - border_vox) for n in shape)] = inner
    return chi


def dipole_geometry(d0, d1, d2, b):
    """|d|^2 and (d . b) on the grid spanned by per-axis offsets d0, d1, d2 (mm)."""
    r2 = (d0**2)[:, None, None] + ((d1**2)[:, None] + (d2**2)[None, :])[None]
    along_b0 = (d0 * b[0])[:, None, None] + ((d1 * b[1])[:, None] + (d2 * b[2])[None, :])[None]
    return r2, along_b0


def unit_dipole_field(r2, along_b0):
    """(3 (d.b)^2 - |d|^2) / |d|^5, in place on ``along_b0``; |d| must be > 0."""
    field = np.multiply(along_b0, along_b0, out=along_b0)
    field *= 3
    field -= r2
    r5 = np.sqrt(r2)
    r5 *= r2
    r5 *= r2
    field /= r5
    return field


@functools.lru_cache(maxsize=4)
def _point_dipole_spectrum(big_shape, voxel, b):
    """rfft of the closed-form unit dipole field sampled at the wrapped integer offsets of a grid.

    float64, with offsets as integer steps times the voxel size (as in
    ``spheres_field_ppm``), so that a sphere's own near field, large inside
    it, cancels exactly where it is subtracted again.
    """
    offsets = [np.rint(spfft.fftfreq(n) * n) * v for n, v in zip(big_shape, voxel)]
    r2, along_b0 = dipole_geometry(*offsets, np.asarray(b))
    r2[0, 0, 0] = 1.0
    kernel = unit_dipole_field(r2, along_b0)
    kernel[0, 0, 0] = 0.0  # a centre voxel is inside its own sphere: no self field
    spectrum = spfft.rfftn(kernel)
    spectrum.flags.writeable = False
    return spectrum


def sphere_field_ppm(shape, voxel_size_mm, centre_mm, radius_mm, dchi_ppm, b0_dir=(0.0, 0.0, 1.0)):
    """Closed-form field (ppm) of a uniform sphere, Lorentz-corrected, at voxel centres.

    Outside: dchi/3 (R/r)^3 (3 cos^2 theta - 1), theta the angle between the
    offset from the centre and B0; inside: 0 (the Lorentz-sphere correction
    cancels the uniform internal field). Same convention as
    ``qsmprep.physics.dipole_kernel`` (D = 1/3 - k_b^2/k^2).

    Parameters: grid ``shape`` and ``voxel_size_mm`` (voxel 0 centred at 0 mm),
    ``centre_mm`` (3,), ``radius_mm``, susceptibility difference
    ``dchi_ppm``, ``b0_dir`` in voxel coordinates. Returns float32 ``shape``.

    Reference: Schenck JF. The role of magnetic susceptibility in magnetic
    resonance imaging: MRI magnetic compatibility of the first and second
    kinds. Med Phys 1996;23:815-850 (fields of a sphere and a cylinder).
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    d = [a - np.float32(c) for a, c in zip(_axes_mm(shape, voxel), centre_mm)]
    r2, along_b0 = dipole_geometry(*d, _unit(b0_dir))
    radius2 = np.float32(radius_mm**2)
    inside = r2 < radius2
    np.maximum(r2, radius2, out=r2)  # inside voxels are zeroed below; this keeps 1/r finite
    field = unit_dipole_field(r2, along_b0)
    field *= np.float32(dchi_ppm * radius_mm**3 / 3)
    field[inside] = 0
    return field


def spheres_field_ppm(shape, voxel_size_mm, centres_vox, radii_mm, dchi_ppm, b0_dir=(0.0, 0.0, 1.0)):
    """Summed closed-form fields (ppm) of many spheres centred on voxel centres.

    Outside its sphere, each field is that of a point dipole of moment
    dchi R^3 / 3 at the centre, so the sum over spheres is the discrete
    (zero-padded, hence linear) convolution of the moments, placed at their
    centre voxels, with the closed-form dipole field 1/r^3 (3 cos^2 - 1)
    sampled on the grid; it is evaluated by FFT, one convolution for any
    number of spheres, then each sphere's own contribution is removed inside
    it. The result equals the sum of ``sphere_field_ppm`` up to float32
    rounding; no k-space dipole kernel is involved.

    Parameters: grid ``shape``, ``voxel_size_mm``; ``centres_vox`` (n, 3)
    integer voxel indices inside the grid; ``radii_mm`` (n,); ``dchi_ppm``
    (n,); ``b0_dir``. Returns float32 ``shape``.
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    centres = np.asarray(centres_vox, dtype=np.int64).reshape(-1, 3)
    radii = np.asarray(radii_mm, dtype=np.float64).reshape(-1)
    moments = np.asarray(dchi_ppm, dtype=np.float64).reshape(-1) * radii**3 / 3
    if np.any(centres < 0) or np.any(centres >= np.asarray(shape)):
        raise ValueError("sphere centres must be voxel indices inside the grid")
    b = _unit(b0_dir)
    if centres.shape[0] == 0:
        return np.zeros(shape, dtype=np.float32)
    big = padded_shape(shape, 2.0)
    spikes = np.zeros(shape, dtype=np.float64)
    np.add.at(spikes, tuple(centres.T), moments)
    spectrum = spfft.rfftn(spikes, s=big)
    spectrum *= _point_dipole_spectrum(big, tuple(voxel), tuple(b))
    field = spfft.irfftn(spectrum, s=big)[: shape[0], : shape[1], : shape[2]]
    for centre, radius, moment in zip(centres, radii, moments):
        box = _box_slices(centre * voxel, radius, voxel, shape)
        d = [(np.arange(s.start, s.stop) - c) * v for s, c, v in zip(box, centre, voxel)]
        r2, along_b0 = dipole_geometry(*d, b)
        inside = r2 < radius**2
        inside[tuple(c - s.start for c, s in zip(centre, box))] = False
        np.maximum(r2, 1e-12, out=r2)
        own = unit_dipole_field(r2, along_b0)
        field[box][inside] -= moment * own[inside]
    return field.astype(np.float32)


def sphere_chi_ppm(shape, voxel_size_mm, centre_mm, radius_mm, dchi_ppm):
    """Partial-volume susceptibility (ppm) of a uniform sphere on the grid (float32 ``shape``)."""
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    chi = np.zeros(shape, dtype=np.float32)
    centre = np.asarray(centre_mm, dtype=np.float64)
    box = _box_slices(centre, radius_mm + voxel.max(), voxel, shape)
    if any(s.stop <= s.start for s in box):
        return chi
    d = [a[s] - np.float32(c) for a, s, c in zip(_axes_mm(shape, voxel), box, centre)]
    r = np.sqrt((d[0] ** 2)[:, None, None] + (d[1] ** 2)[None, :, None] + d[2] ** 2)
    # voxel width along the radial direction: sum_i |n_i| v_i
    width = (
        np.abs(d[0])[:, None, None] * voxel[0] + np.abs(d[1])[None, :, None] * voxel[1] + np.abs(d[2]) * voxel[2]
    ) / np.maximum(r, 1e-6)
    width = np.maximum(width, 1e-6)
    # the ramp adds 4 pi R w^2 / 12 of volume; moving the surface in by w^2 / (12 R) removes it
    chi[box] = dchi_ppm * _occupancy(radius_mm - r - width**2 / (12 * radius_mm), width)
    return chi


def cylinder_chi_and_field_ppm(
    shape, voxel_size_mm, point_mm, axis_dir, radius_mm, dchi_ppm, b0_dir=(0.0, 0.0, 1.0)
):
    """Infinite uniform cylinder: partial-volume chi and closed-form field (ppm).

    With theta the angle between the cylinder axis and B0, rho the distance
    to the axis and psi the azimuth about the axis measured from the
    projection of B0 on the cross-section plane (Lorentz-corrected):
    outside dchi/2 (a/rho)^2 sin^2(theta) cos(2 psi), inside
    dchi/6 (3 cos^2 theta - 1). The field is the point value at each voxel
    centre; chi is the partial-volume fraction times ``dchi_ppm``.

    Parameters: grid ``shape`` and ``voxel_size_mm``; ``point_mm`` a point on
    the axis (mm); ``axis_dir`` the axis direction (voxel coordinates);
    ``radius_mm``; ``dchi_ppm``; ``b0_dir``. Returns (chi, field), float32.

    Reference: Schenck JF. The role of magnetic susceptibility in magnetic
    resonance imaging: MRI magnetic compatibility of the first and second
    kinds. Med Phys 1996;23:815-850 (fields of a sphere and a cylinder).
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    u = _unit(axis_dir)
    b = _unit(b0_dir)
    cos_theta = float(u @ b)
    b_perp = b - cos_theta * u  # |b_perp| = sin(theta)
    d = [a - np.float32(p) for a, p in zip(_axes_mm(shape, voxel), point_mm)]
    rho2, along = dipole_geometry(*d, u)
    rho2 -= along * along
    # rho sin(theta) cos(psi), scaled by sqrt(2) so that s^2 = 2 (rho sin(theta) cos(psi))^2
    w = np.sqrt(2.0) * b_perp
    s = (d[0] * w[0])[:, None, None] + ((d[1] * w[1])[:, None] + (d[2] * w[2])[None, :])[None]
    radius2 = np.float32(radius_mm**2)
    inside = rho2 < radius2
    # outside: dchi a^2 / 2 * (2 s^2 - sin^2(theta) rho^2) / rho^4
    field = np.multiply(s, s, out=s)
    field -= np.float32(1.0 - cos_theta**2) * rho2
    with np.errstate(divide="ignore", invalid="ignore"):
        field /= rho2 * rho2
    field *= np.float32(dchi_ppm * radius_mm**2 / 2)
    field[inside] = np.float32(dchi_ppm * (3 * cos_theta**2 - 1) / 6)

    chi = inside.astype(np.float32)
    vmax = voxel.max()
    shell = (rho2 > max(radius_mm - vmax, 0.0) ** 2) & (rho2 < (radius_mm + vmax) ** 2)
    idx = np.nonzero(shell)
    if idx[0].size:
        rho = np.sqrt(np.maximum(rho2[idx], 0))
        along_s = along[idx]
        width = sum(
            np.abs(d[i][idx[i]] - along_s * np.float32(u[i])) * np.float32(voxel[i]) for i in range(3)
        ) / np.maximum(rho, 1e-6)
        width = np.maximum(width, 1e-6)
        # the ramp adds pi w^2 / 12 of cross-section; moving the surface in by w^2 / (24 a) removes it
        chi[idx] = _occupancy(radius_mm - rho - width**2 / (24 * radius_mm), width)
    chi *= np.float32(dchi_ppm)
    return chi, field


def analytic_spheres_cylinders(
    rng,
    shape,
    voxel_size_mm=(1.0, 1.0, 1.0),
    b0_dir=(0.0, 0.0, 1.0),
    n_spheres=(1, 128),
    n_cylinders=(0, 32),
    chi_max_ppm=0.01,
    sphere_radius_mm=(1.0, 8.0),
    cylinder_radius_mm=(0.5, 4.0),
):
    """Spheres and infinite cylinders with closed-form (not FFT) fields, summed.

    Spheres lie wholly inside the grid, centred on uniformly drawn voxel
    centres (so their summed field is one exact discrete convolution, see
    ``spheres_field_ppm``), with uniform random radius and susceptibility in
    [-chi_max_ppm, chi_max_ppm];
    infinite cylinders pass through a uniform random point of the grid in a
    uniformly random direction. The model is linear, so chi and field of all
    objects add up (overlaps included). chi is partial-volume sampled; the
    field is the closed-form value at voxel centres (see ``sphere_field_ppm``
    and ``cylinder_chi_and_field_ppm``). The cylinders extend past the grid,
    so their field is that of an infinite object, which an FFT of the grid's
    chi cannot reproduce near the faces.

    Reference: Larrain JM. Scale-invariant deep learning approach for QSM
    reconstruction: SI-QSM. MSc thesis, Pontificia Universidad Catolica de Chile, 2022
    (up to 128 spheres and 32 cylinders, |chi| <= 0.01 ppm, 48^3 FOV).

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : tuple of 3 int
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates.
    n_spheres, n_cylinders : (int, int), default (1, 128), (0, 32)
        Inclusive ranges of the object counts (SI-QSM maxima).
    chi_max_ppm : float, default 0.01
        Bound on each object's |chi| (SI-QSM).
    sphere_radius_mm, cylinder_radius_mm : (float, float), default (1, 8), (0.5, 4)
        Radius ranges in mm; a sphere's radius is capped so it fits the grid.

    Returns
    -------
    (chi, field) : float32 arrays ``shape``, ppm.
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    extent = np.asarray(shape) * voxel
    span = extent - voxel  # first to last voxel centre
    chi = np.zeros(shape, dtype=np.float32)
    n = int(rng.integers(n_spheres[0], n_spheres[1] + 1))
    radii = np.minimum(rng.uniform(*sphere_radius_mm, n), 0.45 * span.min())
    # centres on voxel centres with the whole sphere inside the grid
    lo = np.ceil(radii[:, None] / voxel).astype(int)
    hi = np.maximum(np.floor((span - radii[:, None]) / voxel).astype(int), lo)
    centres = lo + np.floor(rng.uniform(0, 1, (n, 3)) * (hi - lo + 1)).astype(int)
    dchis = rng.uniform(-chi_max_ppm, chi_max_ppm, n)
    for centre, radius, dchi in zip(centres, radii, dchis):
        chi += sphere_chi_ppm(shape, voxel, centre * voxel, radius, dchi)
    field = spheres_field_ppm(shape, voxel, centres, radii, dchis, b0_dir)
    for _ in range(int(rng.integers(n_cylinders[0], n_cylinders[1] + 1))):
        direction = rng.standard_normal(3)
        point = rng.uniform(0, 1, 3) * span
        c_chi, c_field = cylinder_chi_and_field_ppm(
            shape,
            voxel,
            point,
            direction,
            rng.uniform(*cylinder_radius_mm),
            rng.uniform(-chi_max_ppm, chi_max_ppm),
            b0_dir,
        )
        chi += c_chi
        field += c_field
    return chi, field


def random_magnitude(rng, shape, voxel_size_mm=(1.0, 1.0, 1.0), correlation_mm=8.0, mean=0.7, std=0.15):
    """Smooth random magnitude image, clipped to [0.1, 1] (for magnitude-modulated noise).

    Jochmann et al. pair each synthetic sample with a magnitude image that
    modulates its noise; this is a Gaussian random field with correlation
    length ``correlation_mm`` (default 8 mm), mean ``mean`` (default 0.7)
    and standard deviation ``std`` (default 0.15), in units of the largest
    magnitude (1). ``voxel_size_mm`` (default 1 mm) sets the grid's spacing.
    Returns float32 ``shape``.

    Reference: Jochmann T, Haueisen J, Schweser F. How to train a deep
    convolutional neural network for quantitative susceptibility mapping
    (QSM). ISMRM poster (Fig. 2: magnitude images for Rician,
    magnitude-modulated, noise).
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    magnitude = mean + std * _smooth_noise(rng, shape, voxel, correlation_mm)
    return np.clip(magnitude, 0.1, 1.0).astype(np.float32)


def random_blob_mask(rng, shape, voxel_size_mm=(1.0, 1.0, 1.0), border_vox=0, fill=(0.6, 0.9), roughness=0.3):
    """Smooth blob-shaped binary region of interest (float32 0/1).

    An ellipsoid centred in the grid whose semi-axes are ``fill`` (a random
    fraction in that range, default 0.6-0.9) of the half-extent inside a
    ``border_vox`` border (voxels, default 0), its surface perturbed by smooth
    noise of relative amplitude ``roughness`` (default 0.3), like a brain
    mask. The grid centre is always inside. ``voxel_size_mm`` (default 1 mm)
    sets the grid's spacing.
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    border_vox = int(border_vox)
    half = (np.asarray(shape) - 2 * border_vox) * voxel / 2
    if np.any(half <= 0):
        raise ValueError(f"border_vox={border_vox} leaves no region in a {shape} grid")
    semi = half * rng.uniform(*fill, 3)
    centre = (np.asarray(shape) - 1) * voxel / 2
    d = [a - np.float32(c) for a, c in zip(_axes_mm(shape, voxel), centre)]
    q = (d[0] / semi[0])[:, None, None] ** 2 + (d[1] / semi[1])[None, :, None] ** 2 + (d[2] / semi[2]) ** 2
    q -= roughness * _smooth_noise(rng, shape, voxel, semi.min() / 3) * np.sqrt(q)
    mask = (q <= 1).astype(np.float32)
    if border_vox:
        inner = np.zeros_like(mask)
        core = tuple(slice(border_vox, n - border_vox) for n in shape)
        inner[core] = mask[core]
        mask = inner
    mask[tuple((n - 1) // 2 for n in shape)] = 1
    return mask


REFERENCE_SHAPE_MM = (160.0, 192.0, 160.0)
"""Field of view (mm) of the reference head phantoms ``brain_like_sample`` samples from."""


@functools.lru_cache(maxsize=8)
def _reference_head(seed, reference_voxel_mm, te_s):
    """Head phantom ``seed`` at isotropic ``reference_voxel_mm``: (chi, labels, magnitude, brain voxel indices)."""
    shape = tuple(int(np.ceil(e / reference_voxel_mm)) for e in REFERENCE_SHAPE_MM)
    head = head_phantom(shape, (reference_voxel_mm,) * 3, seed)
    chi = np.where(head.brain_mask, head.chi_ppm, 0).astype(np.float32)
    magnitude = (head.proton_density * np.exp(-head.r2star_hz * te_s)).astype(np.float32)
    return chi, head.labels, magnitude, np.argwhere(head.brain_mask)


def _label_lut(values, default=0.0):
    lut = np.full(max(LABELS.values()) + 1, default, dtype=np.float32)
    for name, v in values.items():
        lut[LABELS[name]] = v
    return lut


def _deformed_head_sample(
    rng, reference, shape, voxel, reference_voxel_mm, rotation_deg, elastic_mm, elastic_correlation_mm
):
    """(chi, labels, magnitude) of ``reference`` (from ``_reference_head``) resampled onto the grid ``shape``.

    The grid is centred on a random brain voxel, turned by a random rotation
    of up to ``rotation_deg`` about each axis, and displaced by a smooth random
    field of ``elastic_mm`` standard deviation per axis (correlation length
    ``elastic_correlation_mm``); chi and magnitude are interpolated
    trilinearly, labels by nearest neighbour.
    """
    ref_chi, ref_labels, ref_magnitude, brain_voxels = reference
    centre_vox = brain_voxels[int(rng.integers(len(brain_voxels)))] + rng.uniform(-0.5, 0.5, 3)
    rotation = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3), degrees=True).as_matrix()
    # sample grid -> reference voxel coordinates: rotate the centred mm grid, add the elastic displacement
    offsets = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(v) for n, v in zip(shape, voxel)]
    coords = np.empty((3,) + shape, dtype=np.float32)
    scale = np.float32(1.0 / reference_voxel_mm)
    for i in range(3):
        coords[i] = rotation[i, 0] * offsets[0][:, None, None] + (
            rotation[i, 1] * offsets[1][:, None] + rotation[i, 2] * offsets[2][None, :]
        )[None]
        if elastic_mm > 0:
            coords[i] += np.float32(elastic_mm) * _smooth_noise(rng, shape, voxel, elastic_correlation_mm / 2)
        coords[i] *= scale
        coords[i] += np.float32(centre_vox[i])
    chi = map_coordinates(ref_chi, coords, order=1, mode="constant", cval=0.0)
    labels = map_coordinates(ref_labels, coords, order=0, mode="constant", cval=0)
    magnitude = map_coordinates(ref_magnitude, coords, order=1, mode="constant", cval=0.0)
    return chi, labels, magnitude


def _changed_contrast(rng, chi, labels, contrast_scale, contrast_offset_ppm):
    """``chi`` with each brain label's values scaled by a random factor and shifted by a random offset.

    Factors are uniform in ``contrast_scale``, offsets in
    +-``contrast_offset_ppm``; CSF, the zero reference, keeps offset 0.
    """
    brain = [n for n in LABELS if LABELS[n] in BRAIN_LABELS]
    gain = _label_lut({n: rng.uniform(*contrast_scale) for n in brain}, default=1.0)
    shift = _label_lut({n: rng.uniform(-contrast_offset_ppm, contrast_offset_ppm) for n in brain if n != "csf"})
    return chi * gain[labels] + shift[labels]


def _paint_lesions(rng, chi, mask, voxel, lesions):
    """Paint random lesions into ``chi`` (in place), each centred on a random ``mask`` voxel.

    ``lesions`` holds (shape, count range, chi range in ppm, radius range in
    mm, blur sigma in mm) per lesion type; a lesion replaces the chi it
    covers, in proportion to its blurred partial-volume cover.
    """
    axes = _axes_mm(chi.shape, voxel)
    brain_idx = np.argwhere(mask)
    for kind, count, chi_range, radius_range, blur_mm in lesions:
        for _ in range(int(rng.integers(count[0], count[1] + 1)) if len(brain_idx) else 0):
            centre = brain_idx[int(rng.integers(len(brain_idx)))] * voxel
            semi = rng.uniform(*radius_range) * rng.uniform(0.6, 1.0, 3)
            painted = _random_structure(rng, axes, voxel, kind, semi, centre, blur_mm, 0.0)
            if painted is not None:
                box, cover = painted
                chi[box] += cover * (np.float32(rng.uniform(*chi_range)) - chi[box])


def brain_like_sample(
    rng,
    shape,
    voxel_size_mm=(1.0, 1.0, 1.0),
    subjects=(0, 1, 2, 3),
    reference_voxel_mm=1.0,
    rotation_deg=15.0,
    elastic_mm=3.0,
    elastic_correlation_mm=20.0,
    contrast_scale=(0.7, 1.3),
    contrast_offset_ppm=0.02,
    n_haemorrhages=(0, 2),
    haemorrhage_ppm=(0.3, 1.5),
    haemorrhage_radius_mm=(2.0, 10.0),
    n_calcifications=(0, 2),
    calcification_ppm=(-2.5, -0.5),
    calcification_radius_mm=(1.0, 4.0),
    te_s=0.02,
):
    """Brain-like chi, brain mask and magnitude sampled from a deformed head phantom.

    A reference head (``qsmprep.sim.phantom.head_phantom``, one of
    ``subjects`` seeds, built once at ``reference_voxel_mm`` and cached) is
    resampled onto the requested grid through a random rigid rotation (up
    to ``rotation_deg`` about each axis), a random position (the patch is
    centred on a random brain voxel) and an elastic deformation (a smooth
    random displacement field of ``elastic_mm`` standard deviation per axis
    and ``elastic_correlation_mm`` correlation length; Simard et al. 2003),
    with ``scipy.ndimage.map_coordinates`` (chi and magnitude trilinear,
    labels nearest). Each brain label's chi is then rescaled by a uniform
    factor in ``contrast_scale`` and, except CSF (the zero reference),
    shifted by a uniform offset in +-``contrast_offset_ppm``; a voxel takes
    the factor of its nearest label, so partial-volume voxels at tissue
    boundaries follow one neighbour. Random lesions are painted in:
    haemorrhages (paramagnetic blobs) and calcifications (small, strongly
    diamagnetic ellipsoids), which replace the tissue they cover; finally
    chi is zeroed outside the brain mask (only brain sources).

    References: Liu J, Koch KM. Meta-QSM: an image-resolution-arbitrary
    network for QSM reconstruction (elastic deformation, geometric shapes
    mimicking bleeds and calcifications, contrast changes, voxel sizes
    0.5-1.0 x 0.5-1.0 x 2.0-4.0 mm). Liu J, Koch KM. Exploring domain
    adaptation for deep neural network trained QSM (QSMInvNet+). ISMRM
    abstract (elastic transform, contrast change, fake lesions). Simard PY,
    Steinkraus D, Platt JC. Best practices for convolutional neural networks
    applied to visual document analysis. ICDAR 2003 (elastic distortion).

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : tuple of 3 int
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Any voxel size; B0 stays along the array's third axis by convention
        of the caller (the rotation turns the head, not B0).
    subjects : sequence of int, default (0, 1, 2, 3)
        Phantom seeds to draw the reference head from.
    reference_voxel_mm : float, default 1.0
        Isotropic voxel size of the cached reference heads.
    rotation_deg, elastic_mm, elastic_correlation_mm : float, default 15, 3, 20
    contrast_scale : (float, float), default (0.7, 1.3)
    contrast_offset_ppm : float, default 0.02
    n_haemorrhages, n_calcifications : (int, int), default (0, 2)
        Inclusive ranges of lesion counts.
    haemorrhage_ppm, calcification_ppm : (float, float), default (0.3, 1.5), (-2.5, -0.5)
        Lesion chi ranges (phantom values: +0.9 and -1.5 ppm, after Chen et
        al., Radiology 2014).
    haemorrhage_radius_mm, calcification_radius_mm : (float, float), default (2, 10), (1, 4)
    te_s : float, default 0.02
        Echo time of the magnitude proton_density * exp(-R2* TE).

    Returns
    -------
    dict with float32 arrays ``shape``: "chi" (ppm, zero outside the brain),
    "mask" (0/1 brain mask), "magnitude" (relative).
    """
    shape, voxel = _shape_and_voxel(shape, voxel_size_mm)
    seed = int(subjects[int(rng.integers(len(subjects)))])
    reference = _reference_head(seed, float(reference_voxel_mm), float(te_s))
    chi, labels, magnitude = _deformed_head_sample(
        rng, reference, shape, voxel, reference_voxel_mm, rotation_deg, elastic_mm, elastic_correlation_mm
    )
    mask = np.isin(labels, list(BRAIN_LABELS))
    chi = _changed_contrast(rng, chi, labels, contrast_scale, contrast_offset_ppm)
    lesions = (  # shape, count, chi (ppm), radius (mm), blur sigma (mm)
        ("blob", n_haemorrhages, haemorrhage_ppm, haemorrhage_radius_mm, 1.0),
        ("ellipsoid", n_calcifications, calcification_ppm, calcification_radius_mm, 0.3),
    )
    _paint_lesions(rng, chi, mask, voxel, lesions)
    chi *= mask
    return {
        "chi": chi.astype(np.float32),
        "mask": mask.astype(np.float32),
        "magnitude": (magnitude * mask).astype(np.float32),
    }
