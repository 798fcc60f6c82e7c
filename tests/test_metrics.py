"""Metrics against hand-computed values on small arrays."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from qsmprep.errors import DataError
from qsmprep.metrics import (
    calcification_moment_error,
    calcification_streak,
    check_label_names,
    deep_gm_label_ids,
    deep_gm_slope,
    evaluate,
    hfen,
    label_means,
    label_stats,
    nrmse,
    nrmse_detrended,
    xsim,
)


@pytest.fixture(scope="module")
def smooth_map():
    rng = np.random.default_rng(0)
    y = gaussian_filter(rng.standard_normal((24, 24, 24)), 2.0)
    return (0.1 * y / y.std()).astype(np.float32)


@pytest.fixture(scope="module")
def mask():
    m = np.zeros((24, 24, 24), bool)
    m[3:21, 4:20, 2:22] = True
    return m


def test_nrmse_identical_zero_scaled_known(smooth_map, mask):
    y = smooth_map
    assert nrmse(y, y, mask) == 0
    # demeaned: 2y - y = y, so the error norm equals the reference norm
    assert nrmse(2 * y, y, mask) == pytest.approx(100.0, rel=1e-6)
    assert nrmse(0.5 * y + 3.0, y, mask) == pytest.approx(50.0, rel=1e-6)
    # without demeaning an offset counts: x = y + c gives 100 c sqrt(n) / ||y||
    c = 0.05
    expected = 100 * c * np.sqrt(mask.sum()) / np.linalg.norm(y[mask].astype(np.float64))
    assert nrmse(y + c, y, mask, demean=False) == pytest.approx(expected, rel=1e-5)


def test_nrmse_detrended_of_affine_copy_is_zero_and_equals_sqrt_one_minus_r2(smooth_map, mask):
    y = smooth_map
    assert nrmse_detrended(-2.5 * y + 0.7, y, mask) == pytest.approx(0.0, abs=1e-4)
    # exact hand value: y + orthogonal noise n (zero mean, n _|_ y in the mask)
    rng = np.random.default_rng(1)
    yv = y[mask].astype(np.float64) - y[mask].mean()
    n = rng.standard_normal(yv.size)
    n -= n.mean()
    n -= n @ yv / (yv @ yv) * yv
    n *= 0.5 * np.linalg.norm(yv) / np.linalg.norm(n)  # ||n|| = ||y||/2
    x = np.zeros_like(y, dtype=np.float64)
    x[mask] = yv + n
    # r^2 = 1 / (1 + 1/4) -> 100 sqrt(1 - r^2) = 100 / sqrt(5)
    assert nrmse_detrended(x, y, mask) == pytest.approx(100 / np.sqrt(5), rel=1e-6)
    # the demeaned NRMSE of the same map is 50
    assert nrmse(x, y, mask) == pytest.approx(50.0, rel=1e-6)


def test_hfen_identical_zero_and_scaled_known(smooth_map, mask):
    y = smooth_map
    assert hfen(y, y, mask) == 0
    # LoG is linear: demeaned (3y) - y = 2 y -> 200 %
    assert hfen(3 * y, y, mask) == pytest.approx(200.0, rel=1e-6)


def test_values_outside_the_mask_are_never_read(smooth_map, mask):
    """NaN outside the mask, as many tools write, made HFEN NaN (through x * mask) and qsmprep-eval's JSON invalid."""
    y = smooth_map
    x = 0.8 * y
    expected = {name: metric(x, y, mask) for name, metric in (("nrmse", nrmse), ("hfen", hfen), ("xsim", xsim))}
    assert expected["hfen"] == pytest.approx(20.0, rel=1e-6)  # LoG is linear: 0.8 y - y
    dirty_x, dirty_y = x.copy(), y.copy()
    dirty_x[~mask], dirty_y[~mask] = np.nan, np.inf
    for name, metric in (("nrmse", nrmse), ("hfen", hfen), ("xsim", xsim)):
        assert metric(dirty_x, dirty_y, mask) == pytest.approx(expected[name], rel=1e-12), name


def test_xsim_identical_one_noise_lower(smooth_map, mask):
    y = smooth_map
    assert xsim(y, y, mask) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(2)
    small = xsim(y + 0.01 * rng.standard_normal(y.shape), y, mask)
    large = xsim(y + 0.05 * rng.standard_normal(y.shape), y, mask)
    assert 1.0 > small > large > 0.0
    # an offset does not count (demeaned) unless asked
    assert xsim(y + 0.3, y, mask) == pytest.approx(1.0, abs=1e-12)
    assert xsim(y + 0.3, y, mask, demean=False) < 0.9


def test_xsim_constant_maps_hand_value():
    # x = a, y = b constant everywhere: variances and covariance vanish, so
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = 1e-4 (L = 1, K1 = 0.01)
    shape = (9, 9, 9)
    a, b = 0.2, 0.1
    value = xsim(np.full(shape, a), np.full(shape, b), np.ones(shape), demean=False)
    assert value == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rel=1e-9)


@pytest.mark.parametrize("axis", [0, 2])
def test_hfen_of_cosines_follows_the_log_frequency_response(axis):
    # y_m = cos(pi m (i + 1/2) / N) along one axis is an eigenfunction of every symmetric filter
    # under scipy.ndimage's half-sample 'reflect' boundary, with zero mean, so
    # HFEN(y_2 + 0.1 y_8, y_2) = 100 * 0.1 * |g(w_8)| / |g(w_2)| exactly, g the filter's response.
    # For the continuous LoG of width sigma, g(w) = -w^2 exp(-w^2 sigma^2 / 2), w_m = pi m / N:
    # 83.48 % for N = 32, sigma = 1.5 (the 2016 challenge's LoG width; the identity filter gives
    # 10 %, sigma 1.0 gives 119.8 % and sigma 2.0 gives 50.4 %). The metric's kernel is sampled
    # and truncated at 4 sigma (scipy's default, 13 taps; the challenge used 15); the truncated
    # second-derivative kernel sums to -1e-4 instead of 0, which shifts each eigenvalue by about
    # that much on every axis, 0.3-0.8 % of g(w_2) = -0.037. Measured 83.07 % (-0.5 %), so 2 %.
    n, sigma = 32, 1.5
    shape = [4, 4, 4]
    shape[axis] = n
    along = [1, 1, 1]
    along[axis] = n

    def cosine(m):
        return np.cos(np.pi * m * (np.arange(n) + 0.5) / n).reshape(along) * np.ones(shape)

    def g(m):
        w = np.pi * m / n
        return w**2 * np.exp(-(w**2) * sigma**2 / 2)

    expected = 100 * 0.1 * g(8) / g(2)
    assert expected == pytest.approx(83.48, abs=0.01)
    assert hfen(cosine(2) + 0.1 * cosine(8), cosine(2), np.ones(shape)) == pytest.approx(expected, rel=0.02)


def _skimage_ssim_map(x, y):
    from skimage.metrics import structural_similarity

    # Wang 2004 SSIM with the QSM challenge 2.0 constants: L = 1, K = (0.01, 0.001), Gaussian
    # window sigma 1.5 (skimage truncates it at 3.5 sigma: radius 5, 11^3), population covariance
    _, ssim_map = structural_similarity(
        x, y, K1=0.01, K2=0.001, sigma=1.5, gaussian_weights=True, use_sample_covariance=False,
        data_range=1.0, full=True,
    )  # fmt: skip
    return ssim_map


@pytest.fixture(scope="module")
def padded_pair():
    """Random smooth ref in [-0.1, 0.2] ppm and a degraded recon (20^3) zero-padded by 10 voxels.

    The padding keeps every window that reaches an evaluated voxel inside the array, so the
    border handling (skimage 'reflect', qsmprep 'nearest') never enters.
    """
    rng = np.random.default_rng(5)
    core, pad = (20, 20, 20), 10

    def smooth01():
        a = gaussian_filter(rng.standard_normal(core), 1.5)
        return (a - a.min()) / np.ptp(a)

    y = -0.1 + 0.3 * smooth01()
    x = 0.6 * y + 0.1 * (smooth01() - 0.5) + 0.02
    inner = np.zeros(np.add(core, 2 * pad), bool)
    inner[pad:-pad, pad:-pad, pad:-pad] = True
    return np.pad(x, pad), np.pad(y, pad), inner


def test_xsim_matches_skimage_ssim_with_challenge_constants(padded_pair):
    x, y, inner = padded_pair
    # without demeaning: the same formula on the same maps; the mean over the mask of skimage's
    # SSIM map (radius 5 window, hence radius_vox=5) agrees to rounding
    expected = _skimage_ssim_map(x, y)[inner].mean()
    assert 0.7 < expected < 0.9  # structure and variance differ: not a trivial value
    assert xsim(x, y, inner, radius_vox=5, demean=False) == pytest.approx(expected, rel=1e-9)
    # with demeaning (the default): skimage on maps demeaned in the mask and zeroed outside
    xd = (x - x[inner].mean()) * inner
    yd = (y - y[inner].mean()) * inner
    expected = _skimage_ssim_map(xd, yd)[inner].mean()
    assert 0.6 < expected < 0.75
    assert xsim(x, y, inner, radius_vox=5) == pytest.approx(expected, rel=1e-9)


def test_xsim_default_window_is_the_7_cubed_gaussian(padded_pair):
    # skimage cannot shorten its window, so the default (sigma 1.5 truncated at 3 voxels, 7^3
    # weights exp(-|d|^2 / 2 sigma^2) normalised) is summed here offset by offset
    x, y, inner = padded_pair
    r, sigma = 3, 1.5
    offsets = np.arange(-r, r + 1)
    w = np.exp(-(offsets**2) / (2 * sigma**2))
    w /= w.sum()
    n = x.shape[0]

    def window(a):
        padded = np.pad(a, r)
        out = np.zeros_like(a)
        for i in offsets:
            for j in offsets:
                for k in offsets:
                    shifted = padded[r + i : r + i + n, r + j : r + j + n, r + k : r + k + n]
                    out += w[i + r] * w[j + r] * w[k + r] * shifted
        return out

    mx, my = window(x), window(y)
    vx, vy, cxy = window(x * x) - mx**2, window(y * y) - my**2, window(x * y) - mx * my
    c1, c2 = 0.01**2, 0.001**2
    ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert xsim(x, y, inner, demean=False) == pytest.approx(ssim_map[inner].mean(), rel=1e-9)


def test_empty_mask_raises(smooth_map):
    with pytest.raises(DataError, match="empty"):
        nrmse(smooth_map, smooth_map, np.zeros(smooth_map.shape))


def test_label_means_exact():
    chi = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    labels = np.zeros((2, 3, 4), int)
    labels[0, 0, :2] = 1  # values 0, 1
    labels[1, 2, :] = 2  # values 20..23
    means = label_means(chi, labels, [1, 2, 7])
    assert means[1] == 0.5 and means[2] == 21.5
    assert np.isnan(means[7])


def _label_phantom(shape=(30, 30, 30)):
    labels = np.zeros(shape, int)
    for i in range(5):
        labels[2 + 5 * i : 6 + 5 * i, 5:12, 5:12] = i + 1
    true_means = np.array([0.05, 0.1, 0.15, 0.2, 0.02])
    ref = np.zeros(shape)
    for i, v in enumerate(true_means):
        ref[labels == i + 1] = v
    return labels, ref


def test_deep_gm_slope_of_linear_relation_exact():
    labels, ref = _label_phantom()
    rng = np.random.default_rng(3)
    recon = 0.7 * ref + 0.03
    # zero-mean texture inside each label leaves the label means unchanged
    texture = rng.standard_normal(ref.shape)
    for lab in range(1, 6):
        sel = labels == lab
        texture[sel] -= texture[sel].mean()
    recon[labels > 0] += 0.01 * texture[labels > 0]
    assert deep_gm_slope(recon, ref, labels, [1, 2, 3, 4, 5]) == pytest.approx(0.7, rel=1e-9)
    with pytest.raises(DataError):
        deep_gm_slope(recon, ref, labels, [1, 9])


def test_deep_gm_slope_names_the_labels_it_leaves_out_once(caplog):
    """qsmprep-eval --deep-gm-labels 1 2 3 on a map without label 2 warned "label 2 has no voxel" twice."""
    labels, ref = _label_phantom()
    assert deep_gm_slope(0.5 * ref, ref, labels, [1, 8, 2, 9]) == pytest.approx(0.5, rel=1e-9)
    assert [r.getMessage() for r in caplog.records] == [
        "deep grey matter slope: label(s) 8, 9 have no voxel and are left out"]


def test_deep_gm_label_ids_from_names():
    names = {1: "Caudate", 2: "putamen", 3: "Globus_Pallidus", 4: "white matter", 5: "red-nucleus", 6: "CSF"}
    assert deep_gm_label_ids(names) == [1, 2, 3, 5]


def test_deep_gm_label_ids_match_whole_words():
    """Names were matched by substring: the hypothalamus, the epithalamus and the dentate gyrus went into the
    slope as deep grey matter nuclei."""
    nuclei = ["Left-Caudate", "Right-Putamen", "Left-Pallidum", "Left-Thalamus-Proper", "Right-Thalamus",
              "Left-Substancia-Nigra", "substantia_nigra", "SN", "SN and STN", "red_nucleus", "RedNucleus",
              "dentate_nucleus", "Left_Dentate", "subthalamic nucleus", "CAUDATE"]
    others = ["Left-Hypothalamus", "Epithalamus", "dentate_gyrus", "CA4-dentate-gyrus", "Metathalamus",
              "Left-Cerebral-White-Matter", "Snout", "Left-VentralDC", "Left-Hippocampus"]
    names = dict(enumerate(nuclei + others, start=1))
    assert [names[i] for i in deep_gm_label_ids(names)] == nuclei


def test_check_label_names_refuses_names_that_share_a_key():
    check_label_names({1: "caudate", 2: "putamen", 3: "3", 4: "04"})  # its own number, or not a key's spelling
    with pytest.raises(DataError, match=r"^dseg.tsv: labels 1 and 2 are both named 'caudate'"):
        check_label_names({1: "caudate", 2: "caudate"}, source="dseg.tsv")
    with pytest.raises(DataError, match=r"^label names: label 1 is named '2', which is how label 2 is reported"):
        check_label_names({1: "2"})
    with pytest.raises(DataError, match="labels 1 and 2 are both named 'caudate'"):  # evaluate checks them too
        evaluate(*_label_phantom()[::-1], np.ones((30, 30, 30)), labels=_label_phantom()[0],
                 label_names={1: "caudate", 2: "caudate"})


def test_label_stats_of_ids_beyond_float32_and_bincount():
    """np.bincount over the IDs needed an array as long as the largest ID (2**62: refused; 2**31 - 1: 16 GiB)."""
    labels = np.array([[0, 2**62, 2**62], [2**24, 2**24 + 1, 2**24 + 1]], np.int64)
    chi = np.array([[9.0, 1.0, 2.0], [3.0, 4.0, 6.0]])
    ids, counts, (means, doubled) = label_stats(labels, chi, 2 * chi)
    assert ids.tolist() == [0, 2**24, 2**24 + 1, 2**62] and counts.tolist() == [1, 1, 2, 2]
    assert means.tolist() == [9.0, 3.0, 5.0, 1.5] and doubled.tolist() == [18.0, 6.0, 10.0, 3.0]
    assert label_means(chi, labels, [2**62, 7]) == {2**62: 1.5, 7: pytest.approx(float("nan"), nan_ok=True)}
    labels3d, ref = _label_phantom()
    labels3d[labels3d == 5] = 2**62  # a label the slope does not use
    result = evaluate(0.5 * ref, ref, np.ones(ref.shape), labels=labels3d, deep_gm_labels=[1, 2, 3, 4])
    assert result["label_means_ppm"][str(2**62)] == {"recon": pytest.approx(0.01, rel=1e-12),
                                                     "ref": pytest.approx(0.02, rel=1e-12), "voxels": 4 * 7 * 7}
    assert result["deep_gm_slope"] == pytest.approx(0.5, rel=1e-9)


def test_evaluate_takes_whole_number_labels_only():
    """evaluate rounded a float label map, so a probability map (0.4, 0.6) became labels 0 and 1 without a word,
    where qsmprep-eval refused it."""
    labels, ref = _label_phantom()
    as_float = evaluate(0.5 * ref, ref, np.ones(ref.shape), labels=labels.astype(np.float32))  # as NIfTI stores many
    assert as_float["label_means_ppm"] == evaluate(0.5 * ref, ref, np.ones(ref.shape), labels=labels)["label_means_ppm"]
    for bad, words in ((0.4 * labels, "non-integer values"), (np.where(labels == 1, np.nan, labels), "non-integer"),
                       (-labels, "negative labels")):
        with pytest.raises(DataError, match=f"label map holds {words}"):
            evaluate(0.5 * ref, ref, np.ones(ref.shape), labels=bad)


def test_evaluate_deep_gm_slope_needs_two_labels_found_by_name_or_given(caplog):
    """With one nucleus among the names the whole evaluation raised; it is skipped now, with a warning, and raises
    only for labels the caller gave."""
    labels, ref = _label_phantom()
    m = np.ones(ref.shape)
    names = {1: "caudate", 2: "white matter", 3: "Left-Hypothalamus", 4: "cortex", 5: "CSF"}
    result = evaluate(0.5 * ref, ref, m, labels=labels, label_names=names)
    assert result["deep_gm_slope"] is None and result["deep_gm_labels"] == ["caudate"]
    assert result["nrmse_pct"] == pytest.approx(50.0, rel=1e-6) and len(result["label_means_ppm"]) == 5
    assert "deep grey matter slope skipped" in caplog.text
    names[3] = "Left-Thalamus"
    result = evaluate(0.5 * ref, ref, m, labels=labels, label_names=names)
    assert result["deep_gm_labels"] == ["caudate", "Left-Thalamus"]
    assert result["deep_gm_slope"] == pytest.approx(0.5, rel=1e-9)
    with pytest.raises(DataError, match=r"^--deep-gm-labels: .* found 1 \(1\): give two or more of the labels the "
                                        r"label map has inside the mask \(1, 2, 3, 4, 5\)"):
        evaluate(0.5 * ref, ref, m, labels=labels, deep_gm_labels=[1, 9])
    assert "deep_gm_slope" not in evaluate(0.5 * ref, ref, m, labels=labels)  # neither names nor labels: not tried


def _calcification_phantom(shape=(40, 40, 40)):
    """A -1.5 ppm ball (radius 3) in smooth texture of ~0.02 ppm; the texture
    is zero in the evaluation box (the ball's bounding box grown by 3 voxels)
    so that only the ball is more diamagnetic than the surroundings."""
    rng = np.random.default_rng(4)
    texture = gaussian_filter(rng.standard_normal(shape), 2.0)
    ref = 0.02 * texture / texture.std()
    offsets = np.indices(shape) - (np.array(shape) // 2)[:, None, None, None]
    ref[np.abs(offsets).max(axis=0) <= 6] = 0.0
    calc = (offsets**2).sum(axis=0) <= 9
    ref[calc] = -1.5
    return ref, calc


def test_calcification_moment_error_of_scaled_copy():
    ref, calc = _calcification_phantom()
    assert calcification_moment_error(ref, ref, calc) == pytest.approx(0.0, abs=1e-12)
    # a scaled copy: the segmentation finds the calcification again (its
    # surroundings scale too), so the moment scales: error |s - 1|
    assert calcification_moment_error(0.6 * ref, ref, calc) == pytest.approx(0.4, rel=1e-9)
    assert calcification_moment_error(1.25 * ref, ref, calc) == pytest.approx(0.25, rel=1e-9)


def test_calcification_moment_counts_smeared_voxels():
    ref, calc = _calcification_phantom()
    recon = ref.copy()
    # smearing: a neighbour of the calcification becomes more diamagnetic
    # than anything in the shell; it is counted in the moment
    ring = (gaussian_filter(calc.astype(float), 1.0) > 0.05) & ~calc
    recon[ring] = -0.5
    expected = abs(recon[calc | ring].sum() - ref[calc].sum()) / abs(ref[calc].sum())
    assert calcification_moment_error(recon, ref, calc) == pytest.approx(expected, rel=1e-9)


def test_calcification_streak_zero_for_affine_and_known_for_checkerboard():
    ref, calc = _calcification_phantom()
    assert calcification_streak(2 * ref + 0.01, ref, calc) == pytest.approx(0.0, abs=1e-9)
    # a +-e checkerboard outside the calcification: in the rim the fit on ref
    # removes almost nothing, the residual std is ~e and the calcification
    # mean stays -1.5, so the level is ~e / 1.5
    e = 0.03
    i, j, k = np.indices(ref.shape)
    checker = np.where((i + j + k) % 2 == 0, e, -e) * ~calc
    value = calcification_streak(ref + checker, ref, calc)
    assert value == pytest.approx(e / 1.5, rel=0.02)


def test_evaluate_collects_all_metrics():
    ref, calc = _calcification_phantom((24, 24, 24))
    labels = np.zeros(ref.shape, int)
    labels[4:8, 4:8, 4:8] = 1
    labels[4:8, 14:18, 4:8] = 2
    labels[14:18, 4:8, 14:18] = 3
    labels[calc] = 9
    m = np.ones(ref.shape, bool)
    recon = 0.8 * ref
    names = {1: "putamen", 2: "caudate", 3: "thalamus", 9: "calcification"}
    result = evaluate(recon, ref, m, labels=labels, label_names=names, calc_label=9)
    assert result["nrmse_pct"] == pytest.approx(20.0, rel=1e-6)
    assert result["nrmse_detrended_pct"] == pytest.approx(0.0, abs=1e-4)
    assert result["hfen_pct"] == pytest.approx(20.0, rel=1e-6)
    assert result["xsim"] == pytest.approx(xsim(recon, ref, m), rel=1e-12)  # with the challenge's settings
    assert result["deep_gm_slope"] == pytest.approx(0.8, rel=1e-9)
    assert result["calcification_moment_error"] == pytest.approx(0.2, rel=1e-9)
    assert result["calcification_streak"] == pytest.approx(0.0, abs=1e-9)
    assert result["label_means_ppm"]["putamen"]["ref"] == pytest.approx(ref[labels == 1].mean())
    assert result["label_means_ppm"]["putamen"]["recon"] == pytest.approx(0.8 * ref[labels == 1].mean())
    assert result["label_means_ppm"]["putamen"]["voxels"] == 64
    assert set(evaluate(recon, ref, m)) == {"nrmse_pct", "nrmse_detrended_pct", "hfen_pct", "xsim"}


def test_calcification_metrics_need_surroundings_and_a_moment():
    ref, calc = _calcification_phantom((12, 12, 12))  # the box grown by 3 voxels reaches every edge
    for metric in (calcification_moment_error, calcification_streak):
        with pytest.raises(DataError, match="no surrounding tissue"):
            metric(ref, ref, calc)
    ref, calc = _calcification_phantom()
    ref[calc] = 0.0
    with pytest.raises(DataError, match="sums to 0"):
        calcification_moment_error(ref, ref, calc)
