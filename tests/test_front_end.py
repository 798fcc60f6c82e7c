"""The pipeline's front end at library level on a simulated head: magnitude + wrapped phase ->
brain mask -> total field -> V-SHARP -> TKD, each step's result against the simulator's truth.

This is the chain ``init_qsm_wf`` runs; the end-to-end app tests (test_app.py) cover the
plumbing on coarser data. Numbers are measured in docs/methods/phase.md and masking.md.
"""

import numpy as np
import pytest

from qsmprep.bgremove import vsharp
from qsmprep.inversion import tkd
from qsmprep.masking import brain_mask
from qsmprep.metrics import nrmse
from qsmprep.phase import steep_phase_voxels, total_field_hz
from qsmprep.physics import ppm_to_hz
from qsmprep.sim.gre import simulate_gre
from qsmprep.sim.phantom import head_phantom

VOXEL_MM = (2.0, 2.0, 2.0)


@pytest.fixture(scope="module")
def head():
    # the Quick start's field of view (168 x 204 x 168 mm: scalp, skull, sinuses included) at 2 mm
    return simulate_gre(head_phantom((84, 102, 84), VOXEL_MM, seed=0), snr=100, seed=0)


@pytest.fixture(scope="module")
def mask(head):
    # as the BrainMask node does: surface voxels whose phase is too steep to unwrap are left out
    return brain_mask(head.magnitude, VOXEL_MM, exclude=steep_phase_voxels(head.phase_rad, head.te_s))


def test_mask_is_the_brain_without_scalp_or_skull(head, mask):
    truth = head.brain_mask
    assert not (mask & ~truth).any()  # the scalp and skull never enter, even by hole filling
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9  # measured 0.94: the 3 mm default erosion of the brain surface
    # the steep-phase exclusion takes off a few voxels near the sinuses, nothing else
    plain = brain_mask(head.magnitude, VOXEL_MM)
    assert not (mask & ~plain).any() and 10 < (plain & ~mask).sum() < 0.002 * plain.sum()


@pytest.mark.parametrize("unwrap", ["laplacian", "quality"])
def test_total_field_has_no_2pi_errors_next_to_sinuses(head, mask, unwrap):
    field = total_field_hz(head.phase_rad, head.te_s, head.magnitude, mask, VOXEL_MM, unwrap=unwrap)
    error = (field - ppm_to_hz(head.total_field_ppm, head.b0_tesla))[mask]
    error -= np.median(error)
    # noise only (SNR 100): a 2 pi error is 1 / 4 ms = 250 Hz at the first echo; the largest
    # error left (6 Hz) is the dark calcification
    assert np.sqrt(np.mean(error**2)) < 1.0
    assert np.abs(error).max() < 20.0


def test_susceptibility_close_to_the_inversion_of_the_true_field(head, mask):
    field_ppm = total_field_hz(head.phase_rad, head.te_s, head.magnitude, mask, VOXEL_MM) / ppm_to_hz(1.0, 3.0)
    local, valid = vsharp(field_ppm, mask, VOXEL_MM)
    ours = nrmse(tkd(local, valid, VOXEL_MM), head.chi_ppm, valid)
    true_local, true_valid = vsharp(head.total_field_ppm * mask, mask, VOXEL_MM)
    ideal = nrmse(tkd(true_local, true_valid, VOXEL_MM), head.chi_ppm, true_valid)
    assert ours < ideal + 5.0  # the front end costs under 5 points of NRMSE
    assert ours < 70.0
