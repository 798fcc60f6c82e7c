"""A configurable 3D U-Net and the common frame of every dipole-inversion network.

Every network in ``qsmprep.deep.models`` is an :class:`InversionNet`: it takes
the local field (ppm of B0), optionally the brain mask and the voxel size, and
returns susceptibility in ppm.  The frame does what all of them share: input
scaling, zero-padding to the size multiple the pooling levels need (and
cropping back), the output transform, and a record of these conventions that
checkpoints carry.  Each architecture only builds its own layers.

:class:`UNet` is the plain U-Net used by Jochmann et al. (reference below):
same-size field in, chi out, 32 kernels in the first layer by default.

Reference: Jochmann T, Haueisen J, Schweser F. How to train a deep
convolutional neural network for quantitative susceptibility mapping (QSM).
ISMRM 2020 (poster); Ronneberger O et al., U-Net, MICCAI 2015 (the U-Net);
Cicek O et al., 3D U-Net, MICCAI 2016.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from qsmprep.deep.losses import atanh_target

# Version of the input/output conventions recorded in checkpoints.  Raise it
# whenever the meaning of a stored model changes (units, scaling, orientation).
CONVENTION_VERSION = 1


class ContextSequential(nn.ModuleList):
    """Layers applied in turn; those with ``takes_context`` also get the context dict.

    The context carries per-call side information: ``voxel_size`` (B, 3) for
    weight-prediction convolutions and ``domain`` for domain-specific batch norm.
    """

    def forward(self, x, ctx):
        for layer in self:
            x = layer(x, ctx) if getattr(layer, "takes_context", False) else layer(x)
        return x


class UNetCore(nn.Module):
    """Encoder-decoder with skip concatenations, built from factories.

    Level ``l`` has ``width * 2**l`` channels; ``depth`` down-samplings by 2.

    Parameters
    ----------
    in_channels, out_channels : int
        Network input and output channels.
    width : int
        Channels at the first level.
    depth : int
        Number of down-/up-sampling steps (the input size must be a multiple of 2**depth).
    make_block : callable (in_ch, out_ch) -> module taking (x, ctx)
        The convolutional block of each level (encoder, bottleneck and decoder).
    down : callable (channels) -> module
        Halves the spatial size.
    up : callable (in_ch, out_ch) -> module
        Doubles the spatial size, mapping ``in_ch`` to ``out_ch`` channels.
    make_head : callable (in_ch, out_ch) -> module
        The final layer (a 1x1x1 convolution).
    """

    def __init__(self, in_channels, out_channels, width, depth, make_block, down, up, make_head):
        super().__init__()
        chans = [width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = in_channels
        for level in range(depth):
            self.encoders.append(make_block(prev, chans[level]))
            self.downs.append(down(chans[level]))
            prev = chans[level]
        self.bottleneck = make_block(prev, chans[depth])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            up_layer = up(chans[level + 1], chans[level])
            self.ups.append(up_layer)
            self.decoders.append(make_block(up_layer.out_channels + chans[level], chans[level]))
        self.head = make_head(chans[0], out_channels)

    def forward(self, x, ctx):
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            x = enc(x, ctx)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x, ctx)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1), ctx)
        return self.head(x, ctx) if getattr(self.head, "takes_context", False) else self.head(x)


class TransposedUp(nn.ConvTranspose3d):
    """2x up-sampling by a learned 2x2x2 transposed convolution, stride 2."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)


class NearestUp(nn.Module):
    """2x nearest-neighbour up-sampling; keeps the channel count."""

    def __init__(self, in_channels, out_channels=None):
        super().__init__()
        self.out_channels = in_channels

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


def padding_to_multiple(size, multiple):
    """``F.pad`` widths that zero-pad the spatial ``size`` (X, Y, Z) at the far end up to multiples of ``multiple``."""
    return [p for n in reversed(size) for p in (0, math.ceil(n / multiple) * multiple - n)]


class InversionNet(nn.Module):
    """Frame shared by all dipole-inversion networks (see the module docstring).

    Subclasses set the class attributes below, store their constructor
    arguments in ``self.params`` and implement ``core(x, ctx)`` mapping the
    prepared input (B, C, X, Y, Z) at a size multiple of ``size_multiple`` to
    the raw network output (B, 1, X, Y, Z).

    Class attributes
    ----------------
    arch : str
        Registry name.
    needs_mask : bool
        The brain mask is a second input channel.
    needs_voxel_size : bool
        The voxel size (mm) is an input (weights depend on it).
    input_scale : float
        The field (ppm) is multiplied by this before entering the network.
    output_transform : "identity" or "tanh10"
        "tanh10": the raw output is tanh(10 chi) (QSMGAN); chi = atanh(y) / 10.
    """

    arch = ""
    needs_mask = False
    needs_voxel_size = False
    input_scale = 1.0
    output_transform = "identity"

    @property
    def size_multiple(self):
        """Spatial sizes the core accepts are multiples of this (padding is internal)."""
        return 2 ** self.params["depth"]

    @property
    def crop_margin(self):
        """Voxels removed at each side of the output (only QSMGAN crops)."""
        return 0

    def conventions(self):
        """The input/output conventions a checkpoint records (JSON-serialisable)."""
        return {
            "convention_version": CONVENTION_VERSION,
            "units": "field and chi in ppm",
            "input_scale": self.input_scale,
            "output_transform": self.output_transform,
            "needs_mask": self.needs_mask,
            "needs_voxel_size": self.needs_voxel_size,
            "voxel_size_handling": "network input (mm)" if self.needs_voxel_size else "trained voxel size; resample to it",
            "b0_direction": "b0 along k axis (third array axis)",
            "size_multiple": self.size_multiple,
            "crop_margin": self.crop_margin,
        } | ({"amplitude_normalisation": "field / its RMS in the mask; chi x that RMS"}
             if self.params.get("normalise_amplitude") else {})  # only when used: older checkpoints load

    def core(self, x, ctx):
        """The network proper on the padded, scaled input ``x``: ``self.net`` unless a subclass adds to it."""
        return self.net(x, ctx)

    def tile_context(self, field, voxel_size):
        """Per-voxel context that must come from the whole volume when it is inverted in tiles.

        A dict of tensors shaped like ``field`` (B, 1, X, Y, Z) that ``forward``
        accepts as keywords for a tile cut from the same place (the engine
        slices them with the tile); empty for networks whose output depends
        only on the tile's own input.
        """
        return {}

    def forward(self, field, mask=None, voxel_size=None, raw=False, **ctx):
        """Susceptibility (ppm) from the local field (ppm).

        Parameters
        ----------
        field : tensor (B, 1, X, Y, Z)
            Local field in ppm of B0, B0 along the third array axis.  Any size:
            it is zero-padded to ``size_multiple`` and the output cropped back.
        mask : tensor (B, 1, X, Y, Z), optional
            Brain mask; used by networks with ``needs_mask`` (all ones if omitted).
        voxel_size : tensor (B, 3) or (3,), optional
            Voxel size in mm; required when ``needs_voxel_size``.
        raw : bool, default False
            Return the network-space output (before ``output_transform``),
            which is what training losses compare with the transformed target.
        **ctx
            Extra per-call context, e.g. ``domain`` for QSMInvNet+, or the
            tile's slice of ``tile_context`` (a ``prior`` for the CFL2 U-Net).

        With ``params["normalise_amplitude"]`` (see ``build_model``) the
        scaled field is divided by its root-mean-square in the mask before the
        core and the output multiplied by it again, so that scaling the field
        by a > 0 scales chi by a, as the linear dipole inversion does.  Batch
        normalisation and amplitude augmentation then no longer hide the
        absolute amplitude from the network.

        Returns
        -------
        tensor (B, 1, X - 2m, Y - 2m, Z - 2m), m = ``crop_margin``: chi in ppm
        (or the raw output).
        """
        if field.dim() != 5 or field.shape[1] != 1:
            raise ValueError(f"field must be shaped (B, 1, X, Y, Z), got {tuple(field.shape)}")
        x = field * self.input_scale
        mask = torch.ones_like(field) if mask is None else mask.to(field.dtype)
        amplitude = None
        if self.params.get("normalise_amplitude"):
            dims = (2, 3, 4)
            power = (x.float() ** 2 * mask).sum(dims, keepdim=True) / mask.sum(dims, keepdim=True).clamp_min(1.0)
            amplitude = power.sqrt().clamp_min(1e-12).to(x.dtype)  # an all-zero field stays zero
            x = x / amplitude
        if self.needs_mask:
            x = torch.cat([x * mask, mask], dim=1)
        if self.needs_voxel_size:
            if voxel_size is None:
                raise ValueError(f"{type(self).__name__} needs the voxel size (mm)")
            voxel_size = torch.as_tensor(voxel_size, dtype=torch.float32, device=field.device)
            ctx["voxel_size"] = voxel_size.expand(field.shape[0], 3) if voxel_size.dim() == 1 else voxel_size
        size = field.shape[2:]
        y = self.core(F.pad(x, padding_to_multiple(size, self.size_multiple)), ctx)[..., : size[0], : size[1], : size[2]]
        c = self.crop_margin
        if c:
            y = y[..., c:-c, c:-c, c:-c]
        if amplitude is not None:
            y = y * amplitude
        if raw or self.output_transform == "identity":
            return y
        return atanh_target(y.float(), scale=10.0)


def conv_norm_act(in_channels, out_channels, n_convs, activation):
    """``n_convs`` x (3x3x3 conv, BatchNorm, ``activation()``) as a ContextSequential."""
    layers = []
    for i in range(n_convs):
        layers += [
            nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            activation(),
        ]
    return ContextSequential(layers)


class UNet(InversionNet):
    """3D U-Net for same-size field -> chi (Jochmann et al.; see module docstring).

    Each level: two 3x3x3 conv + BatchNorm + ReLU; max-pool down,
    2x2x2 transposed conv up, skip concatenations, final 1x1x1 conv.

    Parameters
    ----------
    width : int, default 32
        First-layer kernels (Jochmann et al.: 32 beat 16, 48 and 64).
    depth : int, default 4
        Pooling levels; the deepest level of a 48^3 input is 3^3.
    residual : bool, default False
        If True, the network predicts a correction added to its (scaled)
        input, chi = field + net(field), instead of chi directly. Not with
        ``prior`` "cfl2", whose correction is added to the prior (ValueError).
    prior : "none" or "cfl2", default "none"
        "cfl2": the closed-form L2 estimate of chi (``qsmprep.inversion.cfl2``,
        gradient regularisation ``prior_lambda``) is computed inside the
        network from the field and its voxel size; the U-Net sees
        [prior, field] and predicts a correction, chi = prior + net. The head
        starts at zero, so an untrained network returns the CFL2 map. Giving
        the network the classical solution and asking only for what it misses
        (streaks, under-estimation in the cone) is the idea behind
        learned-correction schemes such as Lai et al., MICCAI 2020, and
        qsmprep's own feasibility check (deep-methods.md); it needs far less
        training than learning the whole inversion.
    prior_lambda : float, default 0.1
        Regularisation weight of the CFL2 prior (see ``cfl2``).
    """

    arch = "unet"

    def __init__(self, width=32, depth=4, residual=False, prior="none", prior_lambda=0.1):
        super().__init__()
        if prior not in ("none", "cfl2"):
            raise ValueError(f"prior must be 'none' or 'cfl2', got {prior!r}")
        if residual and prior != "none":  # core adds the correction to the prior, never to the field
            raise ValueError("residual = true and prior = 'cfl2' both say what the correction is added to: choose one")
        self.params = {"width": int(width), "depth": int(depth), "residual": bool(residual)}
        if prior != "none":  # recorded only when used, so older checkpoints keep their params
            self.params.update(prior=prior, prior_lambda=float(prior_lambda))
        self.needs_voxel_size = prior != "none"
        self.net = UNetCore(
            2 if prior != "none" else 1, 1, width, depth,
            make_block=lambda i, o: conv_norm_act(i, o, 2, nn.ReLU),
            down=lambda c: nn.MaxPool3d(2),
            up=TransposedUp,
            make_head=lambda i, o: nn.Conv3d(i, o, 1),
        )
        if prior != "none":
            nn.init.zeros_(self.net.head.weight)
            nn.init.zeros_(self.net.head.bias)

    def conventions(self):
        conventions = super().conventions()
        if self.params.get("prior"):
            conventions["voxel_size_handling"] = "network input (mm) for the CFL2 prior; trained voxel size"
        return conventions

    def cfl2_prior(self, x, voxel_size):
        """CFL2 estimate of each batch item (B, 1, X, Y, Z) with its own voxel size (B, 3)."""
        from qsmprep.inversion.cfl2 import cfl2_filter
        from qsmprep.physics import filter_padded

        size = tuple(x.shape[2:])
        priors = []
        for item, vs in zip(x, voxel_size.tolist()):
            filt = cfl2_filter(size, tuple(vs), (0.0, 0.0, 1.0), self.params["prior_lambda"], device=x.device)
            priors.append(filter_padded(item.float(), filt, size))
        return torch.stack(priors).to(x.dtype)

    def tile_context(self, field, voxel_size):
        """The CFL2 prior of the whole volume, as ``forward`` computes it, for tiled inference.

        The prior is a dipole inversion, so a tile's own prior would differ from
        the whole volume's by a smooth offset per tile (seams between tiles);
        slicing the whole volume's prior leaves only the U-Net's local context
        to the tile. Empty without a prior or with amplitude normalisation (its
        scale is per tile). Where a tile is padded to ``size_multiple``
        (only at the far faces of a volume whose size is not a multiple), the
        padding holds zeros instead of the prior's continuation, a difference
        confined to the network's reach of that face.
        """
        if not self.params.get("prior") or self.params.get("normalise_amplitude"):
            return {}
        size = field.shape[2:]
        voxel_size = torch.as_tensor(voxel_size, dtype=torch.float32).expand(field.shape[0], 3)
        prior = self.cfl2_prior(F.pad(field * self.input_scale, padding_to_multiple(size, self.size_multiple)), voxel_size)
        return {"prior": prior[..., : size[0], : size[1], : size[2]]}

    def core(self, x, ctx):
        if self.params.get("prior"):
            prior = ctx.get("prior")
            if prior is None:
                prior = self.cfl2_prior(x, ctx["voxel_size"])
            else:  # a tile's slice of tile_context, padded as forward padded the tile
                prior = F.pad(prior.to(x.dtype), padding_to_multiple(prior.shape[2:], self.size_multiple))
            return prior + self.net(torch.cat([prior, x], dim=1), ctx)
        y = self.net(x, ctx)
        return x + y if self.params["residual"] else y
