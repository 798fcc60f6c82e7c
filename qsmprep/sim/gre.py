"""Multi-echo gradient-echo (GRE) forward simulation of a head phantom.

Signal model per voxel and echo n (Haacke EM, Brown RW, Thompson MR,
Venkatesan R. Magnetic Resonance Imaging: Physical Principles and Sequence
Design. Wiley 1999, ch. 20 and 25):

    S_n = PD exp(-R2* TE_n) exp(i (phi0 + 2 pi gamma_bar B0 f TE_n)) + noise

with f the total field perturbation in ppm (``qsmprep.physics.units``),
phi0 a smooth receive-phase offset common to all echoes, and complex
Gaussian noise of standard deviation sigma per channel, so the magnitude is
Rician. R2* of the phantom is given at 3 T and scaled linearly with B0
(static dephasing regime: Yablonskiy DA, Haacke EM. Theory of NMR signal
behavior in magnetically inhomogeneous tissues: the static dephasing
regime. Magn Reson Med 1994;32:749-63).
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..phase.scaling import wrap_to_pi
from ..physics import b0_dir_from_affine, forward_field_ppm, ppm_to_rad
from ..physics.resample import rotation_between
from .phantom import CHI_PPM, BRAIN_LABELS, centred_affine, lowpass_random_field

VENDOR_PHASE_MAX = 4096
"""Vendor-style integer phase: round(phase_rad * 4096 / pi) clipped to [-4096, 4095]."""

PHANTOM_R2STAR_B0_TESLA = 3.0
"""Field strength at which the phantom's R2* values are given."""

PHASE_OFFSET_CORRELATION_MM = 80.0
"""Spatial scale of the smooth receive-phase offset."""

PHASE_OFFSET_STD_RAD = 1.0
"""Scale of its spatially varying part, rad (a uniform constant is added): the standard deviation at the random
field's lattice nodes, about 0.88 of it between them (``lowpass_random_field``)."""


@dataclass
class SimulatedGRE:
    """A simulated multi-echo GRE acquisition and its ground truth, on one grid.

    magnitude, phase_rad: float32 (i, j, k, echo); phase wrapped to [-pi, pi).
    te_s: echo times (s). b0_tesla: field strength (T). b0_dir: unit B0
    direction in voxel coordinates (consistent with ``affine``).
    affine: voxel -> world (mm). voxel_size_mm: 3-tuple.
    total_field_ppm: field of all sources (head, skull, air) minus the
    mean over the brain (the scanner's centre frequency).
    local_field_ppm: field of chi inside the brain mask, zero outside it.
    background_field_ppm: total minus the (unmasked) field of the brain's
    chi, i.e. the field of everything outside the brain.
    chi_ppm: ground-truth susceptibility inside the brain mask, 0 outside.
    labels (uint8), brain_mask (bool): ``qsmprep.sim.phantom.LABELS``.
    phase_offset_rad: the receive-phase offset phi0 (echo-independent).
    noise_sigma: standard deviation of the noise per real/imaginary channel
    (0 when noiseless).
    """

    magnitude: np.ndarray
    phase_rad: np.ndarray
    te_s: tuple
    b0_tesla: float
    b0_dir: tuple
    affine: np.ndarray
    voxel_size_mm: tuple
    total_field_ppm: np.ndarray
    local_field_ppm: np.ndarray
    background_field_ppm: np.ndarray
    chi_ppm: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    phase_offset_rad: np.ndarray
    noise_sigma: float


def phase_to_vendor_units(phase_rad):
    """Phase in rad -> vendor-style int16 in [-4096, 4095] (BIDS ``Units: arbitrary``).

    value = round(phase * 4096 / pi); reading back, phase = value * pi / 4096
    (to within pi / 4096 rad).
    """
    value = np.round(np.asarray(phase_rad, dtype=np.float64) * (VENDOR_PHASE_MAX / np.pi))
    return np.clip(value, -VENDOR_PHASE_MAX, VENDOR_PHASE_MAX - 1).astype(np.int16)


def _field_maps(phantom, b0_dir):
    """Total, unmasked brain-source and background fields (ppm) of a phantom (see ``SimulatedGRE``)."""
    mask = phantom.brain_mask
    # Susceptibility relative to the surrounding air, so the source is zero outside the head.
    total = forward_field_ppm(phantom.chi_ppm - np.float32(CHI_PPM["background"]), phantom.voxel_size_mm, b0_dir)
    total -= total[mask].mean()
    brain = forward_field_ppm(np.where(mask, phantom.chi_ppm, 0), phantom.voxel_size_mm, b0_dir)
    return total, brain, total - brain


def _echo_signal(proton_density, r2star_hz_3t, field_ppm, te_s, b0_tesla):
    """Noiseless complex signal of one echo, without the receive-phase offset."""
    r2star = r2star_hz_3t * np.float32(b0_tesla / PHANTOM_R2STAR_B0_TESLA)
    phase = ppm_to_rad(field_ppm, te_s, b0_tesla).astype(np.float32)
    return (proton_density * np.exp(-r2star * np.float32(te_s))) * np.exp(1j * phase).astype(np.complex64)


def _phase_offset(shape, affine, rng, enabled):
    """Smooth receive-phase offset (rad): a random constant plus a low-pass random field."""
    if not enabled:
        return np.zeros(shape, dtype=np.float32)
    field_seed = int(rng.integers(2**31))
    offset = rng.uniform(-np.pi, np.pi)
    smooth = lowpass_random_field(shape, affine, PHASE_OFFSET_CORRELATION_MM, field_seed)
    return (offset + PHASE_OFFSET_STD_RAD * smooth).astype(np.float32)


def _acquired(echoes, snr, phase_offset, seed, **truth):
    """The SimulatedGRE of noiseless complex ``echoes`` once a receive-phase offset phi0 (``phase_offset``) and
    complex Gaussian noise of the ``snr`` are added, both drawn from ``seed``; ``truth`` holds its other fields."""
    rng = np.random.default_rng(seed)
    mask = truth["brain_mask"]
    phi0 = _phase_offset(mask.shape, truth["affine"], rng, phase_offset)
    first = np.abs(echoes[0])
    sigma = 0.0 if snr is None or not np.isfinite(snr) else float(first[mask].mean() / snr)
    rotation = np.exp(1j * phi0).astype(np.complex64)
    magnitude = np.empty(first.shape + (len(echoes),), dtype=np.float32)
    phase = np.empty_like(magnitude)
    for n, echo in enumerate(echoes):
        s = echo * rotation
        if sigma > 0:
            s += sigma * rng.standard_normal(s.shape, dtype=np.float32)
            s += 1j * sigma * rng.standard_normal(s.shape, dtype=np.float32)
        magnitude[..., n] = np.abs(s)
        phase[..., n] = wrap_to_pi(np.angle(s))
    return SimulatedGRE(magnitude=magnitude, phase_rad=phase, phase_offset_rad=phi0, noise_sigma=sigma, **truth)


def simulate_gre(
    phantom,
    te_s=(0.004, 0.008, 0.012, 0.016),
    b0_tesla=3.0,
    b0_dir=(0.0, 0.0, 1.0),
    snr=100.0,
    phase_offset=True,
    seed=0,
):
    """Multi-echo GRE magnitude and phase of ``phantom`` on its own grid.

    The total field is the dipole forward model (``forward_field_ppm``, grid
    zero-padded to twice its size) of the phantom's susceptibility relative to
    air, so air, skull and tissue interfaces create the background field;
    its mean over the brain is removed (the scanner's centre frequency).

    Parameters
    ----------
    phantom : HeadPhantom
    te_s : sequence of float, default (0.004, 0.008, 0.012, 0.016)
        Echo times in s.
    b0_tesla : float, default 3.0
        Field strength in T.
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in the phantom's voxel coordinates. A tilted direction
        means a tilted head: the returned affine is rotated accordingly, so
        ``b0_dir_from_affine(result.affine)`` gives it back.
    snr : float or None, default 100
        Mean brain magnitude of the first echo over the noise standard
        deviation (per channel); None or inf gives noiseless data.
    phase_offset : bool, default True
        Add a smooth echo-independent receive-phase offset phi0.
    seed : int, default 0
        Seed of the noise and the phase offset.

    Returns
    -------
    SimulatedGRE
    """
    te_s = tuple(float(t) for t in te_s)
    b = np.asarray(b0_dir, dtype=np.float64)
    b = b / np.linalg.norm(b)
    rotation = rotation_between(b, np.array([0.0, 0.0, 1.0]))
    affine = np.asarray(phantom.affine, dtype=np.float64).copy()
    affine[:3] = rotation @ affine[:3]
    total, brain, background = _field_maps(phantom, tuple(b))
    mask = phantom.brain_mask
    echoes = [_echo_signal(phantom.proton_density, phantom.r2star_hz, total, te, b0_tesla) for te in te_s]
    return _acquired(
        echoes,
        snr,
        phase_offset,
        seed,
        te_s=te_s,
        b0_tesla=float(b0_tesla),
        b0_dir=tuple(float(v) for v in b),
        affine=affine,
        voxel_size_mm=tuple(phantom.voxel_size_mm),
        total_field_ppm=total,
        local_field_ppm=(brain * mask).astype(np.float32),
        background_field_ppm=background,
        chi_ppm=(phantom.chi_ppm * mask).astype(np.float32),
        labels=phantom.labels,
        brain_mask=mask,
    )


def slab_affine(shape, voxel_size_mm, oblique_deg=0.0):
    """Voxel -> world affine of a slab centred on the world origin, tilted by ``oblique_deg`` about x.

    A positive angle turns the slab's k axis from world z towards world y
    (axial -> coronal), the usual oblique-axial tilt along the AC-PC line.
    """
    t = np.radians(oblique_deg)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation @ centred_affine(shape, voxel_size_mm)  # a rotation about the origin keeps the centre there


def _box_resample(volume, source_affine, target_affine, target_shape, subsamples):
    """Box-average of ``volume`` over each target voxel: trilinear samples on a sub-grid, then block means.

    Each target voxel is split into ``subsamples`` (per axis) cells whose
    centres are interpolated (order 1) from the source grid; their mean is
    the voxel value (zero outside the source field of view).
    """
    m = np.asarray(subsamples, dtype=np.float64)
    sub_to_target = np.eye(4)
    sub_to_target[:3, :3] = np.diag(1.0 / m)
    sub_to_target[:3, 3] = 0.5 / m - 0.5
    to_source = np.linalg.inv(source_affine) @ target_affine @ sub_to_target
    fine_shape = tuple(int(n * k) for n, k in zip(target_shape, subsamples))
    samples = ndimage.affine_transform(
        volume, to_source[:3, :3], offset=to_source[:3, 3], output_shape=fine_shape, order=1, mode="constant", cval=0.0
    )
    n0, n1, n2 = target_shape
    k0, k1, k2 = subsamples
    return samples.reshape(n0, k0, n1, k1, n2, k2).mean(axis=(1, 3, 5), dtype=np.float32)


def acquire(
    phantom,
    voxel_size_mm=(0.75, 0.75, 2.0),
    oblique_deg=0.0,
    shape=None,
    te_s=(0.004, 0.008, 0.012, 0.016),
    b0_tesla=3.0,
    snr=100.0,
    phase_offset=True,
    seed=0,
):
    """Simulate a (possibly oblique, anisotropic) slab acquisition of a finely sampled phantom.

    The noiseless complex signal of each echo is computed on the phantom's
    grid (B0 along world z), then resampled onto a slab grid tilted by
    ``oblique_deg`` about the x (L-R) axis with voxel size ``voxel_size_mm``:
    each slab voxel is the mean of ceil(slab voxel / phantom voxel) samples
    per axis interpolated trilinearly at the centres of equal sub-cells (a
    box pre-filter over the voxel footprint, so no aliasing and realistic
    intravoxel dephasing). Receive-phase offset and noise are then added on
    the slab. Ground truth chi, fields (same box average) and labels (nearest
    neighbour at the voxel centre) come on the slab grid too.

    Parameters
    ----------
    phantom : HeadPhantom
        Fine phantom (e.g. 0.5-1 mm isotropic, from ``head_phantom``).
    voxel_size_mm : tuple of 3 float, default (0.75, 0.75, 2.0)
        Slab voxel size in mm.
    oblique_deg : float, default 0
        Slab tilt about the x axis in degrees.
    shape : tuple of 3 int or None
        Slab matrix; default: the phantom's field of view divided by the slab
        voxel size, per axis.
    te_s, b0_tesla, snr, phase_offset, seed
        As in ``simulate_gre``.

    Returns
    -------
    SimulatedGRE on the slab grid; ``b0_dir_from_affine(result.affine)``
    equals ``result.b0_dir``.
    """
    te_s = tuple(float(t) for t in te_s)
    voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
    fine_vox = np.asarray(phantom.voxel_size_mm, dtype=np.float64)
    if shape is None:
        fov = np.asarray(phantom.labels.shape) * fine_vox
        shape = tuple(int(round(f / v)) for f, v in zip(fov, voxel_size_mm))
    shape = tuple(int(n) for n in shape)
    affine = slab_affine(shape, voxel_size_mm, oblique_deg)
    subsamples = tuple(int(np.ceil(v / fine_vox.min() - 1e-6)) for v in voxel_size_mm)
    source = np.asarray(phantom.affine, dtype=np.float64)

    def box(volume):
        return _box_resample(volume, source, affine, shape, subsamples)

    to_source = np.linalg.inv(source) @ affine
    labels = ndimage.affine_transform(
        phantom.labels, to_source[:3, :3], offset=to_source[:3, 3], output_shape=shape, order=0, mode="constant"
    )
    mask = np.isin(labels, list(BRAIN_LABELS))
    b_fine = b0_dir_from_affine(source)
    total, brain, background = _field_maps(phantom, b_fine)
    echoes = []
    for te in te_s:
        fine = _echo_signal(phantom.proton_density, phantom.r2star_hz, total, te, b0_tesla)
        echoes.append((box(fine.real) + 1j * box(fine.imag)).astype(np.complex64))
        del fine
    return _acquired(
        echoes,
        snr,
        phase_offset,
        seed,
        te_s=te_s,
        b0_tesla=float(b0_tesla),
        b0_dir=b0_dir_from_affine(affine),
        affine=affine,
        voxel_size_mm=voxel_size_mm,
        total_field_ppm=box(total),
        local_field_ppm=box(brain) * mask,
        background_field_ppm=box(background),
        chi_ppm=box(np.where(phantom.brain_mask, phantom.chi_ppm, 0)) * mask,
        labels=labels,
        brain_mask=mask,
    )
