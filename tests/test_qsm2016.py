"""Classical inversions on the 2016 QSM reconstruction challenge data against COSMOS.

Langkammer C et al. Magn Reson Med 2018;79:1661-73. The local field
(phs_tissue, ppm), brain mask and 12-orientation COSMOS reference are in
SHARED_DATA/qsm2016 (tests/conftest.py; ../shared/data/qsm2016 by default);
B0 is along the third array axis. NRMSE and HFEN (LoG sigma 1.5) are computed
in the mask after demeaning both maps.
The same numbers are printed by bench/accuracy.py --part variants (docs/benchmarks.md).
"""

import time

import numpy as np
import pytest
from conftest import require_shared

from qsmprep.inversion import cfl2, ilsqr, tkd
from qsmprep.io import load_nifti
from qsmprep.metrics import hfen, nrmse
from qsmprep.physics import voxel_size_from_affine

B0_DIR = (0.0, 0.0, 1.0)
# a published MATLAB iLSQR (tol 0.01, 50 iterations) on this data
REFERENCE_ILSQR_NRMSE, REFERENCE_ILSQR_HFEN = 67.9, 62.8


@pytest.fixture(scope="module")
def challenge():
    field_file, mask_file, cosmos_file = require_shared(
        "qsm2016/phs_tissue.nii.gz", "qsm2016/msk.nii.gz", "qsm2016/chi_cosmos.nii.gz"
    )
    field, affine, _ = load_nifti(field_file, "local field")
    mask = load_nifti(mask_file, "mask")[0] > 0
    cosmos = load_nifti(cosmos_file, "COSMOS map")[0]
    return field, mask, cosmos, voxel_size_from_affine(affine)


def _scores(chi, cosmos, mask):
    return nrmse(chi, cosmos, mask), hfen(chi, cosmos, mask)


def test_voxel_size_from_the_affine(challenge):
    np.testing.assert_allclose(challenge[3], (1.0625, 1.0625, 1.0714), atol=1e-4)


def test_tkd_and_cfl2_scores(challenge):
    field, mask, cosmos, voxel_size = challenge
    tkd_nrmse, tkd_hfen = _scores(tkd(field, mask, voxel_size, B0_DIR, threshold=0.19), cosmos, mask)
    # known answer (shared design notes, design.md): 86.5 / 74.9 for TKD at 0.19 with sub-threshold sign(D) t
    assert tkd_nrmse == pytest.approx(86.5, abs=0.5) and tkd_hfen == pytest.approx(74.9, abs=0.5)
    cfl2_nrmse, cfl2_hfen = _scores(cfl2(field, mask, voxel_size, B0_DIR), cosmos, mask)
    # regression bound, not a known answer: our own measurement in docs/benchmarks.md
    # (CFL2, lambda 0.1: 65.17 / 63.95), kept within 0.5 points
    assert cfl2_nrmse == pytest.approx(65.17, abs=0.5) and cfl2_hfen == pytest.approx(63.95, abs=0.5)


def test_ilsqr_beats_tkd_and_matches_the_reference_implementation(challenge):
    field, mask, cosmos, voxel_size = challenge
    tkd_nrmse, tkd_hfen = _scores(tkd(field, mask, voxel_size, B0_DIR, threshold=0.19), cosmos, mask)
    start = time.perf_counter()
    chi = ilsqr(field, mask, voxel_size, B0_DIR)
    seconds = time.perf_counter() - start
    ilsqr_nrmse, ilsqr_hfen = _scores(chi, cosmos, mask)
    print(f"iLSQR: NRMSE {ilsqr_nrmse:.2f} %, HFEN {ilsqr_hfen:.2f} %, {seconds:.1f} s")
    assert ilsqr_nrmse < tkd_nrmse and ilsqr_hfen < tkd_hfen
    assert ilsqr_nrmse <= REFERENCE_ILSQR_NRMSE + 4 and ilsqr_hfen <= REFERENCE_ILSQR_HFEN + 4


def test_shipped_deep_model_beats_ilsqr_and_meets_the_target(challenge):
    from qsmprep.inversion import deep_invert

    field, mask, cosmos, voxel_size = challenge
    deep_nrmse, deep_hfen = _scores(deep_invert(field, mask, voxel_size, B0_DIR, device="cpu"), cosmos, mask)
    ilsqr_nrmse, ilsqr_hfen = _scores(ilsqr(field, mask, voxel_size, B0_DIR), cosmos, mask)
    print(f"deep: NRMSE {deep_nrmse:.2f} %, HFEN {deep_hfen:.2f} %")
    # issue 6 target: at or under 65 % NRMSE, and better than our iLSQR on both scores
    assert deep_nrmse <= 65
    assert deep_nrmse < ilsqr_nrmse and deep_hfen < ilsqr_hfen
