"""Training losses and target transforms for deep dipole inversion (PyTorch).

Tensors are (B, C, X, Y, Z). Where a ``mask`` is given, voxel means run over
the mask's voxels only; per-sample quantities are averaged over the batch.

- ``l1``, ``l2``: mean absolute and mean squared error (Meta-QSM: L1;
  QSMInvNet+: L2 on synthetic data; QSMGAN: L1 content loss).
- ``amplitude_invariant_l2``: ||y - y'||^2 / var(y) (Jochmann et al.).
- ``siqsm_loss``: L2 + 1e-4 L1 + TV of the prediction (SI-QSM).
- ``gradient_difference``: mean |grad y - grad y'| (QSMnet+), a push
  towards sharp edges that a voxel-wise loss averages away.
- ``tanh_target`` / ``atanh_target``: QSMGAN's target transform tanh(10 chi)
  (its input scaling by 100 is the network's ``input_scale``).
- ``data_consistency_loss``: ||W (exp(i D*chi) - exp(i f))||^2 for
  unlabelled data (QSMInvNet+), with the library's dipole kernel.
- ``gradient_penalty``, ``wgan_gp_critic_loss``, ``wgan_generator_loss``:
  WGAN-GP (Gulrajani et al. 2017), as used by QSMGAN.
- ``build_loss``: a ``loss(pred, target, batch)`` callable from a name or a
  TOML-style table (see its docstring).
"""

import numpy as np
import torch

from qsmprep.errors import UsageError
from qsmprep.physics.forward import forward_field_ppm
from qsmprep.physics.units import ppm_to_rad


def _masked_mean(values, mask=None):
    """Mean of ``values`` over all voxels, or over ``mask`` (broadcast) voxels."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def l1(pred, target, mask=None):
    """Mean absolute error, over ``mask`` voxels if given."""
    return _masked_mean((pred - target).abs(), mask)


def l2(pred, target, mask=None):
    """Mean squared error (the squared L2 norm per voxel), over ``mask`` voxels if given."""
    return _masked_mean((pred - target) ** 2, mask)


def _per_sample_mean(values, mask=None):
    dims = tuple(range(1, values.ndim))
    if mask is None:
        return values.mean(dim=dims)
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)


def amplitude_invariant_l2(pred, target, mask=None, eps=1e-12):
    """Amplitude-invariant squared error: mean (y - y')^2 / var(y), per sample.

    Jochmann et al. divide ||y - y'||^2 by var(y) so that down- and up-scaled
    samples teach the same thing; here the sum is a mean over voxels (the
    same loss divided by the voxel count N, so its value does not depend on
    patch size), var(y) is the population variance of the target over the
    same voxels, and the per-sample values are averaged over the batch. So
    a prediction of 0 scores mean(y^2) / var(y), and a prediction of
    mean(y) scores exactly 1.

    Reference: Jochmann T, Haueisen J, Schweser F. How to train a deep
    convolutional neural network for quantitative susceptibility mapping
    (QSM). ISMRM poster.

    Parameters
    ----------
    pred, target : tensors (B, C, X, Y, Z)
        Prediction and target, chi in ppm (or the network-space output).
    mask : tensor or None, default None
        Voxels the means run over (all when None).
    eps : float, default 1e-12
        Added to var(y), in the target's units squared, so that a constant
        target does not divide by zero.
    """
    err = _per_sample_mean((pred - target) ** 2, mask)
    mean = _per_sample_mean(target, mask)
    var = _per_sample_mean((target - mean.view(-1, *([1] * (target.ndim - 1)))) ** 2, mask)
    return (err / (var + eps)).mean()


def total_variation(x):
    """Anisotropic TV per voxel: (sum |dx| + |dy| + |dz|) / N over the last three axes.

    Forward differences between neighbouring voxels (no voxel-size scaling);
    N is the number of voxels (all channels and samples).
    """
    tv = sum((x.diff(dim=d)).abs().sum() for d in (-3, -2, -1))
    return tv / x.numel()


def siqsm_loss(pred, target, alpha=1.0, beta=1e-4, gamma=1.0):
    """SI-QSM loss: alpha mean|y - y'|^2 + beta mean|y - y'| + gamma TV(y').

    TV is ``total_variation`` of the prediction. Defaults are the thesis'
    (alpha 1, beta 1e-4, gamma 1).

    Reference: Larrain JM. SI-QSM, MSc thesis, PUC Chile 2022, eq. 2.3.
    """
    diff = pred - target
    return alpha * (diff**2).mean() + beta * diff.abs().mean() + gamma * total_variation(pred)


def gradient_difference(pred, target, mask=None):
    """Mean absolute difference of neighbouring-voxel differences, |d(y - y')|, over the three spatial axes.

    The gradient loss of QSMnet (Yoon J, Gong E, Chatnuntawech I, et al.
    NeuroImage 2018;179:199-206), kept in QSMnet+ (Jung W, Yoon J, Ji S, et
    al. Exploring linearity of deep neural network trained QSM: QSMnet+.
    NeuroImage 2020;211:116619): a blurred edge costs little voxel-wise but
    fully here.
    Forward differences without voxel-size scaling (chi units per voxel);
    with ``mask`` only differences between two mask voxels count.
    The mean over axes keeps it on the scale of ``l1``.
    """
    error = pred - target
    mask = None if mask is None else mask.to(pred.dtype)
    total = 0.0
    for axis in (-3, -2, -1):
        n = error.shape[axis] - 1
        both = None if mask is None else mask.narrow(axis, 0, n) * mask.narrow(axis, 1, n)  # pairs inside the mask
        total = total + _masked_mean(error.diff(dim=axis).abs(), both)
    return total / 3


def tanh_target(chi, scale=10.0):
    """QSMGAN target transform tanh(scale * chi) (chi in ppm; Chen et al. 2020: scale 10)."""
    return torch.tanh(scale * chi)


def atanh_target(target, scale=10.0, eps=1e-6):
    """Inverse of ``tanh_target``: atanh(t) / scale, with t clamped into (-1, 1)."""
    return torch.atanh(target.clamp(-1 + eps, 1 - eps)) / scale


def data_consistency_loss(
    chi_pred,
    field,
    mask,
    weights=None,
    voxel_size_mm=(1.0, 1.0, 1.0),
    b0_dir=(0.0, 0.0, 1.0),
    te_s=0.02,
    b0_tesla=3.0,
    pad_factor=2.0,
):
    """Nonlinear data consistency || W (exp(i s D*chi) - exp(i s f)) ||^2, mean over the mask.

    s = 2 pi gamma_bar B0 TE converts ppm to phase (rad) at the echo time, so
    the complex exponentials compare phases as QSMInvNet+ does; D*chi is
    ``qsmprep.physics.forward_field_ppm`` on tensors (torch.fft, zero-padded). W = mask, times
    ``weights`` (e.g. normalised magnitude) if given. The value is
    sum_v |W_v (...)|^2 / sum_v mask_v per sample, averaged over the batch:
    the paper's norm squared and normalised, which has the same minimiser,
    a smooth gradient at zero and no dependence on patch size.

    Reference: Liu J, Koch KM. Exploring domain adaptation for deep neural
    network trained QSM (QSMInvNet+). ISMRM abstract.

    Parameters
    ----------
    chi_pred, field, mask : tensors (B, 1, X, Y, Z)
        Predicted chi (ppm), measured local field (ppm), 0/1 mask.
    weights : tensor like ``mask`` or None, default None
        Extra voxel weights (noise weighting); None: the mask alone.
    voxel_size_mm : (3,) or (B, 3), default (1, 1, 1)
        Voxel size in mm: one for the batch, or one per sample.
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates.
    te_s : float, default 0.02
        Echo time (s) at which phases are compared.
    b0_tesla : float, default 3.0
        Field strength in tesla (with ``te_s``, the ppm-to-radian scale s).
    pad_factor : float, default 2.0
        As in ``qsmprep.physics.forward_field_ppm``.
    """
    rad_per_ppm = float(ppm_to_rad(1.0, te_s, b0_tesla))
    sizes = torch.as_tensor(voxel_size_mm, dtype=torch.float64).reshape(-1, 3).cpu().numpy()
    if sizes.shape[0] == 1 or np.all(sizes == sizes[0]):
        model = forward_field_ppm(chi_pred, tuple(sizes[0]), b0_dir, pad_factor)
    else:
        model = torch.cat(
            [forward_field_ppm(chi_pred[i : i + 1], tuple(sizes[i]), b0_dir, pad_factor) for i in range(len(sizes))]
        )
    w = mask.to(model.dtype)
    if weights is not None:
        w = w * weights
    dphi_pred = rad_per_ppm * model
    dphi_meas = rad_per_ppm * field
    residual2 = (torch.cos(dphi_pred) - torch.cos(dphi_meas)) ** 2 + (torch.sin(dphi_pred) - torch.sin(dphi_meas)) ** 2
    dims = tuple(range(1, model.ndim))
    per_sample = (w**2 * residual2).sum(dim=dims) / mask.to(model.dtype).sum(dim=dims).clamp_min(1.0)
    return per_sample.mean()


def gradient_penalty(critic, real, fake):
    """WGAN-GP penalty: mean over samples of (||grad critic(x_hat)||_2 - 1)^2.

    x_hat = e real + (1 - e) fake, e ~ U(0, 1) per sample (torch's global
    generator, which the trainer seeds). Built with ``create_graph=True`` so it can be
    back-propagated into the critic.

    Reference: Gulrajani I et al. Improved training of Wasserstein GANs. NeurIPS 2017.
    """
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    e = torch.rand(shape, dtype=real.dtype).to(real.device)
    x_hat = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = grad.flatten(1).norm(dim=1)
    return ((norms - 1) ** 2).mean()


def wgan_gp_critic_loss(critic, real, fake, gp_weight=100.0):
    """Critic loss mean D(fake) - mean D(real) + gp_weight * gradient penalty.

    ``fake`` is detached (the generator is not updated by this loss). QSMGAN
    uses gp_weight 100 (Chen et al. 2020).
    """
    fake = fake.detach()
    return (
        critic(fake).mean() - critic(real).mean() + gp_weight * gradient_penalty(critic, real, fake)
    )


def wgan_generator_loss(critic, fake):
    """Adversarial generator loss -mean D(fake)."""
    return -critic(fake).mean()


LOSS_NAMES = ("l1", "l2", "amplitude_invariant_l2", "gradient_difference", "siqsm", "data_consistency")
"""Names ``build_loss`` accepts."""

PREDICTION_TARGET_LOSSES = {"l1": l1, "l2": l2, "amplitude_invariant_l2": amplitude_invariant_l2,
                            "gradient_difference": gradient_difference}
"""The losses of (pred, target, mask) that take no option but ``masked``."""


def _term(cfg):
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    masked = cfg.pop("masked", True)
    if name not in LOSS_NAMES:
        raise UsageError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")

    def mask_of(batch):
        return batch.get("mask") if masked else None

    if name in PREDICTION_TARGET_LOSSES:
        fn = PREDICTION_TARGET_LOSSES[name]
        if cfg:
            raise UsageError(f"loss {name} takes no options besides masked, got {sorted(cfg)}")
        return lambda pred, target, batch: fn(pred, target, mask_of(batch))
    if name == "siqsm":
        options = {k: float(cfg.pop(k)) for k in ("alpha", "beta", "gamma") if k in cfg}
        if cfg:
            raise UsageError(f"loss siqsm takes alpha, beta, gamma, got {sorted(cfg)}")
        return lambda pred, target, batch: siqsm_loss(pred, target, **options)
    use_magnitude = cfg.pop("magnitude_weights", False)
    options = {k: cfg.pop(k) for k in ("b0_dir", "te_s", "b0_tesla", "pad_factor") if k in cfg}
    if cfg:
        raise UsageError(
            f"loss data_consistency takes b0_dir, te_s, b0_tesla, pad_factor, magnitude_weights, got {sorted(cfg)}"
        )
    if "b0_dir" in options:
        options["b0_dir"] = tuple(float(b) for b in options["b0_dir"])

    def dc(pred, target, batch):
        weights = None
        if use_magnitude:
            magnitude = batch["magnitude"]
            peak = magnitude.flatten(1).amax(dim=1).clamp_min(1e-12)
            weights = magnitude / peak.view(-1, *([1] * (magnitude.ndim - 1)))
        return data_consistency_loss(
            pred, batch["field"], batch["mask"], weights, voxel_size_mm=batch["voxel_size"], **options
        )

    return dc


def build_loss(name_or_cfg):
    """A callable ``loss(pred, target, batch)`` from a name or a config table.

    ``batch`` is a dict as yielded by ``qsmprep.deep.data`` (field, chi,
    mask, voxel_size, magnitude). Accepted forms (TOML-friendly):

    - a name from ``LOSS_NAMES``: ``"l1"``;
    - a table ``{name = "siqsm", beta = 1e-4}``; options: ``masked`` (bool,
      default true: l1/l2/amplitude_invariant_l2/gradient_difference
      average over ``batch["mask"]``), siqsm ``alpha``/``beta``/``gamma``,
      data_consistency ``b0_dir``, ``te_s``, ``b0_tesla``, ``pad_factor``,
      ``magnitude_weights`` (bool: W = mask * magnitude / max);
      data_consistency ignores ``target`` (unlabelled data);
    - a weighted sum ``{terms = [{name = "l2"}, {name = "data_consistency", weight = 0.1}]}``
      (``weight`` defaults to 1).
    """
    if isinstance(name_or_cfg, str):
        return _term({"name": name_or_cfg})
    cfg = dict(name_or_cfg)
    if "terms" not in cfg:
        return _term(cfg)
    if set(cfg) != {"terms"} or not cfg["terms"]:
        raise UsageError("a loss with 'terms' takes only a non-empty list of terms")
    parts = []
    for term in cfg["terms"]:
        term = dict(term)
        weight = float(term.pop("weight", 1.0))
        parts.append((weight, _term(term)))

    def total(pred, target, batch):
        return sum(weight * fn(pred, target, batch) for weight, fn in parts)

    return total
