"""Deep-learning losses: values against hand-computed numbers, gradients, WGAN-GP."""

import numpy as np
import pytest
import torch

from qsmprep.deep.generators import random_patterns_chi
from qsmprep.deep.losses import (
    amplitude_invariant_l2,
    atanh_target,
    build_loss,
    data_consistency_loss,
    gradient_difference,
    gradient_penalty,
    l1,
    l2,
    siqsm_loss,
    tanh_target,
    total_variation,
    wgan_generator_loss,
    wgan_gp_critic_loss,
)
from qsmprep.errors import UsageError
from qsmprep.physics import forward_field_ppm, ppm_to_rad


def _vol(values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, 2, 2)


def test_l1_l2_values_with_and_without_mask():
    pred, target = _vol([1.0, 2.0, 3.0, 4.0]), torch.zeros(1, 1, 1, 2, 2)
    mask = _vol([1.0, 0.0, 1.0, 0.0])
    assert l1(pred, target).item() == pytest.approx(2.5)
    assert l2(pred, target).item() == pytest.approx(7.5)
    assert l1(pred, target, mask).item() == pytest.approx(2.0)
    assert l2(pred, target, mask).item() == pytest.approx(5.0)


def test_amplitude_invariant_l2_values_and_invariance():
    y = _vol([1.0, 2.0, 3.0, 4.0])  # mean 2.5, var 1.25, mean(y^2) 7.5
    assert amplitude_invariant_l2(torch.zeros_like(y), y).item() == pytest.approx(7.5 / 1.25)
    assert amplitude_invariant_l2(torch.full_like(y, 2.5), y).item() == pytest.approx(1.0)
    pred = _vol([1.5, 2.0, 2.0, 5.0])  # squared errors 0.25, 0, 1, 1 -> mean 0.5625
    assert amplitude_invariant_l2(pred, y).item() == pytest.approx(0.5625 / 1.25)
    # scaling prediction and target together leaves the loss unchanged
    assert amplitude_invariant_l2(10 * pred, 10 * y).item() == pytest.approx(0.5625 / 1.25, rel=1e-5)
    # per-sample variance: a batch of a sample and its 10x copy scores the same as one sample
    batch = amplitude_invariant_l2(torch.cat([pred, 0.1 * pred]), torch.cat([y, 0.1 * y]))
    assert batch.item() == pytest.approx(0.5625 / 1.25, rel=1e-5)
    # masked: only the first two voxels (y = 1, 2: mean 1.5, var 0.25; errors 0.25, 0)
    mask = _vol([1.0, 1.0, 0.0, 0.0])
    assert amplitude_invariant_l2(pred, y, mask).item() == pytest.approx(0.125 / 0.25)


def test_siqsm_loss_value():
    target = torch.zeros(1, 1, 1, 1, 4)
    pred = torch.tensor([0.0, 1.0, 0.0, 1.0]).reshape(1, 1, 1, 1, 4)
    # mean |d|^2 = 0.5, mean |d| = 0.5, TV = (1 + 1 + 1) / 4 = 0.75
    assert total_variation(pred).item() == pytest.approx(0.75)
    assert siqsm_loss(pred, target).item() == pytest.approx(0.5 + 1e-4 * 0.5 + 0.75)
    assert siqsm_loss(pred, target, alpha=2.0, beta=0.0, gamma=0.0).item() == pytest.approx(1.0)


def test_tanh_target_round_trip():
    chi = torch.linspace(-0.25, 0.25, 101)
    assert tanh_target(torch.tensor(0.05)).item() == pytest.approx(np.tanh(0.5))
    torch.testing.assert_close(atanh_target(tanh_target(chi)), chi, atol=2e-5, rtol=0)
    assert atanh_target(torch.tensor(1.0)).isfinite()


def _pattern_pair(shape=(24, 24, 24), voxel=(1.0, 1.0, 1.0), seed=0):
    chi = random_patterns_chi(np.random.default_rng(seed), shape, voxel, border_vox=4)
    field = forward_field_ppm(chi, voxel)
    return torch.from_numpy(chi)[None, None], torch.from_numpy(field)[None, None]


def test_forward_model_on_tensors_matches_numpy_and_is_differentiable():
    chi, field = _pattern_pair(voxel=(0.8, 1.0, 1.5))
    chi.requires_grad_(True)
    model = forward_field_ppm(chi, (0.8, 1.0, 1.5))  # a (1, 1, ...) tensor: torch.fft, batch axes kept
    assert isinstance(model, torch.Tensor) and model.shape == chi.shape
    np.testing.assert_allclose(model.detach().numpy(), field.numpy(), atol=1e-6 * float(field.abs().max()) + 1e-9)
    (model * field).sum().backward()  # d/dchi <D chi, f> = D f (D real and even): the field of the field
    np.testing.assert_allclose(chi.grad.numpy(), forward_field_ppm(field.numpy()[0, 0], (0.8, 1.0, 1.5))[None, None],
                               atol=1e-5 * float(field.abs().max()))


def test_data_consistency_zero_for_truth_positive_otherwise_and_differentiable():
    chi, field = _pattern_pair()
    mask = torch.ones_like(chi)
    assert data_consistency_loss(chi, field, mask).item() < 1e-10
    wrong = (0.8 * chi).requires_grad_(True)
    loss = data_consistency_loss(wrong, field, mask)
    assert loss.item() > 1e-6
    loss.backward()
    assert torch.isfinite(wrong.grad).all() and wrong.grad.abs().max() > 0
    # a gradient step lowers it
    with torch.no_grad():
        stepped = wrong - 0.5 * wrong.grad / wrong.grad.abs().max() * 0.01
    assert data_consistency_loss(stepped, field, mask).item() < loss.item()


def test_data_consistency_value_by_hand():
    # chi = 0: residual |1 - exp(i s f)|^2 = 2 - 2 cos(s f); mean over the mask
    field = torch.full((1, 1, 4, 4, 4), 0.05)
    mask = torch.zeros_like(field)
    mask[..., :2, :, :] = 1
    s = ppm_to_rad(1.0, 0.03, 7.0)
    value = data_consistency_loss(torch.zeros_like(field), field, mask, te_s=0.03, b0_tesla=7.0)
    assert value.item() == pytest.approx(2 - 2 * np.cos(s * 0.05), rel=1e-5)
    weights = torch.full_like(field, 0.5)  # W = 0.5 mask: a quarter of the value
    value_w = data_consistency_loss(torch.zeros_like(field), field, mask, weights, te_s=0.03, b0_tesla=7.0)
    assert value_w.item() == pytest.approx(0.25 * value.item(), rel=1e-6)


def test_data_consistency_per_sample_voxel_sizes():
    voxels = [(1.0, 1.0, 1.0), (0.6, 0.6, 2.5)]
    pairs = [_pattern_pair(voxel=v, seed=i) for i, v in enumerate(voxels)]
    chi = torch.cat([p[0] for p in pairs])
    field = torch.cat([p[1] for p in pairs])
    mask = torch.ones_like(chi)
    assert data_consistency_loss(chi, field, mask, voxel_size_mm=torch.tensor(voxels)).item() < 1e-10
    # the wrong voxel size for the second sample is inconsistent
    assert data_consistency_loss(chi, field, mask, voxel_size_mm=torch.tensor([voxels[0]] * 2)).item() > 1e-6


class _Linear(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        return (x * self.weight).flatten(1).sum(dim=1)


def test_gradient_penalty_of_linear_critics():
    torch.manual_seed(0)
    w = torch.randn(1, 2, 3, 3)
    real, fake = torch.randn(4, 1, 2, 3, 3), torch.randn(4, 1, 2, 3, 3)
    unit = _Linear(w / w.norm())
    assert gradient_penalty(unit, real, fake).item() < 1e-10
    double = _Linear(2 * w / w.norm())  # gradient norm 2 everywhere: (2 - 1)^2 = 1
    assert gradient_penalty(double, real, fake).item() == pytest.approx(1.0, rel=1e-5)
    # critic loss: mean D(fake) - mean D(real) + 100 * 1
    expected = double(fake).mean() - double(real).mean() + 100.0
    assert wgan_gp_critic_loss(double, real, fake).item() == pytest.approx(expected.item(), rel=1e-5)
    assert wgan_generator_loss(double, fake).item() == pytest.approx(-double(fake).mean().item())
    # the penalty back-propagates into the critic's weights
    wgan_gp_critic_loss(double, real, fake).backward()
    assert double.weight.grad.abs().max() > 0


def test_gradient_difference_counts_edges():
    step = torch.zeros(1, 1, 4, 4, 4)
    step[..., 2:] = 1.0  # one jump along the last axis, in each of 16 rows of 3 differences
    flat = torch.zeros_like(step)
    assert gradient_difference(flat, step).item() == pytest.approx(16 / 48 / 3)
    assert gradient_difference(flat + 5.0, step).item() == pytest.approx(16 / 48 / 3)  # blind to offsets
    mask = torch.ones_like(step)
    mask[..., 3] = 0  # along the last axis only the pairs (0, 1) and (1, 2) remain, half of them a jump
    assert gradient_difference(flat, step, mask).item() == pytest.approx(0.5 / 3)
    assert build_loss({"name": "gradient_difference", "masked": False})(flat, step, {"mask": mask}).item() == (
        pytest.approx(16 / 48 / 3))
    blurred = torch.zeros_like(step)
    blurred[..., 1], blurred[..., 2:] = 0.5, 1.0  # the same edge over two voxels: l1 0.125, not zero
    assert gradient_difference(blurred, step).item() == pytest.approx(2 * 16 * 0.5 / 48 / 3)


def test_build_loss_names_tables_and_sums():
    pred, target = _vol([1.0, 2.0, 3.0, 4.0]), torch.zeros(1, 1, 1, 2, 2)
    batch = {"mask": _vol([1.0, 0.0, 1.0, 0.0])}
    assert build_loss("l1")(pred, target, batch).item() == pytest.approx(2.0)
    assert build_loss({"name": "l1", "masked": False})(pred, target, batch).item() == pytest.approx(2.5)
    total = build_loss({"terms": [{"name": "l1"}, {"name": "l2", "weight": 0.5}]})
    assert total(pred, target, batch).item() == pytest.approx(2.0 + 0.5 * 5.0)
    assert build_loss({"name": "siqsm", "beta": 0.0, "gamma": 0.0})(pred, target, batch).item() == pytest.approx(7.5)
    with pytest.raises(UsageError):
        build_loss("l3")
    with pytest.raises(UsageError):
        build_loss({"name": "l1", "beta": 1.0})


def test_build_loss_data_consistency_reads_the_batch():
    chi, field = _pattern_pair()
    batch = {
        "field": field,
        "mask": torch.ones_like(chi),
        "magnitude": torch.ones_like(chi),
        "voxel_size": torch.tensor([[1.0, 1.0, 1.0]]),
    }
    loss = build_loss({"name": "data_consistency", "magnitude_weights": True, "te_s": 0.02})
    assert loss(chi, None, batch).item() < 1e-10
    assert loss(torch.zeros_like(chi), None, batch).item() > 1e-6
    # each option reaches the loss: a non-uniform magnitude and a wrong chi, against the function itself
    torch.manual_seed(0)
    batch["magnitude"] = torch.rand_like(chi) * 2
    wrong = chi * 0.5
    options = {"te_s": 0.01, "b0_tesla": 7.0, "b0_dir": [0.0, 0.6, 0.8], "pad_factor": 1.5}
    built = build_loss({"name": "data_consistency", "magnitude_weights": True, **options})(wrong, None, batch)
    direct = data_consistency_loss(wrong, field, batch["mask"], weights=batch["magnitude"] / batch["magnitude"].max(),
                                   voxel_size_mm=(1.0, 1.0, 1.0), **options)
    assert built.item() == pytest.approx(direct.item(), rel=1e-6) and direct.item() > 1e-4
    for name in options:  # and each one changes it
        other = build_loss({"name": "data_consistency", "magnitude_weights": True,
                            **{k: v for k, v in options.items() if k != name}})(wrong, None, batch)
        assert abs(other.item() - direct.item()) > 1e-4 * direct.item(), name
    unweighted = build_loss({"name": "data_consistency", **options})(wrong, None, batch)
    assert abs(unweighted.item() - direct.item()) > 1e-3 * direct.item()
