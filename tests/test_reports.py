"""Per-subject HTML report: figures, content, and that a real browser loads every image."""

import io
import re
import shutil
import subprocess

import numpy as np
import pytest

from qsmprep.io import save_nifti
from qsmprep.reports import build_subject_report
from qsmprep.reports.mosaic import comparison_png, orthogonal_slices, robust_window, slice_indices


def test_slice_indices_span_the_mask():
    mask = np.zeros((10, 10, 40), bool)
    mask[2:8, 2:8, 10:31] = True
    idx = slice_indices(mask, n_slices=5)
    assert idx[0] == 12 and idx[-1] == 28 and len(idx) == 5


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


def test_robust_window_is_symmetric():
    vol = np.linspace(-1, 3, 1000).reshape(10, 10, 10)
    lo, hi = robust_window(vol, np.ones_like(vol))
    assert lo == -hi and hi == pytest.approx(np.percentile(vol, 98))


@pytest.fixture
def report_dir(tmp_path):
    shape = (24, 24, 20)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (x**2 + y**2 + z**2) < 0.6
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
    page = build_subject_report(out, "01", runs, methods_text="Phase was unwrapped [1].", command="qsmprep in out participant")
    return out, page


def test_report_contains_every_figure_and_the_methods(report_dir):
    out, page = report_dir
    assert page == out / "sub-01.html"
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    # ses-a: mask, total, local, 2 Chimaps; ses-b: 1 Chimap
    assert len(sources) == 6
    for src in sources:
        png = (out / src).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "sub-01_ses-a" in text and "sub-01_ses-b" in text
    assert "Phase was unwrapped [1]." in text and "qsmprep in out participant" in text


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
