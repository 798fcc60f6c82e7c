"""Phase scaling, multi-echo field fit and combination, quality and noise maps."""

import logging

import numpy as np
import pytest
from conftest import require_shared

from qsmprep.errors import DataError
from qsmprep.phase import (
    best_phase_exchange,
    fit_total_field_hz,
    invert_phase,
    noise_std_hz,
    phase_quality_map,
    phase_to_rad,
    steep_phase_voxels,
    temporal_fit_residual_rad,
    total_field_hz,
)


# --- scaling ---------------------------------------------------------------------------------

def test_invert_phase_negates_and_wraps_into_minus_pi_to_pi():
    phase = np.array([-np.pi, -1.0, 0.0, 2.5, np.nan], dtype=np.float32)
    inverted = invert_phase(phase)
    assert inverted.dtype == np.float32
    np.testing.assert_allclose(inverted[:4], [-np.pi, 1.0, 0.0, -2.5], atol=1e-6)  # -(-pi) = pi wraps to -pi
    assert np.isnan(inverted[4])
    # the total field of negated phase is the negated field (unwrapping and the echo fit are linear)
    te = [0.004, 0.008, 0.012]
    field = np.linspace(-40, 40, 4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)  # Hz, under half a cycle per echo
    phase = np.stack([np.angle(np.exp(2j * np.pi * field * t)) for t in te], -1).astype(np.float32)
    magnitude, mask = np.ones_like(phase), np.ones(field.shape, bool)
    np.testing.assert_allclose(total_field_hz(invert_phase(phase), te, magnitude, mask),
                               -total_field_hz(phase, te, magnitude, mask), atol=1e-3)


def test_vendor_range_maps_onto_minus_pi_to_pi():
    levels = np.array([-4096, -2048, 0, 2048, 4095], dtype=np.int16)
    rad = phase_to_rad(levels, "arbitrary")
    assert rad.dtype == np.float32
    expected = np.array([-np.pi, -np.pi / 2, 0.0, np.pi / 2, np.pi - 2 * np.pi / 8192])
    np.testing.assert_allclose(rad, expected, atol=1e-6)
    assert rad.min() >= -np.float32(np.pi) and rad.max() < np.float32(np.pi)


def test_unsigned_vendor_range_and_case_insensitive_units():
    rad = phase_to_rad(np.array([0, 2048, 4095]), "Arbitrary", vendor_range=(0, 4095))
    np.testing.assert_allclose(rad, [-np.pi, 0.0, np.pi - 2 * np.pi / 4096], atol=1e-6)


def test_rad_round_trip_and_wrapping():
    rng = np.random.default_rng(0)
    phase = rng.uniform(-np.pi, np.pi, 1000).astype(np.float32)
    np.testing.assert_allclose(phase_to_rad(phase, "rad"), phase, atol=1e-6)
    # values outside [-pi, pi) are wrapped, not clipped; pi itself becomes -pi
    np.testing.assert_allclose(phase_to_rad(np.array([np.pi, 3 * np.pi / 2, -7.0]), "rad"),
                               [-np.pi, -np.pi / 2, -7.0 + 2 * np.pi], atol=1e-6)


def test_data_within_vendor_range_are_not_min_max_rescaled():
    # a phase image using only part of the range keeps its values (QSMxT #149, #160)
    levels = np.array([-1000, 0, 3000])
    np.testing.assert_allclose(phase_to_rad(levels, "arbitrary"), levels * np.pi / 4096, atol=1e-6)


def test_out_of_range_data_fall_back_to_observed_range_with_warning(caplog):
    data = np.array([0.0, 5000.0, 10000.0, np.nan])
    with caplog.at_level(logging.WARNING, logger="qsmprep.phase.scaling"):
        rad = phase_to_rad(data, "arbitrary", source="sub-01_part-phase_MEGRE.nii.gz")
    assert "exceed the vendor range" in caplog.text
    assert "sub-01_part-phase_MEGRE.nii.gz" in caplog.text
    np.testing.assert_allclose(rad[:3], [-np.pi, 0.0, -np.pi], atol=1e-6)  # max -> pi wraps to -pi
    assert np.isnan(rad[3])


def test_float_vendor_range_is_a_continuous_scale():
    rad = phase_to_rad(np.array([-0.5, 0.0, 0.25]), "arbitrary", vendor_range=(-0.5, 0.5))
    np.testing.assert_allclose(rad, [-np.pi, 0.0, np.pi / 2], atol=1e-6)


@pytest.mark.parametrize("units", [None, "", "degrees", "Hz"])
def test_missing_or_unknown_units_raise_dataerror_naming_the_file(units):
    with pytest.raises(DataError) as err:
        phase_to_rad(np.zeros(3), units, source="sub-01_echo-1_part-phase_MEGRE.nii.gz")
    message = str(err.value)
    assert "sub-01_echo-1_part-phase_MEGRE.nii.gz" in message
    assert "Units" in message and "rad" in message and "arbitrary" in message
    assert err.value.exit_code == 65


# --- echo fit ----------------------------------------------------------------------------------

def _multi_echo(te_s, field_hz, offset_rad, magnitude, noise_std, seed=0):
    """Complex multi-echo signal of a field map; returns (wrapped phase, magnitude)."""
    rng = np.random.default_rng(seed)
    te = np.asarray(te_s)
    phase = offset_rad[..., None] + 2 * np.pi * field_hz[..., None] * te
    signal = magnitude * np.exp(1j * phase)
    signal = signal + noise_std * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    return np.angle(signal).astype(np.float32), np.abs(signal).astype(np.float32)


def test_fit_recovers_field_and_offset_from_unwrapped_phase_in_any_echo_order():
    rng = np.random.default_rng(1)
    field = rng.uniform(-80, 80, (8, 8, 8))
    offset = rng.uniform(-1, 1, (8, 8, 8))
    te = np.array([0.003, 0.007, 0.015, 0.02])  # unequal spacing
    phase = offset[..., None] + 2 * np.pi * field[..., None] * te
    mag = np.exp(-te / 0.03) * np.ones(phase.shape)
    perm = [3, 0, 2, 1]
    f, o, r = fit_total_field_hz(phase[..., perm], te[perm], magnitude=mag[..., perm])
    np.testing.assert_allclose(f, field, atol=1e-3)
    np.testing.assert_allclose(o, offset, atol=1e-4)
    assert r.max() < 1e-4
    # a non-linear phase leaves a residual: one echo off by 0.3 rad. The linear part is fitted
    # exactly, so every voxel's residual is that of the 0.3 rad bump alone: the RMS over the
    # 4 equal-weight echoes of its least-squares residual on [1, TE], the same in every voxel
    bent = phase.copy()
    bent[..., 2] += 0.3
    _, _, r = fit_total_field_hz(bent, te)
    bump = np.array([0.0, 0.0, 0.3, 0.0])
    design = np.stack([np.ones(4), te], axis=1)
    coef, *_ = np.linalg.lstsq(design, bump, rcond=None)
    expected = np.sqrt(np.mean((bump - design @ coef) ** 2))
    assert expected == pytest.approx(0.12282046, rel=1e-7)
    np.testing.assert_allclose(r, expected, rtol=1e-5)


def test_fit_single_echo_has_no_offset():
    field = np.full((2, 2, 2), 25.0)
    phase = 2 * np.pi * field * 0.01
    f, o, r = fit_total_field_hz(phase, [0.01])
    np.testing.assert_allclose(f, 25.0, rtol=1e-6)
    assert not o.any() and not r.any()


def test_echo_times_in_milliseconds_are_refused():
    with pytest.raises(DataError, match="milliseconds"):
        fit_total_field_hz(np.zeros((2, 2, 2, 2)), [4.0, 8.0])
    with pytest.raises(DataError, match=r"at most 0.5 s\): BIDS") as refused:  # late, but not milliseconds
        fit_total_field_hz(np.zeros((2, 2, 2, 2)), [0.3, 0.6])
    assert "milliseconds" not in str(refused.value)
    with pytest.raises(DataError, match="one EchoTime per echo"):
        fit_total_field_hz(np.zeros((2, 2, 2, 2)), [0.004])


def _smooth_field_scene(n=48, voxel_size_mm=(1.0, 1.0, 2.0)):
    axes = [(np.arange(n) - n / 2) * d for d in voxel_size_mm]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r2 = (x / 20) ** 2 + (y / 20) ** 2 + (z / 40) ** 2
    mask = r2 < 0.8
    field = 120 * np.exp(-r2 / 0.2) + 40 * x / 20 + 20  # Hz, wraps several times at late echoes
    offset = 0.5 + 0.5 * y / 20
    return field, offset, mask


@pytest.mark.parametrize("unwrap", ["laplacian", "quality"])
def test_total_field_from_wrapped_noisy_echoes_in_scrambled_order(unwrap):
    vox = (1.0, 1.0, 2.0)
    field, offset, mask = _smooth_field_scene(voxel_size_mm=vox)
    te = np.array([0.004, 0.0085, 0.0135, 0.02])
    mag = np.exp(-te / 0.03) * mask[..., None]
    phase, measured_mag = _multi_echo(te, field, offset, mag, noise_std=0.02)
    assert np.ptp(field[mask] * te[-1]) > 2.5  # the last echo wraps more than twice
    perm = [2, 0, 3, 1]
    got = total_field_hz(phase[..., perm], te[perm], measured_mag[..., perm], mask, vox, unwrap=unwrap)
    error = (got - field)[mask]
    # no 2 pi k left anywhere: error is noise only, and the global constant is right too
    assert abs(float(np.median(error))) < 0.1
    assert np.abs(error).max() < 3.0
    assert float(error.std()) < 0.6
    assert not got[~mask].any()


@pytest.mark.parametrize("unwrap", ["laplacian", "quality"])
def test_steep_gradient_that_aliases_in_late_echoes_is_unwrapped_in_time(unwrap):
    # a 400 Hz lobe of 4 mm width, like the field next to a sinus: up to 60 Hz/mm, 1.5 rad per
    # voxel at TE 4 ms but 6 rad at 16 ms, where no spatial unwrapper can recover it
    n, vox = 48, (1.0, 1.0, 1.0)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2] * 3, indexing="ij")
    mask = x**2 + y**2 + z**2 < 20**2
    field = 400 * np.exp(-((x - 12) ** 2 + y**2 + z**2) / (2 * 4.0**2)) + 10 * y / 20
    te = np.array([0.004, 0.008, 0.012, 0.016])
    assert np.abs(np.diff(field, axis=0)).max() * 2 * np.pi * te[-1] > np.pi
    phase, mag = _multi_echo(te, field, np.full(field.shape, 0.3), np.exp(-te / 0.03) * mask[..., None], noise_std=0.01)
    got = total_field_hz(phase, te, mag, mask, vox, unwrap=unwrap)
    error = (got - field)[mask]
    assert np.abs(error - np.median(error)).max() < 2.0  # noise only: a 2 pi error is >= 62 Hz


def test_steep_phase_voxels_flag_jumps_above_two_thirds_pi_of_the_echo_difference():
    n, te = 16, [0.004, 0.008]
    # echo-difference phase change per voxel along i: just under and just over the 2 pi / 3 = 2.09 rad threshold
    steps_rad = np.where(np.arange(n - 1) < 8, 1.9, 2.3)
    field_hz = np.concatenate([[0.0], np.cumsum(steps_rad)]) / (2 * np.pi * 0.004)
    field = field_hz[:, None, None] * np.ones((1, n, n))
    phase = np.stack([np.angle(np.exp(2j * np.pi * field * t + 1j)) for t in te], -1)
    steep = steep_phase_voxels(phase, te)
    np.testing.assert_array_equal(steep[:, 3, 3], np.arange(n) >= 8)  # both ends of every 2.3 rad step
    assert not steep[:8].any()
    # neighbours outside the mask do not count; nothing outside the mask is flagged
    mask = np.zeros(field.shape, dtype=bool)
    mask[:10] = True
    got = steep_phase_voxels(phase, te, mask)
    assert got[8:10].all() and not got[:8].any() and not got[10:].any()
    mask[9] = False
    assert not steep_phase_voxels(phase, te, mask).any()


def test_total_field_single_echo():
    vox = (1.0, 1.0, 2.0)
    field, _, mask = _smooth_field_scene(voxel_size_mm=vox)
    te = [0.01]
    phase, mag = _multi_echo(te, field, np.zeros(field.shape), mask[..., None] * 1.0, noise_std=0.01)
    got = total_field_hz(phase, te, mag, mask, vox, unwrap="quality")
    error = (got - field)[mask]
    # one echo: the field is known up to a global 1/TE = 100 Hz multiple
    assert np.abs(error - np.median(error)).max() < 1.0
    assert abs(np.median(error) / 100 - np.round(np.median(error) / 100)) < 0.01


def _evolving_phase(te_s, snr=None, bipolar_rad=0.0, n=20000, seed=0):
    """(phase, magnitude) of n voxels, (n, E): a field of -60..60 Hz and a random offset, wrapped; complex Gaussian
    noise at ``snr`` (None: none); readout phase offsets alternating +-``bipolar_rad`` times a ramp over the voxels."""
    rng = np.random.default_rng(seed)
    te = np.asarray(te_s)
    field_hz = rng.uniform(-60, 60, n)[:, None]
    ramp = np.linspace(-1, 1, n)[:, None] * bipolar_rad * (-1.0) ** np.arange(te.size)
    magnitude = np.exp(-te / 0.04) * np.ones((n, 1))
    signal = magnitude * np.exp(1j * (rng.uniform(-np.pi, np.pi, (n, 1)) + 2 * np.pi * field_hz * te + ramp))
    if snr:
        signal = signal + (rng.normal(size=signal.shape) + 1j * rng.normal(size=signal.shape)) / snr
    return np.angle(signal), np.abs(signal)


def test_best_phase_exchange_finds_two_exchanged_echoes():
    te = [0.004, 0.008, 0.012, 0.016]
    phase, magnitude = _evolving_phase(te)
    given, pair, exchanged = best_phase_exchange(phase, te, magnitude)
    assert given < 1e-6 and exchanged > 0.2  # noiseless: the given order fits exactly, any exchange far worse
    swapped = phase[:, [0, 2, 1, 3]]
    given, pair, exchanged = best_phase_exchange(swapped, te, magnitude)
    assert pair == (1, 2) and exchanged < 1e-6 and given > 0.2
    # with noise the exchanged order still fits several times better: measured 12.4, 6.2, 3.1 and 2.0 times at SNR
    # 20, 10, 5 and 3 (of the magnitude at TE 0), with the echoes put back fitting to 0.037, 0.073, 0.141, 0.222 rad
    for snr, gain in ((20, 10), (10, 5), (5, 3)):
        phase, magnitude = _evolving_phase(te, snr=snr)
        given, pair, exchanged = best_phase_exchange(phase[:, [0, 1, 3, 2]], te, magnitude)
        assert pair == (2, 3) and given > gain * exchanged and exchanged < 0.15
    assert temporal_fit_residual_rad(phase, te, magnitude) == pytest.approx(exchanged)
    # echo times in any order: the phases follow them, not the column order
    order = [2, 0, 3, 1]
    assert best_phase_exchange(phase[:, order], np.asarray(te)[order], magnitude[:, order])[0] == pytest.approx(
        exchanged)


def test_alternating_readout_offsets_are_not_taken_for_exchanged_echoes():
    """Bipolar readouts add phase offsets that alternate from echo to echo, here a ramp of up to +-0.25..3 rad over
    the voxels. They raise the residual of the right order, and some exchange can fit up to 2.8 times better, but
    poorly (measured: 0.5 rad and more), so the validation's two conditions together never refuse them."""
    from qsmprep.bids.validation import MAX_EXCHANGED_RESIDUAL_RAD, MIN_PHASE_EXCHANGE_GAIN

    gains = []
    for bipolar_rad in np.arange(0.25, 3.01, 0.25):
        for echoes in range(3, 9):
            for spacing in (0.002, 0.004, 0.006):
                te = [spacing * k for k in range(1, echoes + 1)]
                phase, magnitude = _evolving_phase(te, snr=20, bipolar_rad=bipolar_rad, n=5000)
                given, _, exchanged = best_phase_exchange(phase, te, magnitude)
                assert not (given > MIN_PHASE_EXCHANGE_GAIN * exchanged and exchanged < MAX_EXCHANGED_RESIDUAL_RAD)
                gains.append(given / exchanged)
    assert 2 < max(gains) < MIN_PHASE_EXCHANGE_GAIN  # a gain alone comes close (2.85, measured)


def test_phase_exchange_needs_three_echo_times():
    te = [0.004, 0.008]
    phase, magnitude = _evolving_phase(te)
    assert best_phase_exchange(phase[:, ::-1], te, magnitude)[0] < 1e-9  # any two phases fit a line


# --- quality and noise -------------------------------------------------------------------------

def test_noise_std_matches_monte_carlo_spread_of_the_fit():
    te = np.array([0.004, 0.008, 0.012, 0.016])
    shape = (40, 40, 40)
    field = np.full(shape, 5.0)  # no wrap: the fit alone is tested
    amp = np.exp(-te / 0.025) * np.ones(shape + (1,))
    sigma = 0.02
    phase, mag = _multi_echo(te, field, np.full(shape, 0.3), amp, noise_std=sigma, seed=3)
    got, _, _ = fit_total_field_hz(phase, te, magnitude=mag)
    predicted = noise_std_hz(amp, te, magnitude_noise_std=sigma)
    w = np.exp(-te / 0.025) ** 2
    te_w = (w * te).sum() / w.sum()
    analytic = sigma / (2 * np.pi * np.sqrt((w * (te - te_w) ** 2).sum()))
    np.testing.assert_allclose(predicted, analytic, rtol=1e-5)
    assert abs(got.std() / analytic - 1) < 0.05
    # one echo: no offset, lever arm TE
    np.testing.assert_allclose(noise_std_hz(np.ones((1, 1, 1, 1)), [0.01], magnitude_noise_std=0.1),
                               0.1 / (2 * np.pi * 0.01), rtol=1e-5)
    assert np.isinf(noise_std_hz(np.zeros((1, 1, 1, 2)), [0.01, 0.02])).all()


def test_quality_map_separates_smooth_tissue_from_noise():
    n = 32
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2] * 3, indexing="ij")
    head = x**2 + y**2 + z**2 < 12**2
    te = np.array([0.005, 0.01, 0.015])
    field = 20.0 * x / n
    rng = np.random.default_rng(4)
    phase, mag = _multi_echo(te, field, np.zeros(head.shape), head[..., None] * 1.0, noise_std=0.05)
    phase[~head] = rng.uniform(-np.pi, np.pi, (int((~head).sum()), 3))
    q = phase_quality_map(phase, mag, te)
    assert q.dtype == np.float32 and q.min() >= 0 and q.max() <= 1
    inner = x**2 + y**2 + z**2 < 10**2
    assert np.median(q[inner]) > 0.85
    assert np.median(q[~head]) < 0.1


# --- real data ---------------------------------------------------------------------------------

def test_romeo_small_exchanged_phase_images_are_found():
    """Real 7 T data: its phase follows the echo times as given; with two echoes' phase images exchanged, putting
    them back fits 20 times better (measured 0.332 against 0.016 rad)."""
    mag_file, phase_file = require_shared("romeo_small/Mag.nii.gz", "romeo_small/Phase.nii.gz")
    import nibabel as nib

    mag = np.asarray(nib.load(mag_file).dataobj, dtype=np.float64)
    raw = np.asarray(nib.load(phase_file).dataobj, dtype=np.float64)
    extent = np.abs(raw).max()  # phase stored rescaled to about +-0.0037
    phase = phase_to_rad(raw, "arbitrary", vendor_range=(-extent, extent))
    signal = mag[..., 0] > np.median(mag[..., 0])  # as the validation takes it
    te = [0.004, 0.008, 0.012]
    given, pair, exchanged = best_phase_exchange(phase[signal], te, mag[signal])
    # no exchange fits better; exchanging the first and last reverses time, which a line fits as well
    assert given == pytest.approx(0.016, abs=0.002) and pair == (0, 2) and exchanged == pytest.approx(given)
    given, pair, exchanged = best_phase_exchange(phase[signal][:, [0, 2, 1]], te, mag[signal][:, [0, 2, 1]])
    assert pair == (1, 2) and exchanged == pytest.approx(0.016, abs=0.002) and given > 15 * exchanged


def test_romeo_small_laplacian_and_quality_fields_agree():
    mag_file, phase_file = require_shared("romeo_small/Mag.nii.gz", "romeo_small/Phase.nii.gz")
    import nibabel as nib

    mag = np.asarray(nib.load(mag_file).dataobj, dtype=np.float32)
    raw = np.asarray(nib.load(phase_file).dataobj, dtype=np.float64)
    vox = (0.46875, 0.46875, 1.0)
    te = [0.004, 0.008, 0.012]
    extent = np.abs(raw).max()  # phase stored rescaled to about +-0.0037
    phase = phase_to_rad(raw, "arbitrary", vendor_range=(-extent, extent))
    assert phase.min() >= -np.pi and phase.max() < np.pi and np.ptp(phase) > 6.2
    mask = np.ones(phase.shape[:3], dtype=bool)  # the crop lies inside the brain
    lap = total_field_hz(phase, te, mag, mask, vox, unwrap="laplacian")
    qual = total_field_hz(phase, te, mag, mask, vox, unwrap="quality")
    assert np.percentile(np.abs(qual * 2 * np.pi * te[-1]), 99) > np.pi  # the last echo wraps
    diff = lap - qual
    diff -= np.median(diff)
    assert (np.abs(diff) > 1.0).mean() < 0.005  # measured: 0.08% of voxels
    # the fitted field explains the measured wrapped phase: small weighted RMS residual
    model = 2 * np.pi * qual[..., None] * np.asarray(te)
    offset = np.angle((mag**2 * np.exp(1j * (phase - model))).sum(-1))
    residual = np.angle(np.exp(1j * (phase - model - offset[..., None])))
    rms = np.sqrt((mag**2 * residual**2).sum(-1) / (mag**2).sum(-1))
    assert np.median(rms) < 0.03  # measured 0.017 rad
    assert np.percentile(rms, 99) < 0.15
