"""The five dipole-inversion architectures: shapes, gradients and their defining properties."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qsmprep.deep.models import (
    ARCHITECTURES, DomainBatchNorm3d, MetaQSM, QSMGANCritic, QSMGANGenerator, QSMInvNet, UNet, WPConv3d, build_model,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(shape, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    field = 0.05 * torch.randn(batch, 1, *shape, generator=g)
    mask = (torch.rand(batch, 1, *shape, generator=g) > 0.2).float()
    return field, mask


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_backward_odd_size(arch):
    torch.manual_seed(0)
    model = build_model(arch, width=4, depth=2)
    shape = (21, 19, 23) if arch == "qsmgan" else (13, 9, 11)
    field, mask = _inputs(shape)
    voxel_size = torch.tensor([[1.0, 1.0, 1.0], [0.6, 0.8, 3.0]])
    chi = model(field, mask=mask, voxel_size=voxel_size)
    m = model.crop_margin
    assert chi.shape == (2, 1, shape[0] - 2 * m, shape[1] - 2 * m, shape[2] - 2 * m)
    assert torch.isfinite(chi).all()
    chi.square().mean().backward()
    for name, p in model.named_parameters():
        if ".norms.1." in name:  # QSMInvNet+: the real-domain norms are unused on domain 0
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


def test_padding_crops_back_exactly():
    # A residual U-Net whose correction head is zeroed must return its input
    # unchanged at any size: padding and cropping lose nothing.
    model = UNet(width=4, depth=3, residual=True).eval()
    torch.nn.init.zeros_(model.net.head.weight)
    torch.nn.init.zeros_(model.net.head.bias)
    field, _ = _inputs((11, 7, 9), batch=1)
    assert model.size_multiple == 8
    torch.testing.assert_close(model(field), field, rtol=0, atol=0)


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet")


def test_wpconv_weights_depend_on_voxel_size():
    torch.manual_seed(1)
    layer = WPConv3d(3, 2, 3, hidden=8)
    w, b = layer.predict(torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 2.0], [1.0, 1.0, 1.0]]))
    assert w.shape == (3, 2, 3, 3, 3, 3) and b.shape == (3, 2)
    assert (w[0] - w[1]).abs().max() > 1e-4
    torch.testing.assert_close(w[0], w[2], rtol=0, atol=0)
    # The grouped convolution of a mixed batch equals one plain conv per item.
    x = torch.randn(3, 3, 6, 5, 4)
    y = layer(x, {"voxel_size": torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 2.0], [1.0, 1.0, 1.0]])})
    for i in range(3):
        torch.testing.assert_close(y[i : i + 1], F.conv3d(x[i : i + 1], w[i], b[i], padding=1), rtol=1e-5, atol=1e-6)


def test_metaqsm_mixed_voxel_sizes_in_one_batch():
    torch.manual_seed(2)
    model = MetaQSM(width=4, depth=2, hidden=8).eval()
    field, _ = _inputs((12, 12, 6))
    sizes = torch.tensor([[0.5, 0.5, 2.0], [1.0, 1.0, 4.0]])
    both = model(field, voxel_size=sizes)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], model(field[i : i + 1], voxel_size=sizes[i]), rtol=1e-4, atol=1e-6)
    swapped = model(field, voxel_size=sizes.flip(0))
    assert (swapped - both).abs().max() > 1e-6 * both.abs().max()
    with pytest.raises(ValueError, match="voxel size"):
        model(field)


def test_dsbn_keeps_separate_running_statistics():
    norm = DomainBatchNorm3d(2, num_domains=2).train()
    synthetic = torch.randn(4, 2, 5, 5, 5)
    real = 3.0 + torch.randn(4, 2, 5, 5, 5)
    norm(real, {"domain": 1})
    assert int(norm.norms[0].num_batches_tracked) == 0 and int(norm.norms[1].num_batches_tracked) == 1
    # momentum 0.1 from a zero start: running mean = 0.1 x batch mean
    torch.testing.assert_close(norm.norms[1].running_mean, 0.1 * real.mean(dim=(0, 2, 3, 4)))
    torch.testing.assert_close(norm.norms[0].running_mean, torch.zeros(2))
    norm(synthetic, {"domain": 0})
    torch.testing.assert_close(norm.norms[0].running_mean, 0.1 * synthetic.mean(dim=(0, 2, 3, 4)))
    with pytest.raises(ValueError, match="domain 2"):
        norm(real, {"domain": 2})


def test_qsminvnet_domains_share_weights_but_not_norms():
    torch.manual_seed(3)
    model = QSMInvNet(width=4, depth=2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 2 * 2 + 1 + 1  # encoder + decoder + bottleneck convs, and the 1x1x1 head
    assert len(convs) - 1 == 9 - 2 * (4 - 2)  # the paper's 9 convolutions at depth 4
    field, mask = _inputs((8, 8, 8))
    model(field, mask=mask, domain=1)
    model.eval()
    a, b = model(field, mask=mask, domain=0), model(field, mask=mask, domain=1)
    assert (a - b).abs().max() > 1e-6


def test_qsmgan_output_is_centre_crop_and_tanh_space():
    torch.manual_seed(4)
    gen = QSMGANGenerator(width=4, depth=2, crop_margin=5).eval()
    full = QSMGANGenerator(width=4, depth=2, crop_margin=0).eval()
    full.load_state_dict(gen.state_dict())
    field, _ = _inputs((22, 20, 18), batch=1)
    raw = gen(field, raw=True)
    torch.testing.assert_close(raw, full(field, raw=True)[..., 5:-5, 5:-5, 5:-5])
    assert raw.shape == (1, 1, 12, 10, 8)
    torch.testing.assert_close(gen(field), torch.atanh(raw) / 10)
    # The field enters x100: equivalent to feeding 100 x field to an unscaled copy.
    unscaled = copy.deepcopy(full)
    unscaled.input_scale = 1.0
    torch.testing.assert_close(full(field, raw=True), unscaled(100 * field, raw=True))


def test_qsmgan_critic_patch_scores():
    torch.manual_seed(5)
    critic = QSMGANCritic(width=4)
    strided = [m for m in critic.modules() if isinstance(m, torch.nn.Conv3d) and m.stride == (2, 2, 2)]
    assert len(strided) == 4 and all(m.kernel_size == (4, 4, 4) for m in strided)
    x = torch.randn(3, 1, 32, 32, 32, requires_grad=True)
    score = critic(x)
    assert score.shape == (3,)
    assert critic.net[:-1](x).shape[2:] == (2, 2, 2)  # 32 / 16
    score.sum().backward()
    assert x.grad.abs().sum() > 0


def test_siqsm_blocks_and_mask_input():
    torch.manual_seed(6)
    model = build_model("siqsm", width=4, depth=4).eval()
    assert model.size_multiple == 16
    dilations = sorted({m.dilation for m in model.modules() if isinstance(m, torch.nn.Conv3d)})
    assert dilations == [(1, 1, 1), (2, 2, 2)]
    assert not any(isinstance(m, (torch.nn.MaxPool3d, torch.nn.AvgPool3d)) for m in model.modules())
    field, mask = _inputs((10, 17, 9), batch=1)
    a = model(field, mask=mask)
    b = model(field, mask=torch.ones_like(mask))
    assert a.shape == field.shape and (a - b).abs().max() > 0


def test_conventions_are_json_ready():
    import json

    for arch, cls in ARCHITECTURES.items():
        conv = build_model(arch, width=4, depth=2).conventions()
        assert json.loads(json.dumps(conv)) == conv
        assert conv["b0_direction"].startswith("b0 along k")
    assert build_model("qsmgan", width=4, depth=2).conventions()["input_scale"] == 100.0
    assert np.isclose(build_model("unet", width=4, depth=2).conventions()["input_scale"], 1.0)


def test_cfl2_prior_unet_starts_as_cfl2_and_learns_a_correction():
    from qsmprep.inversion import cfl2
    from qsmprep.physics import forward_field_ppm

    chi = np.zeros((20, 24, 18), np.float32)
    chi[6:14, 8:16, 5:13] = 0.1
    voxel_size = (1.0, 0.9, 2.0)
    field = forward_field_ppm(chi, voxel_size)
    net = build_model("unet", width=4, depth=2, prior="cfl2", prior_lambda=0.1).eval()
    assert net.needs_voxel_size and net.params["prior"] == "cfl2"
    out = net(torch.from_numpy(field)[None, None], voxel_size=torch.tensor(voxel_size))[0, 0].detach().numpy()
    # the network pads 20x24x18 to 20x24x20; compare with CFL2 on that same grid
    padded = np.zeros((20, 24, 20), np.float32)
    padded[..., :18] = field
    expected = cfl2(padded, np.ones_like(padded), voxel_size, lam=0.1)[..., :18]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # the correction branch is trainable: one step moves the output
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    net.train()
    loss = (net(torch.from_numpy(field)[None, None], voxel_size=torch.tensor(voxel_size)) - 1).abs().mean()
    loss.backward()
    opt.step()
    assert net.net.head.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="prior"):
        build_model("unet", prior="tkd")
    with pytest.raises(ValueError, match="choose one"):  # residual was ignored under the prior, yet recorded
        build_model("unet", prior="cfl2", residual=True)


@torch.no_grad()
def test_tile_context_is_the_prior_forward_computes():
    """A tile given its slice of the whole volume's prior sees what whole-volume inference sees."""
    torch.manual_seed(0)
    net = build_model("unet", width=4, depth=2, prior="cfl2").eval()
    torch.nn.init.normal_(net.net.head.weight)  # a non-zero correction, so the U-Net's input matters
    field, voxel_size = torch.randn(1, 1, 20, 24, 16), torch.tensor([1.0, 0.9, 2.0])  # multiples of 4: no padding
    context = net.tile_context(field, voxel_size)
    assert context["prior"].shape == field.shape
    torch.testing.assert_close(net(field, voxel_size=voxel_size, **context), net(field, voxel_size=voxel_size))
    # a tile computing its own prior differs from the tile cut from the whole volume's
    tile = (..., slice(0, 12), slice(0, 16), slice(0, 10))
    own = net(field[tile], voxel_size=voxel_size)
    shared = net(field[tile], voxel_size=voxel_size, prior=context["prior"][tile])
    assert (own - shared).abs().max() > 1e-2
    assert build_model("unet", width=4, depth=2).tile_context(field, voxel_size) == {}


@pytest.mark.parametrize("arch", ["unet", "siqsm"])
@torch.no_grad()
def test_amplitude_normalised_network_is_amplitude_equivariant(arch):
    torch.manual_seed(0)
    model = build_model(arch, width=4, depth=2, normalise_amplitude=True).eval()
    assert model.params["normalise_amplitude"] is True
    assert model.conventions()["amplitude_normalisation"].startswith("field / its RMS")
    field, mask = _inputs((12, 12, 12))
    chi = model(field, mask=mask)
    # Scaling the field scales chi (as the dipole inversion does), down to 0.1x ...
    for factor in (0.1, 2.0, 37.0):
        torch.testing.assert_close(model(factor * field, mask=mask), factor * chi, rtol=1e-4, atol=1e-9)
    # ... and a zero field gives a zero map (to 1e-9 ppm); an un-normalised network is not equivariant.
    assert float(model(torch.zeros_like(field), mask=mask).abs().max()) < 1e-9
    plain = build_model(arch, width=4, depth=2).eval()
    assert not torch.allclose(plain(2.0 * field, mask=mask), 2.0 * plain(field, mask=mask), rtol=1e-2)
    assert "amplitude_normalisation" not in plain.conventions()  # older checkpoints keep loading


def test_amplitude_normalisation_refused_with_a_nonlinear_output():
    with pytest.raises(ValueError, match="non-linear output transform"):
        build_model("qsmgan", width=4, depth=2, normalise_amplitude=True)
