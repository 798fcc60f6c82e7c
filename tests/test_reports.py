"""Per-subject HTML report: figures, content, and that a real browser loads every image."""

import io
import re
import shutil
import subprocess

import numpy as np
import pytest

from qsmprep.io import save_nifti
from qsmprep.physics import ras_voxel_size, to_ras
from qsmprep.reports import build_subject_report
from qsmprep.reports.report import (
    chimap_percentiles,
    inference_device_text,
    paramagnetic_tail_ratio,
    polarity_warning,
    run_mosaic,
    single_echo,
)
from qsmprep.reports.mosaic import (
    comparison_png,
    in_plane_box,
    mosaic_png,
    orthogonal_slices,
    robust_window,
    slice_indices,
)


def test_slice_indices_span_the_mask():
    mask = np.zeros((10, 10, 40), bool)
    mask[2:8, 2:8, 10:31] = True
    idx = slice_indices(mask, n_slices=5)
    assert idx[0] == 12 and idx[-1] == 28 and len(idx) == 5


def test_in_plane_box_frames_the_mask_with_a_margin():
    mask = np.zeros((100, 120, 40), bool)
    mask[20:60, 10:110, 5:30] = True  # 40 x 100 voxels in plane
    assert in_plane_box(mask) == (slice(14, 66), slice(0, 120))  # 15 %: 6 voxels; 15 clipped at the grid's edge
    assert in_plane_box(mask, axis=0, margin=0.0) == (slice(8, 112), slice(3, 32))  # at least 2 voxels a side
    assert in_plane_box(np.zeros((8, 9, 4))) == (slice(0, 8), slice(0, 9))  # empty: the whole plane
    thin = np.zeros((20, 30, 10), bool)
    thin[5, 5:15, 2:8] = True  # one voxel wide in plane: still a panel of 5 voxels, at least 2 a side
    assert in_plane_box(thin) == (slice(3, 8), slice(3, 17))
    assert run_mosaic(thin)(thin.astype(np.float32), outline=thin)[:8] == b"\x89PNG\r\n\x1a\n"  # the outline draws


def test_run_figures_show_eight_cropped_slices_in_two_rows_of_four():
    import matplotlib.image

    mask = np.zeros((100, 60, 30), bool)
    mask[30:70, 10:50, 5:25] = True  # a 40 x 40 voxel box in a 100 x 60 plane

    def render(value, **options):
        png = run_mosaic(mask)(np.full(mask.shape, value, np.float32), window=(-1, 1), **options)
        return matplotlib.image.imread(io.BytesIO(png))[..., :3]

    panels = _panels(render(-1.0), render(1.0))
    assert len(panels) == 8
    assert len({rows.start for rows, _ in panels}) == 2 and len({cols.start for _, cols in panels}) == 4
    rows, cols = panels[0]
    # each panel shows the box grown by 6 voxels a side (52 x 52), not the 100 x 60 plane
    assert (rows.stop - rows.start) == pytest.approx(cols.stop - cols.start, abs=2)
    whole = _panels(render(-1.0, crop=None), render(1.0, crop=None))[0]
    assert (whole[1].stop - whole[1].start) / (whole[0].stop - whole[0].start) == pytest.approx(100 / 60, rel=0.05)
    # drawn to scale: voxels twice as long front to back make the square box twice as tall as wide
    rows, cols = _panels(render(-1.0, voxel_size=(1.0, 2.0, 1.0)), render(1.0, voxel_size=(1.0, 2.0, 1.0)))[0]
    assert (rows.stop - rows.start) / (cols.stop - cols.start) == pytest.approx(2.0, rel=0.05)


def test_orthogonal_slices_pass_through_the_mask_centre_demeaned():
    mask = np.zeros((20, 30, 40), bool)
    mask[4:9, 10:21, 20:31] = True  # centre (6, 15, 25)
    volume = np.full(mask.shape, 7.0)
    volume[6, 15, 25] = 7.0 + 100.0
    axial, coronal, sagittal = orthogonal_slices(volume, mask)
    assert axial.shape == (20, 30) and coronal.shape == (20, 40) and sagittal.shape == (30, 40)
    offset = 100.0 / mask.sum()  # the demeaning of one bright voxel
    assert axial[6, 15] == coronal[6, 25] == sagittal[15, 25] == pytest.approx(100.0 - offset, rel=1e-5)
    assert axial[5, 12] == pytest.approx(-offset, rel=1e-4)  # inside: 7 - mean
    assert axial[0, 0] == 0 and sagittal[0, 0] == 0  # outside the mask


def test_comparison_png_has_a_row_per_map():
    import matplotlib.image

    mask = np.zeros((16, 16, 16), bool)
    mask[4:12, 4:12, 4:12] = True
    maps = {"a": np.random.default_rng(0).normal(size=mask.shape), "b": np.zeros(mask.shape)}
    one = matplotlib.image.imread(io.BytesIO(comparison_png({"a": maps["a"]}, mask)), format="png")
    two = matplotlib.image.imread(io.BytesIO(comparison_png(maps, mask)), format="png")
    assert abs(one.shape[1] - two.shape[1]) < 0.05 * one.shape[1] and two.shape[0] > 1.6 * one.shape[0]


@pytest.mark.parametrize(
    ("low", "high", "half"),
    [
        (-1.0, 3.0, 2.92),  # 98th percentile of a uniform ramp on [-1, 3]: -1 + 4 * 0.98
        (-3.0, 1.0, 2.92),  # the negative side dominates: 2nd percentile -3 + 4 * 0.02 = -2.92
    ],
)
def test_robust_window_is_symmetric_about_the_larger_side(low, high, half):
    vol = np.linspace(low, high, 1000).reshape(10, 10, 10)
    assert robust_window(vol, np.ones_like(vol)) == pytest.approx((-half, half), abs=1e-9)


def test_robust_window_ignores_voxels_outside_the_mask():
    vol = np.concatenate([np.linspace(-1, 3, 1000), np.full(1000, 1e6)]).reshape(10, 10, 20)
    mask = np.arange(2000).reshape(vol.shape) < 1000  # the ramp only
    assert robust_window(vol, mask) == pytest.approx((-2.92, 2.92), abs=1e-9)
    assert robust_window(vol, np.zeros_like(mask)) == (-1.0, 1.0)  # empty mask: a unit window
    assert robust_window(np.zeros((4, 4, 4)), np.ones((4, 4, 4))) == (-1e-6, 1e-6)  # never a zero-width window


def _panels(png_low, png_high):
    """Pixel boxes (rows, cols) of the image panels, row by row, left to right: where an all-low and an all-high
    volume differ."""
    from scipy import ndimage

    differ = np.abs(png_low - png_high).max(axis=-1) > 0
    labels, n = ndimage.label(differ)
    boxes = sorted(ndimage.find_objects(labels), key=lambda box: (box[0].start, box[1].start))
    return [box for box in boxes if (box[0].stop - box[0].start) > 20]  # drop specks of anti-aliasing


def test_mosaic_shows_a_bright_block_where_it_is_at_the_top_of_the_colour_map():
    import matplotlib
    import matplotlib.image

    def render(vol):
        png = mosaic_png(vol, [1, 2], window=(-1.0, 1.0), cmap="RdBu_r")
        return matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]

    background = np.full((16, 16, 4), -1.0, np.float32)  # the bottom of the window
    low, high = render(background), render(-background)
    panels = _panels(low, high)
    assert len(panels) == 2  # one per slice, left to right
    # a block 4 voxels wide (x = 0..3) and 8 tall (y = 8..15), brighter than the window, in slice 2 only
    vol = background.copy()
    vol[0:4, 8:16, 2] = 5.0
    image = render(vol)
    changed = np.abs(image - low).max(axis=-1) > 0.02
    rows, cols = panels[1]
    height, width = rows.stop - rows.start, cols.stop - cols.start
    assert abs(height - width) <= 2  # square voxels, square panel
    assert not changed[panels[0]].any() and changed.sum() == changed[panels[1]].sum()
    # x runs left to right, y bottom to top: the block fills the left quarter of the upper half
    r, c = np.nonzero(changed)
    assert abs(r.min() - rows.start) <= 1 and abs(r.max() + 1 - (rows.start + height / 2)) <= 1.5
    assert abs(c.min() - cols.start) <= 1 and abs(c.max() + 1 - (cols.start + width / 4)) <= 1.5
    top, bottom = (np.asarray(matplotlib.colormaps["RdBu_r"](v)[:3]) for v in (1.0, 0.0))
    inner = image[rows.start + 2:rows.start + height // 2 - 2, cols.start + 2:cols.start + width // 4 - 2]
    np.testing.assert_allclose(inner.reshape(-1, 3), np.broadcast_to(top, (inner.size // 3, 3)), atol=1 / 255)
    rest = image[rows.start + height // 2 + 2:rows.stop - 2, cols.start + 2:cols.stop - 2]
    np.testing.assert_allclose(rest.reshape(-1, 3), np.broadcast_to(bottom, (rest.size // 3, 3)), atol=1 / 255)


def _report_mask():
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 24, 20)], indexing="ij")
    return (x**2 + y**2 + z**2) < 0.6


@pytest.fixture
def report_dir(tmp_path):
    shape = (24, 24, 20)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = _report_mask()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, data in {
        "mask": mask, "magnitude": np.exp(-(x**2)) * 100, "total_field": 30 * z,
        "local_field": 0.02 * x * mask, "chi_tkd": 0.1 * y * mask, "chi_ilsqr": 0.1 * x * mask,
    }.items():
        paths[name] = save_nifti(tmp_path / "in" / f"{name}.nii.gz", data, affine)
    runs = [
        {"name": "sub-01_ses-a", "mask": paths["mask"], "magnitude": paths["magnitude"],
         "total_field": paths["total_field"], "local_field": paths["local_field"],
         "chimaps": {"tkd": paths["chi_tkd"], "ilsqr": paths["chi_ilsqr"]}},
        {"name": "sub-01_ses-b", "mask": paths["mask"], "chimaps": {"tkd": paths["chi_tkd"]}},
    ]
    out = tmp_path / "derivatives"
    page = build_subject_report(out, "01", runs, methods_text="Phase was unwrapped [1].", command="qsmprep in out participant",
                                log_dir=out / "logs" / "20261123-120000_abcd")
    return out, page


def test_each_run_opens_with_a_summary_of_its_grid_echoes_and_mask(tmp_path):
    import json

    shape = (12, 12, 8)
    mask = np.zeros(shape, bool)
    mask[1:11, 1:11, 1:7] = True  # 600 voxels of 2 x 2 x 2.5 mm = 10 mm^3: 6 ml
    chi = np.zeros(shape, np.float32)
    chi[mask] = np.linspace(-0.1, 0.1, 600)  # 1st and 99th percentiles -0.098 and 0.098 ppm
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    paths = {name: save_nifti(tmp_path / f"{name}.nii.gz", data, affine) for name, data in (("mask", mask), ("chi", chi))}
    tilt = np.radians(20)
    (tmp_path / "mask.json").write_text(json.dumps({"EchoTime": [0.00492, 0.01007, 0.01522], "MagneticFieldStrength": 7,
                                                    "PhaseInverted": True, "MRAcquisitionType": "2D",
                                                    "MagneticFieldStrengthSource": "ImagingFrequency"}))
    (tmp_path / "chi.json").write_text(json.dumps({"B0Direction": [0, np.sin(tilt), np.cos(tilt)]}))
    text = build_subject_report(tmp_path / "out", "01", [{"name": "sub-01", "mask": paths["mask"],
                                                          "chimaps": {"tkd": paths["chi"]}}]).read_text()
    assert "<th>Grid</th><td>12 x 12 x 8 voxels of 2 x 2 x 2.5 mm</td>" in text
    assert "<th>Echo times</th><td>4.92, 10.07, 15.22 ms (3 echoes)</td>" in text  # it showed 10.1 and 15.2
    assert "<th>Field strength</th><td>7 T (from ImagingFrequency)</td>" in text
    assert "<th>Acquisition</th><td>2D multi-slice: each slice can carry its own phase offset" in text
    assert "<th>Phase</th><td>negated before processing (--invert-phase)</td>" in text
    # B0 tilted 20 degrees in voxel coordinates while the affine is not: the direction was given with --b0-dir
    assert ("<th>B0 direction</th><td>20.0 degrees from the third voxel axis (given with --b0-dir; the image "
            "orientation gives 0.0 degrees)</td>") in text
    assert "<th>Brain mask</th><td>6 ml (600 voxels)" in text
    assert "in the brain mask its 1st to 99th percentile is -0.098 to 0.098 ppm" in text
    # axes stored in another order (a sagittal slab): the grid as stored, not its RAS matrix with stored voxel sizes
    permuted = np.array([[0, 0, 2.5, 0], [2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]])  # stored i, j, k -> A, S, R
    stored = save_nifti(tmp_path / "stored.nii.gz", np.transpose(mask, (1, 2, 0)), permuted)
    text = build_subject_report(tmp_path / "out", "01", [{"name": "sub-01", "mask": stored, "chimaps": {}}]).read_text()
    assert "<th>Grid</th><td>12 x 8 x 12 voxels of 2 x 2 x 2.5 mm</td>" in text
    # sidecars edited by hand into other types, or none at all (a run made elsewhere): what the images say
    (tmp_path / "mask.json").write_text(json.dumps({"EchoTime": "4 ms", "MagneticFieldStrength": "3T",
                                                    "MRAcquisitionType": ["2D"]}))
    (tmp_path / "chi.json").write_text(json.dumps({"B0Direction": [0, 0]}))
    for _ in range(2):
        text = build_subject_report(tmp_path / "out", "01", [{"name": "sub-01", "mask": paths["mask"],
                                                              "chimaps": {"tkd": paths["chi"]}}]).read_text()
        assert "<th>Grid</th>" in text and "<th>Brain mask</th>" in text
        assert all(f"<th>{row}</th>" not in text
                   for row in ("Echo times", "Field strength", "Acquisition", "Phase", "B0 direction"))
        (tmp_path / "mask.json").unlink(missing_ok=True)
        (tmp_path / "chi.json").unlink(missing_ok=True)


@pytest.mark.parametrize(("sign", "given", "words"), [
    (1, False, "20.0 degrees from the third voxel axis (from the image orientation)"),
    (-1, False, "20.0 degrees from the third voxel axis (from the image orientation)"),  # the sign is moot
    (1, True, "0.0 degrees from the third voxel axis (given with --b0-dir; the image orientation gives 20.0 degrees)"),
])
def test_report_says_whether_b0_came_from_the_affine_or_was_given(sign, given, words):
    """A slab tilted 20 degrees about the L-R axis: B0 (world z) is 20 degrees from its third voxel axis. A Chimap
    computed with that direction took it from the affine; one computed with B0 along the third axis was given it."""
    from qsmprep.physics import b0_dir_from_affine
    from qsmprep.reports.report import b0_direction_text

    t = np.radians(20)
    affine = np.eye(4)
    affine[:3, :3] = 1.5 * np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    b0_dir = (0.0, 0.0, 1.0) if given else sign * np.asarray(b0_dir_from_affine(affine))
    assert b0_direction_text(b0_dir, affine) == words


def test_an_earlier_run_whose_files_are_gone_is_named_not_fatal(report_dir, tmp_path):
    out, _ = report_dir
    gone = {"name": "sub-01_ses-c", "mask": str(tmp_path / "gone.nii.gz"), "earlier": True}
    text = build_subject_report(out, "01", [gone]).read_text()
    assert "<h2>sub-01_ses-c</h2>" in text and "its outputs cannot be read" in text and "gone.nii.gz" in text
    with pytest.raises(Exception, match="gone.nii.gz"):  # a file of this invocation's own run is an error
        build_subject_report(out, "01", [{**gone, "earlier": False}])


def test_to_ras_orders_voxel_axes_right_anterior_superior():
    vol = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)  # 4D: echoes last, untouched
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_array_equal(to_ras(vol, lps), vol[::-1, ::-1])
    # a sagittal slab: voxel axes run anterior, superior, left
    sagittal = np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    np.testing.assert_array_equal(to_ras(vol[..., 0], sagittal), vol[..., 0].transpose(2, 0, 1)[::-1])
    # its voxel sizes follow the axes: 0.8 mm anterior, 0.9 mm superior, 2 mm slices left to right
    assert ras_voxel_size(sagittal @ np.diag([0.8, 0.9, 2.0, 1.0])) == pytest.approx((2.0, 0.8, 0.9))


def test_report_figures_do_not_depend_on_the_stored_voxel_order(tmp_path):
    """A head stored LPS (as DICOM converters often write it) is drawn as the same head stored RAS: the subject's
    right on the right of each slice, L and R marked, anterior at the top."""
    shape = (20, 22, 16)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (x**2 + y**2 + z**2) < 0.7
    chi = 0.1 * (x > 0.3) * mask  # a block on the subject's right (RAS x > 0)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    lps = ras @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    pages = {}
    for name, affine, flip in (("ras", ras, lambda a: a), ("lps", lps, lambda a: a[::-1, ::-1])):
        paths = {k: save_nifti(tmp_path / name / f"{k}.nii.gz", flip(v), affine) for k, v in (("mask", mask), ("chi", chi))}
        out = tmp_path / f"out-{name}"
        build_subject_report(out, "01", [{"name": "sub-01", "mask": paths["mask"], "chimaps": {"tkd": paths["chi"]}}])
        pages[name] = (out / "sub-01" / "figures" / "sub-01_desc-tkd_mosaic.png").read_bytes()
    assert pages["ras"] == pages["lps"]
    import matplotlib.image

    plain = run_mosaic(mask)(chi, window=(-0.15, 0.15), title="Susceptibility (tkd)", units="ppm", side_labels=None)
    plain, labelled = (matplotlib.image.imread(io.BytesIO(png))[..., :3] for png in (plain, pages["ras"]))
    panels = _panels(*(matplotlib.image.imread(io.BytesIO(run_mosaic(mask)(np.full(shape, v, np.float32),
                                                                           window=(-1, 1))))[..., :3] for v in (-1, 1)))
    rows, cols = np.nonzero(np.abs(plain - labelled).max(axis=-1) > 0.1)
    first, second = panels[0], panels[1]
    assert rows.size > 20 and cols.max() < second[1].start  # labels in the first slice only,
    assert rows.max() < (first[0].start + first[0].stop) / 2  # at its top, near both side edges
    near = 0.06 * (first[1].stop - first[1].start)
    assert cols.min() - first[1].start < near and first[1].stop - cols.max() < near


def test_report_contains_every_figure_and_the_methods(report_dir):
    out, page = report_dir
    assert page == out / "sub-01.html"
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    # ses-a: mask, total, local, 2 Chimaps; ses-b: 1 Chimap
    assert len(sources) == 6
    import matplotlib.image

    images = {}
    for src in sources:
        png = (out / src).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        images[src.rsplit("/", 1)[-1]] = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    assert all(img.shape[0] > 200 and img.shape[1] > 500 for img in images.values())  # two rows of large slices
    # the same map in the same mask gives the same figure; another map (0.1 x, not 0.1 y) changes the slices,
    # far more pixels than the title's method name alone (about 600 of them)
    tkd = images["sub-01_ses-a_desc-tkd_mosaic.png"]
    np.testing.assert_array_equal(tkd, images["sub-01_ses-b_desc-tkd_mosaic.png"])
    assert (np.abs(tkd - images["sub-01_ses-a_desc-ilsqr_mosaic.png"]).max(axis=-1) > 0.1).sum() > 5000
    assert "sub-01_ses-a" in text and "sub-01_ses-b" in text
    assert "Phase was unwrapped [1]." in text and "qsmprep in out participant" in text
    assert "neurological convention: the subject's left on the left" in text
    assert '<a href="logs/20261123-120000_abcd/qsmprep.log">' in text  # relative: the folder may be moved
    # every field figure says its display window: total field 30 z Hz, z in [-1, 1], 2nd-98th percentile in the mask
    inside = 30 * np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 24, 20)], indexing="ij")[2]
    half = np.percentile(inside[_report_mask()], 98)
    assert f"window {-half:.3g} to {half:.3g} Hz" in text and "window -0.05 to 0.05 ppm" in text


def test_report_figures_load_in_a_headless_browser(report_dir):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    out, page = report_dir
    (out / "sub-01" / "figures" / "sub-01_ses-b_desc-tkd_mosaic.png").unlink()  # one broken figure
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--allow-file-access-from-files",
         f"--user-data-dir={out.parent / 'chromium-profile'}", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    loaded = re.findall(r'<img src="([^"]+)"[^>]*data-loaded="(\d)"', dom)
    assert len(loaded) == 6
    assert [src for src, ok in loaded if ok == "0"] == ["sub-01/figures/sub-01_ses-b_desc-tkd_mosaic.png"]
    assert "Figure missing: sub-01/figures/sub-01_ses-b_desc-tkd_mosaic.png" in dom


def test_a_damaged_derivative_is_not_called_an_input_to_re_export(tmp_path):
    """The report reads qsmprep's own outputs: one it cannot read was cut short or damaged after it was written."""
    from qsmprep.errors import NoInputError

    path = save_nifti(tmp_path / "sub-01_desc-tkd_Chimap.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(NoInputError, match="is not a readable NIfTI file") as unreadable:
        build_subject_report(tmp_path, "01", [{"name": "sub-01", "mask": path}])
    assert "it was cut short or damaged" in str(unreadable.value) and "re-export" not in str(unreadable.value)


def test_the_deep_caption_says_where_the_network_ran():
    """From the sidecar's DeepInferenceDevice; nothing for another Chimap's sidecar or a field edited out of shape."""
    gpu = {"Device": "cuda:0", "Name": "NVIDIA H100 80GB HBM3", "NetworkPrecision": "float16 autocast"}
    assert inference_device_text(gpu) == " Its network ran on NVIDIA H100 80GB HBM3 (cuda:0) in float16 autocast."
    cpu = {"Device": "cpu", "Name": "CPU", "NetworkPrecision": "float32"}
    assert inference_device_text(cpu) == " Its network ran on the CPU in float32."
    for edited in (None, "cuda", {**gpu, "Name": 3}, {"Device": "cpu"}):
        assert inference_device_text(edited) == ""


def test_paramagnetic_tail_ratio_and_the_polarity_warning():
    """A brain-like map (most voxels near 0, a long paramagnetic tail) scores above 1, its negative below 1."""
    chi = np.concatenate([np.linspace(-0.05, 0.05, 970), np.linspace(0.1, 0.4, 30)])  # 3 % veins up to 0.4 ppm
    mask = np.ones(chi.shape, bool)
    percentiles = chimap_percentiles(chi, mask)
    assert percentiles == pytest.approx(tuple(np.percentile(chi, (1, 50, 99))))
    low, median, high = percentiles
    ratio = paramagnetic_tail_ratio(percentiles)
    assert ratio == pytest.approx((high - median) / (median - low)) and ratio > 3
    assert paramagnetic_tail_ratio(chimap_percentiles(-chi, mask)) == pytest.approx(1 / ratio)
    assert chimap_percentiles(chi, np.zeros(chi.shape, bool)) is None
    assert paramagnetic_tail_ratio(None) is None
    assert paramagnetic_tail_ratio(chimap_percentiles(np.zeros(10), np.ones(10, bool))) is None  # flat: no tails
    assert polarity_warning("deep", ratio, inverted=False) == ""
    assert "run qsmprep again with --invert-phase" in polarity_warning("deep", 1 / ratio, inverted=False)
    # a thin slab's TKD map scored 0.84 with the polarity right: the warning says how to tell the two apart
    assert polarity_warning("tkd", 0.84, inverted=False).endswith(
        "If they look bright, the polarity is right and the map's own errors shorten its tail (streaks, as TKD gives "
        "on a thin slab): compare with the other inversions.")
    assert "run qsmprep again without --invert-phase" in polarity_warning("deep", 1 / ratio, inverted=True)
    # a single echo's phase offset shortens the tail too (the simulated head's TKD map: 0.80 with the polarity right)
    assert "single echo" not in polarity_warning("tkd", 0.8, inverted=False)
    assert polarity_warning("tkd", 0.8, inverted=False, single_echo=True).endswith(
        "This run has a single echo, whose receive-phase offset background removal leaves in part "
        "(docs/methods/phase.md, A single echo): that shortens the tail too.")
    assert [single_echo(s) for s in ({"EchoTime": [0.004]}, {"EchoTime": 0.004}, {"EchoTime": [0.004, 0.008]}, {})] \
        == [True, True, False, False]
    assert polarity_warning("deep", None, inverted=False) == ""


def test_group_flags_a_mask_volume_far_from_the_others_only_with_five_runs_or_more():
    from qsmprep.reports.group import flag_rows

    def rows(volumes):
        return [{"run": f"sub-{i:02d}", "mask_ml": v, "tail_ratio": 1.5} for i, v in enumerate(volumes, 1)]

    # median 1195 ml, absolute deviations 5, 5, 10, 15, 20, 695 (median 12.5): robust SD 1.4826 x 12.5 = 18.5 ml,
    # so 500 ml is 37.5 robust SD below and 1215 ml 1.1 above
    flagged = flag_rows(rows([1190, 1200, 1210, 1215, 1185, 500]))
    assert [r["run"] for r in flagged if r["flags"]] == ["sub-06"]
    assert flagged[5]["flags"] == "brain mask 500 ml, -37.5 robust SD from the median 1195 ml"
    assert not any(r["flags"] for r in flag_rows(rows([1190, 1200, 1210, 500])))  # 4 runs: no group to compare with
    assert [r["mask_outlier"] for r in flagged] == [False] * 5 + [True]  # the figure's red mask volume: sub-06 only
    tail_only = flag_rows([{"run": "sub-01", "mask_ml": 1000, "tail_ratio": 0.6}])[0]
    assert tail_only["flags"] == "tail ratio 0.60 < 1: phase polarity inverted?" and not tail_only["mask_outlier"]
    one_echo = flag_rows([{"run": "sub-01", "mask_ml": 1000, "tail_ratio": 0.8, "echoes": 1}])[0]
    assert one_echo["flags"] == "tail ratio 0.80 < 1: phase polarity inverted or a single echo's phase offset?"


def test_a_chimap_without_contrast_is_named_in_the_report_and_the_log(tmp_path, caplog):
    """A Chimap of zeros (what V-SHARP radii smaller than a voxel leave) has no tail ratio, so the polarity check is
    silent on it; the report and the log say it shows no contrast, a map with contrast gets no such warning, and a
    sidecar that is JSON but no object (hand-edited) reads as none."""
    from qsmprep.reports.report import no_contrast_reason, no_contrast_warning

    assert no_contrast_reason(None) == "the brain mask is empty"
    assert no_contrast_reason((0.0, 0.0, 0.0)) == "its 1st and 99th percentiles in the brain mask are both 0 ppm"
    assert "not finite" in no_contrast_reason((float("nan"),) * 3)
    assert no_contrast_reason((-0.05, 0.0, 0.1)) == "" and no_contrast_warning("tkd", (-0.05, 0.0, 0.1)) == ""
    mask = _report_mask()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {name: save_nifti(tmp_path / f"{name}.nii.gz", data, affine)
             for name, data in (("mask", mask), ("zero", np.zeros(mask.shape)), ("chi", 0.1 * mask * np.arange(20)))}
    (tmp_path / "zero.json").write_text("[true]")
    text = build_subject_report(tmp_path / "out", "01", [{"name": "sub-01", "mask": paths["mask"], "chimaps": {
        "tkd": paths["zero"], "cfl2": paths["chi"]}}]).read_text()
    assert text.count("Chimap shows no susceptibility contrast") == 1
    assert ("The tkd Chimap shows no susceptibility contrast: its 1st and 99th percentiles in the brain mask are both "
            "0 ppm. A processing step lost the signal") in text
    assert "The tkd Chimap shows no susceptibility contrast" in caplog.text


def _derivatives(out, runs):
    """A qsmprep derivatives dataset in ``out`` with, for each run name of ``runs``, a brain mask (sidecar with three
    echo times), field maps and the Chimaps ``runs[name]`` ({method: array}, on the mask's grid)."""
    import json

    from qsmprep.bids.derivatives import write_dataset_description

    write_dataset_description(out, out.parent / "bids")
    mask, affine = _report_mask(), np.diag([2.0, 2.0, 2.0, 1.0])
    for name, chimaps in runs.items():
        anat = out / name.split("_")[0] / "anat"
        save_nifti(anat / f"{name}_desc-brain_mask.nii.gz", mask, affine)
        (anat / f"{name}_desc-brain_mask.json").write_text(json.dumps({"EchoTime": [0.004, 0.008, 0.012]}))
        for field in ("total", "local"):
            save_nifti(anat / f"{name}_desc-{field}_fieldmap.nii.gz", np.zeros(mask.shape), affine)
        for method, chi in chimaps.items():
            save_nifti(anat / f"{name}_desc-{method}_Chimap.nii.gz", chi, affine)
    return out


def test_group_rows_list_runs_they_cannot_measure_and_flag_chimaps_without_contrast(tmp_path):
    """Every run gets its rows: a Chimap of zeros is flagged as without contrast, a truncated Chimap, one on another
    grid and a mask without any Chimap each with the reason and the fix (``problem``); a mask sidecar that is no
    JSON object gives n/a echoes; the others are measured."""
    from qsmprep.reports.group import group_rows

    mask = _report_mask()
    rng = np.random.default_rng(0)  # tissue around 0 ppm, and 5 % veins up to 0.3 ppm: tail ratio above 1
    brain = mask * (rng.normal(0, 0.02, mask.shape) + 0.3 * rng.random(mask.shape) * (rng.random(mask.shape) < 0.05))
    out = _derivatives(tmp_path / "out", {"sub-01": {"tkd": brain, "cfl2": np.zeros(mask.shape)},
                                          "sub-02": {"tkd": brain, "cfl2": brain[:-1]}, "sub-03": {}})
    truncated = out / "sub-02" / "anat" / "sub-02_desc-tkd_Chimap.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:500])
    (out / "sub-01" / "anat" / "sub-01_desc-brain_mask.json").write_text('"not an object"')
    rows = {(row["run"], row["method"]): row for row in group_rows(out, ["01", "02", "03"])}
    assert sorted(rows, key=str) == sorted([("sub-01", "tkd"), ("sub-01", "cfl2"), ("sub-02", "tkd"),
                                            ("sub-02", "cfl2"), ("sub-03", None)], key=str)
    assert rows["sub-01", "tkd"]["flags"] == "" and rows["sub-01", "tkd"]["tail_ratio"] > 1
    assert rows["sub-01", "tkd"]["echoes"] is None and rows["sub-03", None]["echoes"] == 3
    assert rows["sub-01", "cfl2"]["flags"] == ("no contrast: its 1st and 99th percentiles in the brain mask are both "
                                               "0 ppm") and not rows["sub-01", "cfl2"]["problem"]
    assert rows["sub-02", "tkd"]["flags"].startswith(f"cannot be measured: susceptibility map {truncated} is not a "
                                                     "readable NIfTI file")
    assert rows["sub-02", "tkd"]["flags"].endswith("it was cut short or damaged (e.g. by an interrupted copy or a full "
                                                   "disk); run the participant level again for this run")
    assert "sub-02_desc-cfl2_Chimap.nii.gz has shape (23, 24, 20) but" in rows["sub-02", "cfl2"]["flags"]
    assert rows["sub-03", None]["flags"] == ("no Chimap beside its brain mask; run the participant level again for "
                                             "this run")
    for key in (("sub-02", "tkd"), ("sub-02", "cfl2"), ("sub-03", None)):
        assert rows[key]["problem"] and rows[key]["flags"].endswith("run the participant level again for this run")
        assert rows[key]["chi_p1_ppm"] is None and rows[key]["tail_ratio"] is None


def test_group_rows_list_runs_missing_derivatives_that_their_participant_run_should_have_written(tmp_path):
    """A run whose participant run failed (no derivatives, not even a folder), a hand-deleted brain mask, field map
    or Chimap of a method the last participant run that processed the run was asked for (its logs' config.json)
    are each flagged with the file and the fix, not left out; a Chimap no log asked for is measured all the same."""
    import json

    from qsmprep.reports.group import counts, group_rows, write_group_report

    mask = _report_mask()
    rng = np.random.default_rng(0)  # tissue around 0 ppm, and 5 % veins up to 0.3 ppm: tail ratio above 1
    brain = mask * (rng.normal(0, 0.02, mask.shape) + 0.3 * rng.random(mask.shape) * (rng.random(mask.shape) < 0.05))
    out = _derivatives(tmp_path / "out", {"sub-01": {"tkd": brain, "cfl2": brain}, "sub-02": {"tkd": brain},
                                          "sub-03": {"tkd": brain}, "sub-04": {"tkd": brain, "ilsqr": brain}})
    for run_id, names, inversion in (("20260101-000000_aaaa", ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"],
                                      ["tkd"]), ("20260102-000000_bbbb", ["sub-01"], ["tkd", "cfl2"])):
        (out / "logs" / run_id).mkdir(parents=True)
        (out / "logs" / run_id / "config.json").write_text(json.dumps({"runs": [{"name": n} for n in names],
                                                                       "inversion": inversion}))
    for name in ("sub-01/anat/sub-01_desc-cfl2_Chimap", "sub-02/anat/sub-02_desc-brain_mask",
                 "sub-03/anat/sub-03_desc-local_fieldmap", "sub-03/anat/sub-03_desc-tkd_Chimap"):
        (out / f"{name}.nii.gz").unlink()
    rows = group_rows(out, ["01", "02", "03", "04", "05"])
    flags = {(row["run"], row["method"]): row["flags"] for row in rows}
    fix = "; run the participant level again for this run"
    assert flags == {
        ("sub-01", "tkd"): "",
        ("sub-01", "cfl2"): f"missing sub-01_desc-cfl2_Chimap.nii.gz (its participant run, logs/20260102-000000_bbbb, "
                            f"was asked for cfl2){fix}",
        ("sub-02", None): f"missing sub-02_desc-brain_mask.nii.gz: without its brain mask its Chimaps cannot be "
                          f"measured{fix}",
        ("sub-03", None): f"missing sub-03_desc-local_fieldmap.nii.gz{fix}",
        ("sub-03", "tkd"): f"missing sub-03_desc-tkd_Chimap.nii.gz (its participant run, logs/20260101-000000_aaaa, "
                           f"was asked for tkd){fix}",
        ("sub-04", "tkd"): "", ("sub-04", "ilsqr"): "",
        ("sub-05", None): f"no derivatives: its participant run (logs/20260101-000000_aaaa) wrote none, as a run "
                          f"that failed or was stopped does (sub-05.html says why){fix}"}
    assert counts(rows) == (5, 3)
    assert all(row["problem"] == row["flags"] for row in rows)  # each flag is a problem: run_group exits 65
    _, page = write_group_report(out, rows)  # a run's row (method n/a) and a Chimap's, both flagged: ordered
    text = page.read_text()
    assert text.index("sub-03_desc-local_fieldmap") < text.index("sub-03_desc-tkd_Chimap")


def test_a_chimap_of_round_off_has_no_contrast_and_gets_no_polarity_advice(tmp_path, caplog):
    """TKD of two echoes with one phase image gave a map of float32 round-off (1st to 99th percentile -4.4e-7 to
    3.6e-7 ppm) whose tail ratio, 0.79, made the report, the log and the group table advise --invert-phase: it shows
    no contrast, and has no tail ratio. A map whose percentiles are just over NO_CONTRAST_PPM apart has contrast."""
    from qsmprep.reports.group import group_rows
    from qsmprep.reports.report import no_contrast_reason

    mask = _report_mask()
    rng = np.random.default_rng(0)  # tissue around 0 ppm, and 5 % veins up to 0.3 ppm: tail ratio above 1
    brain = mask * (rng.normal(0, 0.02, mask.shape) + 0.3 * rng.random(mask.shape) * (rng.random(mask.shape) < 0.05))
    round_off = -2e-6 * brain  # under a micro-ppm, and its tails swapped: a tail ratio below 1
    assert paramagnetic_tail_ratio(chimap_percentiles(round_off, mask)) is None
    assert no_contrast_reason((-4.43e-7, 7e-9, 3.65e-7)) == ("its 1st and 99th percentiles in the brain mask, "
                                                             "-4.43e-07 and 3.65e-07 ppm, are less than 0.0001 ppm "
                                                             "apart (round-off, not tissue)")
    assert no_contrast_reason((-6e-5, 0.0, 6e-5)) == ""
    out = _derivatives(tmp_path / "out", {"sub-01": {"tkd": round_off, "cfl2": brain}})
    rows = {row["method"]: row for row in group_rows(out, ["01"])}
    assert rows["tkd"]["tail_ratio"] is None and rows["cfl2"]["tail_ratio"] > 1 and rows["cfl2"]["flags"] == ""
    assert rows["tkd"]["flags"].startswith("no contrast: its 1st and 99th percentiles in the brain mask, ")
    assert "polarity" not in rows["tkd"]["flags"]
    anat = out / "sub-01" / "anat"
    text = build_subject_report(out, "01", [{"name": "sub-01", "mask": anat / "sub-01_desc-brain_mask.nii.gz",
                                             "chimaps": {m: anat / f"sub-01_desc-{m}_Chimap.nii.gz"
                                                         for m in ("tkd", "cfl2")}}]).read_text()
    assert text.count("Chimap shows no susceptibility contrast") == 1 and "The tkd Chimap shows no" in text
    assert "positive tail is shorter" not in text and "positive tail is shorter" not in caplog.text


def test_group_report_is_written_whole_or_refused_with_exit_73(tmp_path, recwarn):
    """A row per run without a tail ratio draws its figure without matplotlib's empty-legend warning; the TSV keeps
    each flag on one line; a table that cannot be written (a folder in its place) is a CantCreateError naming it,
    and leaves no temporary file."""
    import csv

    from qsmprep.errors import CantCreateError
    from qsmprep.reports.group import group_rows, write_group_report

    out = _derivatives(tmp_path / "out", {"sub-01": {}})
    rows = group_rows(out, ["01"])
    rows[0]["flags"] += "\ttab\nnewline"
    tsv, page = write_group_report(out, rows)
    assert not [w for w in recwarn if "legend" in str(w.message)]
    with open(tsv, newline="") as table:
        (row,) = list(csv.DictReader(table, delimiter="\t"))
    assert row["method"] == "n/a" and row["flags"].endswith("this run tab newline")
    assert "no Chimap beside its brain mask" in page.read_text()
    tsv.unlink()
    tsv.mkdir()
    with pytest.raises(CantCreateError, match=f"cannot write {tsv} \\(Is a directory\\): make OUTPUT_DIR writable"):
        write_group_report(out, rows)
    assert not list(out.glob(".tmp-*"))


def test_a_report_written_while_another_invocation_holds_the_lock_shows_that_invocations_run(tmp_path):
    """Two invocations processing sessions of one subject at once (an array job per session): the report waits for
    the other's report, then lists the other's run, found on disk when written, not when the workflow was built."""
    import threading
    import time

    from qsmprep.bids.derivatives import named_run_paths
    from qsmprep.reports import write_subject_report
    from qsmprep.reports.report import subject_report_lock

    out, affine, mask = tmp_path / "out", np.diag([2.0, 2.0, 2.0, 1.0]), _report_mask()
    own = named_run_paths(out, "sub-01_ses-1", ["tkd"])
    save_nifti(own["mask"], mask, affine)
    entry = {"name": "sub-01_ses-1", "mask": str(own["mask"]), "chimaps": {}}
    with subject_report_lock(out, "01"):  # the other invocation writing its report
        writer = threading.Thread(target=write_subject_report, args=(out, "01", [entry]))
        writer.start()
        time.sleep(0.5)  # unlocked, the writer would have listed the runs by now
        other = named_run_paths(out, "sub-01_ses-2", ["tkd"])
        save_nifti(other["mask"], mask, affine)
        save_nifti(other["chimap:tkd"], 0.05 * mask, affine)
    writer.join(timeout=60)
    page = (out / "sub-01.html").read_text()
    assert "1 run(s), and 1 from an earlier invocation" in page
    assert "<h2>sub-01_ses-1</h2>" in page and "sub-01_ses-2_desc-tkd_mosaic.png" in page
    assert not (out / ".sub-01.html.lock").exists()  # nothing left among the derivatives


def test_a_file_system_without_locks_gets_its_report_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from qsmprep.bids.derivatives import named_run_paths
    from qsmprep.reports import write_subject_report

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    own = named_run_paths(out, "sub-01", ["tkd"])
    save_nifti(own["mask"], _report_mask(), np.diag([2.0, 2.0, 2.0, 1.0]))
    page = write_subject_report(out, "01", [{"name": "sub-01", "mask": str(own["mask"]), "chimaps": {}}]).read_text()
    assert "<h2>sub-01</h2>" in page and "1 run(s)." in page
    assert "written without a lock" in caplog.text and ".sub-01.html.lock" in caplog.text
    assert not (out / ".sub-01.html.lock").exists()
