"""Physics-aware augmentation of (chi, field) training pairs.

Augmentations that change geometry must keep the pair physically consistent:
the field must stay the dipole field of the susceptibility. The dipole kernel
D(k) = 1/3 - (k.b)^2/|k|^2 is invariant under a 90-degree rotation about B0
and under a flip of any array axis exactly when B0 lies along an array axis
(b = e_z: the rotation maps (kx, ky) to (-ky, kx) and a flip negates one
component; neither changes |k| or k_z^2). For an oblique B0 they do not
commute with the forward model and are refused. A 90-degree rotation swaps
the voxel sizes of the two in-plane axes, which ``Augmenter`` does too.

Amplitude scaling commutes with the (linear) forward model; noise is added
to the field only. Functions act on the last three axes, so (X, Y, Z) and
(C, X, Y, Z) NumPy arrays both work.

Reference: Jochmann T, Haueisen J, Schweser F. How to train a deep
convolutional neural network for QSM. ISMRM poster (90-degree rotations
about B0, flips, amplitude scaling 0.1-2, Rician noise). Larrain JM. SI-QSM,
MSc thesis, PUC Chile 2022 (Gaussian field noise, std 1e-5 to 1e-3).

``Augmenter`` configuration keys (all optional; absent means off):

- ``rot90_b0`` (bool): random k * 90 degrees about the B0 axis.
- ``flip`` (bool): flip each array axis with probability 1/2.
- ``amplitude`` ([lo, hi]): scale chi and field by a uniform factor.
- ``field_noise_ppm`` ([lo, hi]): Gaussian field noise, std log-uniform in
  [lo, hi] ppm, one std per sample.
- ``rician_snr`` ([lo, hi]): magnitude-modulated noise, SNR log-uniform in
  [lo, hi]; ``te_s`` (default 0.02) and ``b0_tesla`` (default 3.0) set the
  phase-to-field conversion (see ``add_rician_noise``).
- ``crop`` ([X, Y, Z]): random crop to this shape, applied first.
- ``background_residual`` ([lo, hi]): add a residual background field
  (``add_background_residual``) whose RMS in the mask is a uniform fraction
  in [lo, hi] of the local field's; chi is unchanged.
"""

import numpy as np
from scipy.ndimage import distance_transform_edt

from qsmprep.checks import check_table
from qsmprep.deep.generators import dipole_geometry, unit_dipole_field
from qsmprep.deep.recipes import AUGMENT_CHECKS
from qsmprep.errors import UsageError
from qsmprep.physics.units import ppm_to_rad


def _spatial_axis(array, axis):
    return np.ndim(array) - 3 + axis


def b0_axis_of(b0_dir, tol=1e-6):
    """Index (0, 1, 2) of the array axis B0 lies along, or None if B0 is oblique: more than ``tol`` (default 1e-6,
    a unit vector's component short of 1) off the axis."""
    b = np.abs(np.asarray(b0_dir, dtype=np.float64))
    b = b / np.linalg.norm(b)
    axis = int(np.argmax(b))
    return axis if b[axis] > 1 - tol else None


def rot90_about_b0(chi, field, k, b0_axis=2):
    """Rotate chi and field by k * 90 degrees about the B0 axis (an array axis).

    Commutes with the forward model only when B0 lies along array axis
    ``b0_axis``; for k odd the two in-plane axes (and their voxel sizes) swap.
    Returns (chi, field).
    """
    plane = [a for a in range(3) if a != b0_axis]
    return tuple(np.rot90(x, k, axes=[_spatial_axis(x, a) for a in plane]) for x in (chi, field))


def flip(chi, field, axes):
    """Flip chi and field along the given array axes (0, 1, 2).

    Commutes with the forward model when B0 lies along an array axis.
    Returns (chi, field).
    """
    axes = tuple(axes)
    if not axes:
        return chi, field
    return tuple(np.flip(x, [_spatial_axis(x, a) for a in axes]) for x in (chi, field))


def scale_amplitude(chi, field, factor):
    """Scale chi and field by ``factor`` (the forward model is linear). Returns (chi, field)."""
    factor = np.float32(factor)
    return chi * factor, field * factor


def add_field_noise(field, std_ppm, rng):
    """Field plus zero-mean Gaussian noise of standard deviation ``std_ppm`` (ppm)."""
    return (field + rng.normal(0.0, std_ppm, np.shape(field))).astype(np.float32)


def add_rician_noise(field, magnitude, snr, rng, te_s=0.02, b0_tesla=3.0):
    """Magnitude-modulated (Rician) noise: complex Gaussian noise on m exp(i phi).

    The complex signal m exp(i phi), phi = field * 2 pi gamma_bar B0 TE, gets
    circular complex Gaussian noise of standard deviation sigma = max(m) / snr
    per channel. The noisy phase is phi + angle(m + n) (computed that way, so
    a large field is never wrapped), hence the field noise has standard
    deviation ~ sigma / (m * 2 pi gamma_bar B0 TE) where m is large, i.e.
    ~ 1 / (snr * |m|) relative, and the noisy magnitude |m + n| is Rician.

    Reference: Gudbjartsson H, Patz S. The Rician distribution of noisy MRI
    data. Magn Reson Med 1995;34:910-914.

    Parameters
    ----------
    field : array
        Local field in ppm.
    magnitude : array, same shape
        Magnitude image (arbitrary units, >= 0).
    snr : float
        max(magnitude) / sigma.
    rng : numpy.random.Generator
    te_s : float, default 0.02
        Echo time in s of the simulated phase.
    b0_tesla : float, default 3.0
        Field strength in T.

    Returns
    -------
    (field_ppm, magnitude) : float32 arrays, the noisy field and the Rician magnitude.
    """
    magnitude = np.asarray(magnitude, dtype=np.float32)
    sigma = float(magnitude.max()) / float(snr)
    noise = rng.normal(0.0, sigma, (2,) + magnitude.shape).astype(np.float32)
    real = magnitude + noise[0]
    noisy_field = field + np.arctan2(noise[1], real) / np.float32(ppm_to_rad(1.0, te_s, b0_tesla))
    return noisy_field.astype(np.float32), np.hypot(real, noise[1]).astype(np.float32)


def add_background_residual(field, mask, voxel_size_mm, b0_dir, relative_rms, rng, n_sources=(1, 4),
                            clearance_mm=3.0, reach_mm=40.0):
    """Field plus a residual background field: that of point dipoles outside the region of interest.

    Background-field removal leaves part of the field of sources outside
    the brain (air-tissue interfaces), strongest at the brain's edge; in
    the pipeline's simulated runs the local-field error is about half the
    local field's RMS and largest within 3 mm of the mask's edge
    (docs/deep/data-and-losses.md). Any field of sources outside the mask is
    harmonic inside it, so point dipoles there are the simplest faithful
    model: each dipole sits at a random voxel outside the mask at least
    ``clearance_mm`` from it, or, when the mask fills the patch, beyond a
    random face at a distance of ``clearance_mm`` to ``reach_mm``. The sum
    (random signs and weights) is demeaned in the mask and scaled to
    ``relative_rms`` times the RMS of ``field`` there. Training on it
    teaches a network that harmonic components are not susceptibility.

    Parameters
    ----------
    field, mask : arrays (X, Y, Z)
        Local field (ppm) and 0/1 region of interest.
    voxel_size_mm : 3 floats
    b0_dir : 3 floats
        B0 direction in voxel coordinates.
    relative_rms : float
        RMS of the added field in the mask over that of ``field``.
    rng : numpy.random.Generator
    n_sources : (int, int), default (1, 4)
        Inclusive range of the number of dipoles.
    clearance_mm, reach_mm : float, default 3, 40
        Nearest and (beyond a face) farthest distance of a dipole from the mask.

    Returns
    -------
    float32 array: the field plus the residual, zero outside the mask.
    """
    inside = np.asarray(mask) > 0
    voxel = np.asarray(voxel_size_mm, dtype=np.float64)
    shape = np.array(inside.shape)
    rms = float(np.sqrt(np.mean(field[inside] ** 2))) if inside.any() else 0.0
    if rms == 0 or relative_rms <= 0:
        return np.asarray(field, dtype=np.float32)
    far = np.argwhere(distance_transform_edt(~inside, sampling=voxel) >= clearance_mm)
    b = np.asarray(b0_dir, dtype=np.float64) / np.linalg.norm(b0_dir)
    residual = np.zeros(inside.shape, dtype=np.float64)
    for _ in range(int(rng.integers(n_sources[0], n_sources[1] + 1))):
        if len(far):
            source_mm = far[int(rng.integers(len(far)))] * voxel
        else:  # beyond a random face of the patch
            axis, side = int(rng.integers(3)), int(rng.integers(2))
            source_mm = rng.uniform(0, shape - 1) * voxel
            edge_mm = (shape[axis] - 1) * voxel[axis] if side else 0.0
            source_mm[axis] = edge_mm + (1 if side else -1) * rng.uniform(clearance_mm, reach_mm)
        offsets = [np.arange(n) * v - s for n, v, s in zip(inside.shape, voxel, source_mm)]
        r2, along_b0 = dipole_geometry(*offsets, b)
        with np.errstate(divide="ignore", invalid="ignore"):  # at the source voxel itself, outside the mask
            residual += rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 1.0) * unit_dipole_field(r2, along_b0)
    values = residual[inside] - residual[inside].mean()
    scale = relative_rms * rms / max(float(np.sqrt(np.mean(values**2))), 1e-30)
    out = np.zeros(inside.shape, dtype=np.float32)
    out[inside] = field[inside] + scale * values
    return out


def random_crop(volumes, crop_shape, rng):
    """The same random crop (last three axes) of every array in a dict.

    ``volumes``: dict name -> array, all with the same last three sizes.
    ``crop_shape``: (X, Y, Z), each no larger than the arrays. Returns a dict.
    """
    shape = next(iter(volumes.values())).shape[-3:]
    crop_shape = tuple(int(n) for n in crop_shape)
    if len(crop_shape) != 3 or any(c > n or c < 1 for c, n in zip(crop_shape, shape)):
        raise UsageError(f"crop {list(crop_shape)} does not fit the {list(shape)} patch; make it at most the patch size")
    start = [int(rng.integers(0, n - c + 1)) for n, c in zip(shape, crop_shape)]
    window = (Ellipsis,) + tuple(slice(s, s + c) for s, c in zip(start, crop_shape))
    return {name: v[window] for name, v in volumes.items()}


def _log_uniform(rng, bounds):
    lo, hi = (float(v) for v in bounds)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


class Augmenter:
    """Apply a configured chain of augmentations consistently to a sample.

    Order: crop, rotation about B0, flips, amplitude scaling, residual
    background field, Gaussian field noise, Rician noise; then the field is
    zeroed outside the mask again (field outside the region of interest is
    unknown). Geometric steps act
    on chi, field, mask and magnitude alike; a rotation by an odd multiple
    of 90 degrees swaps the in-plane voxel sizes.

    Parameters
    ----------
    cfg : dict
        Keys of ``qsmprep.deep.recipes.AUGMENT_CHECKS``, each checked there (see the module docstring).
    rng : numpy.random.Generator
        Drawn from on every call.
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 in voxel coordinates; rotations and flips need it along an axis.
    """

    def __init__(self, cfg, rng, b0_dir=(0.0, 0.0, 1.0)):
        cfg = dict(cfg or {})
        check_table(cfg, AUGMENT_CHECKS, "[augment]", "augmentation config")
        self.cfg = cfg
        self.rng = rng
        self.b0_dir = tuple(b0_dir)
        self.b0_axis = b0_axis_of(b0_dir)
        if self.b0_axis is None and (cfg.get("rot90_b0") or cfg.get("flip")):
            raise UsageError(
                f"rot90_b0 and flip augmentations need B0 along an array axis, got b0_dir={tuple(b0_dir)}; "
                "turn them off or train with an axial B0"
            )

    def __call__(self, sample):
        """Augment ``sample``: dict with chi, field, mask, magnitude arrays and voxel_size (3,)."""
        cfg, rng = self.cfg, self.rng
        volumes = {k: sample[k] for k in ("chi", "field", "mask", "magnitude")}
        voxel = np.array(sample["voxel_size"], dtype=np.float32)
        if cfg.get("crop"):
            volumes = random_crop(volumes, cfg["crop"], rng)
        chi, field = volumes["chi"], volumes["field"]
        mask, magnitude = volumes["mask"], volumes["magnitude"]
        if cfg.get("rot90_b0"):
            k = int(rng.integers(4))
            chi, field = rot90_about_b0(chi, field, k, self.b0_axis)
            mask, magnitude = rot90_about_b0(mask, magnitude, k, self.b0_axis)
            if k % 2:
                plane = [a for a in range(3) if a != self.b0_axis]
                voxel[plane] = voxel[plane[::-1]]
        if cfg.get("flip"):
            axes = [a for a in range(3) if rng.random() < 0.5]
            chi, field = flip(chi, field, axes)
            mask, magnitude = flip(mask, magnitude, axes)
        if cfg.get("amplitude"):
            chi, field = scale_amplitude(chi, field, rng.uniform(*cfg["amplitude"]))
        if cfg.get("background_residual"):
            field = add_background_residual(field, mask, voxel, self.b0_dir, rng.uniform(*cfg["background_residual"]), rng)
        if cfg.get("field_noise_ppm"):
            field = add_field_noise(field, _log_uniform(rng, cfg["field_noise_ppm"]), rng)
        if cfg.get("rician_snr"):
            field, magnitude = add_rician_noise(
                field,
                magnitude,
                _log_uniform(rng, cfg["rician_snr"]),
                rng,
                te_s=cfg.get("te_s", 0.02),
                b0_tesla=cfg.get("b0_tesla", 3.0),
            )
        field = field * mask
        out = dict(sample)
        out.update(
            chi=np.ascontiguousarray(chi, dtype=np.float32),
            field=np.ascontiguousarray(field, dtype=np.float32),
            mask=np.ascontiguousarray(mask, dtype=np.float32),
            magnitude=np.ascontiguousarray(magnitude, dtype=np.float32),
            voxel_size=voxel,
        )
        return out
