"""Deep dipole inversion: a trained network applied to a local field map.

The engine around the network: resampling into the frame the model was
trained in (B0 along the third axis, the model's voxel size), whole-volume
or tiled inference, and an optional data-consistency refinement.
"""

import logging
from functools import cache, partial
from itertools import product

import numpy as np

from ..bgremove.smv import check_high_pass_radius, smv_kernel, smv_padded_shape, sphere_fits
from ..deep import read_metadata, shipped_model_path
from ..errors import DataError, QSMPrepError
from ..physics import (
    b0_tilt_deg, dipole_kernel, fft_module, filter_padded, padded_shape, resolve_device, to_device, to_numpy,
    zero_outside,
)
from ..physics.resample import b0_aligned_grid, field_and_mask_to_b0_aligned, from_b0_aligned, rotation_between
from ..resources import available_memory_bytes
from .gradient import forward_gradient, forward_gradient_adjoint, inner_edge_weights
from .solvers import cg

log = logging.getLogger(__name__)

DEFAULT_MODEL = "qsmprep-cfl2unet"
"""The shipped model used when none is named (qsmprep/data/models/, docs/models/)."""


def default_model_path():
    """Where the default model's weights ship in the package (the file may be absent in a stripped install)."""
    return shipped_model_path(DEFAULT_MODEL)

OBLIQUE_THRESHOLD_DEG = 3.0
"""B0 tilts above this (degrees from the k axis) are inverted in a B0-aligned frame."""

RESOLUTION_TOLERANCE = 0.15
"""Relative voxel-size mismatch to the model's training resolution that is tolerated without resampling."""

RESAMPLE_ORDER = 3
"""Spline order of the field's resampling into the network's frame and of chi's back (3: cubic B-spline).

Trilinear interpolation blurs both ways: resampled into the 1 mm frame and back, the true chi of the
anisotropic 0.75x0.75x2 mm simulated subject alone scores 24.25 % NRMSE with order 1 and 14.99 % with
order 3, and the stage-2 model's refined inversion 28.51 % and 25.80 % (docs/methods/deep-inversion.md).
The mask is resampled trilinearly (no overshoot) and thresholded at 0.5."""

REFINE_ITERS = 10
"""Default conjugate-gradient iterations of the data-consistency refinement: 20 or 40 give the same figures to
the printed digit on every benchmark (docs/benchmarks.md, Refinement prior weight)."""

REFINE_TOL = 1e-4
"""The refinement's conjugate gradients stop early once their residual is below this fraction of the right-hand
side's norm: on the 2016 challenge data after 13 iterations (14 with the 8 mm high-pass), so the default 10 run
in full."""

REFINE_LAMBDA = 0.05
"""Default weight of the network prior in the refinement (docs/benchmarks.md, Refinement prior weight)."""

TV_EPSILON = 1e-3
"""Smoothing of the refinement's total-variation term, in ppm/mm: gradients well under it are penalised
quadratically, well over it (the phantom's and the brain's edges, 0.01-0.1 ppm/mm) by their magnitude."""

TV_REWEIGHT_ITERS = 10
"""Conjugate-gradient iterations between two updates of the total-variation weights (lagged diffusivity)."""

REFINE_CHECKS = {
    "refine_iters": ("0 or more iterations", lambda v: v >= 0),
    "refine_lambda": ("> 0", lambda v: v > 0),
    "refine_radius_mm": ("0 (off) or a radius in mm", lambda v: v >= 0),
    "refine_tv_weight": ("0 (off) or a weight in ppm mm (e.g. 3e-4)", lambda v: v >= 0),
}
"""What each refinement setting of ``deep_invert`` must be, and its test (NaN fails every one): ``deep_invert``
raises ValueError and the command lines UsageError naming the option (``refine_setting_errors``). A negative
``refine_lambda`` or ``refine_iters`` returned the network's map unrefined, without a word."""


def refine_setting_errors(settings):
    """[(name, value, what it must be)] for each refinement setting in ``settings`` ({``deep_invert`` keyword:
    value}; None, the default, passes) that ``REFINE_CHECKS`` refuses, in the order given."""
    return [(name, value, REFINE_CHECKS[name][0]) for name, value in settings.items()
            if value is not None and not REFINE_CHECKS[name][1](value)]


NETWORK_BYTES_PER_VOXEL = {"cpu": 640, "cuda": 320}
"""Peak memory of a network pass per voxel of its input grid (bytes), by device type, for sizing tiles.

The shipped model, ``python bench/speed.py --methods deep --sizes 64 96 128 160 192 224`` ("added bytes /
voxel"): on 2 CPU cores 778, 604, 502, 470, 455 and 453 bytes (a fixed 0.09 GB of model loading dominates
the small grids; 448 bytes per added voxel from 160^3 to 224^3); on an H100 (fp16 autocast, channels-last)
209 and 206 bytes at 160^3 and 256^3 (docs/benchmarks.md). Rounded up, with room on CUDA (276 and 274 bytes in
the default layout); other architectures are assumed to be alike (``--tile`` overrides)."""

MEMORY_SHARE = 0.8
"""Share of the available memory a tile's forward pass may take; the rest is for the arrays around it."""

TILE_OVERLAP = 32
"""Default overlap of neighbouring tiles (voxels), over which they are blended (docs/methods/deep-inversion.md)."""

MIN_TILE = 2 * TILE_OVERLAP
"""Smallest tile edge (voxels): twice the default tile overlap, so that tiles advance."""

TILE_MULTIPLE = 16
"""Automatic tile edges are multiples of this (the networks' padding multiples divide it)."""

FALLBACK_TILE = 256
"""Tile edge used where free memory cannot be read (not Linux): about 7.8 GB on a CPU with the shipped model."""


def tile_starts(size, tile, overlap):
    """Start indices of tiles of length ``tile`` covering ``size`` with at least ``overlap`` shared voxels."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def blend_weights(length, overlap, inner_start, inner_stop):
    """Weight of each of a tile's ``length`` voxels along one axis in ``predict_tiled``'s cross-fade.

    1 inside; towards a face that borders another tile (``inner_start``,
    ``inner_stop``) it falls linearly to 0 across the middle half of the
    ``overlap``: the outer quarter, where the network lacks the most
    context, is not used, and a neighbour's weight rises where this one's
    falls, so the map has no step where tiles meet.
    """
    margin = overlap // 4
    ramp = np.clip((np.arange(length) + 0.5 - margin) / max(overlap - 2 * margin, 1), 0, 1)
    weights = np.ones(length)
    if inner_start:
        weights = np.minimum(weights, ramp)
    if inner_stop:
        weights = np.minimum(weights, ramp[::-1])
    return weights


def predict_tiled(predict, field, mask, tile_shape=(FALLBACK_TILE,) * 3, overlap=TILE_OVERLAP, context=None):
    """Apply ``predict(field, mask, **context) -> chi`` over a volume in overlapping tiles.

    Centre-crop blending with a cross-fade: each output voxel comes from the
    tile in which it lies farthest from a face, except across the middle
    half of each overlap, where neighbouring tiles are averaged with weights
    that fall linearly towards their faces (``blend_weights``). Every used
    voxel has at least ``overlap / 4`` voxels of context, and a difference
    between two tiles' predictions is spread over ``overlap / 2`` voxels
    instead of showing as a step (a seam). A volume no larger than
    ``tile_shape`` is one tile.

    Returns what ``predict`` returns for a volume that is one tile (a torch
    tensor stays on its device), else a float32 numpy array.

    Parameters
    ----------
    predict : callable
        Maps (field, mask) arrays of one tile to chi of the same shape (a numpy array or a torch tensor).
    field, mask : arrays (i, j, k)
    tile_shape : tuple of 3 int, default (FALLBACK_TILE,) * 3 = (256, 256, 256)
        Largest block passed to ``predict`` at once (memory bound; ``deep_invert``
        sizes it by the free memory, ``tile_for_memory``).
    overlap : int, default 32
        Voxels shared by neighbouring tiles along each axis.
    context : callable or None, default None
        ``context() -> {name: array shaped like field}``, called once when the
        volume is tiled; each tile's slices are passed to ``predict`` as
        keywords (whole-volume quantities such as a network's CFL2 prior).
    """
    shape = field.shape
    if all(n <= t for n, t in zip(shape, tile_shape)):
        return predict(field, mask)  # as it comes: a tensor stays on its device for the refinement
    weighted_sum = np.zeros(shape)  # float64: a constant map comes back exactly
    weight_sum = np.zeros(shape)
    tiles = [min(t, n) for n, t in zip(shape, tile_shape)]
    corners = list(product(*(tile_starts(n, t, overlap) for n, t in zip(shape, tiles))))
    whole = context() if context else {}
    for number, corner in enumerate(corners, 1):
        log.info("deep inversion: tile %d of %d", number, len(corners))  # minutes per tile on a CPU
        block = tuple(slice(c, c + t) for c, t in zip(corner, tiles))
        chi = to_numpy(predict(field[block], mask[block], **{name: value[block] for name, value in whole.items()}))
        i, j, k = (blend_weights(t, overlap, c > 0, c + t < n) for c, t, n in zip(corner, tiles, shape))
        weights = i[:, None, None] * j[None, :, None] * k[None, None, :]
        weighted_sum[block] += weights * chi
        weight_sum[block] += weights
    return (weighted_sum / np.maximum(weight_sum, np.finfo(float).tiny)).astype(np.float32)


def refine_data_consistency(chi_init, local_field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                            weights=None, lam=REFINE_LAMBDA, n_iter=REFINE_ITERS, pad_factor=1.5,
                            harmonic_radius_mm=None, tv_weight=0.0, device="cpu"):
    """Pull a network estimate towards consistency with the measured local field.

    Solves  min_chi ||W M_r H (D chi - f)||^2 + lam ||M (chi - chi_init)||^2
                    + tv_weight sum_M sqrt(|grad chi|^2 + TV_EPSILON^2)
    over chi supported in the mask M, by ``n_iter`` conjugate-gradient steps
    started at ``chi_init``. The prior term keeps the network's estimate in the
    ill-conditioned cone region (where the data say nothing), while the data
    term corrects what the field does determine. This is the linear analogue
    of the data-consistency step of learned proximal schemes (e.g. Lai KW,
    Aggarwal M, van Zijl P, Li X, Sulam J. Learned proximal networks for QSM.
    MICCAI 2020) and of QSMInvNet+'s data-consistency loss, applied at test time.

    H = delta - SMV_r is the spherical-mean high-pass of SHARP (Schweser et
    al., NeuroImage 2011) and M_r the voxels whose r-sphere fits in M: a
    harmonic field, which is what background-field removal leaves behind,
    is zero there after H, so the data term ignores residual background
    fields instead of turning them into susceptibility at the brain's edge.
    With ``harmonic_radius_mm`` None, H is the identity and M_r = M.

    The optional total-variation term (gradients between mask voxels only, in
    ppm/mm) favours piecewise-constant maps, as in MEDI (Liu T et al., MRM
    2011;66:777-783) and FANSI (Milovic C et al., MRM 2018;80:814-821). It is
    linearised by lagged diffusivity (Vogel CR, Oman ME, SIAM J Sci Comput
    1996;17:227-238): its weights 1 / sqrt(|grad chi|^2 + eps^2) come from the
    current estimate and are renewed every ``TV_REWEIGHT_ITERS`` CG iterations,
    so ``n_iter`` 30 makes three reweighted solves.

    The arrays may be numpy arrays or torch tensors on any device; each is moved to ``device`` once.

    Parameters
    ----------
    chi_init : array (i, j, k)
        Network output in ppm.
    local_field_ppm : array (i, j, k)
        Measured local field in ppm.
    mask : array (i, j, k)
        Region where the field is trusted and chi is estimated.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
        Voxel size in mm.
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates.
    weights : array (i, j, k) or None, default None
        Data weights W (e.g. normalised magnitude); uniform if None. ``deep_invert`` and the pipeline leave it
        uniform.
    lam : float, default 0.05
        Weight of the prior ||chi - chi_init||^2 (dimensionless, fields in ppm).
    n_iter : int, default 10
        Conjugate-gradient iterations at most (fewer once the relative residual is under ``REFINE_TOL``);
        0 returns ``chi_init`` unchanged.
    pad_factor : float, default 1.5
        Zero padding of the dipole convolution.
    harmonic_radius_mm : float or None, default None
        SMV radius r in mm of the high-pass H; None (or 0) compares the fields
        themselves. 8 mm helps where background removal left residuals and
        costs accuracy on exact fields (docs/methods/deep-inversion.md). One
        that reaches no neighbouring voxel is refused (``check_high_pass_radius``);
        one whose sphere fits nowhere inside the mask leaves no data term and
        raises DataError (rather than return ``chi_init`` under the method's name).
    tv_weight : float, default 0
        Weight of the total-variation term, in ppm mm (0: off). 3e-4 with
        ``lam`` 0.03 and ``n_iter`` 30 is measured in docs/benchmarks.md
        (Total-variation refinement).
    device : "cpu", "cuda" or torch.device, default "cpu"
        Where the FFTs and CG run: "cpu" in numpy and scipy.fft; a torch
        device ("cuda", or torch.device("cpu")) in torch there. ``deep_invert``
        passes the network's CUDA device, so on a GPU the refinement runs there
        too, and "cpu" otherwise (on 2 CPU cores scipy.fft filtered a 160^3
        volume padded to 240^3 in 0.21 s, torch.fft in 0.25 s).

    Returns
    -------
    float32 numpy array (i, j, k): chi in ppm, zero outside the mask.
    """
    torch_device = None if isinstance(device, str) and device == "cpu" else device
    # every input moves once, as it is (a network output already on the GPU stays there), and is masked where it runs
    on_device = to_numpy if torch_device is None else partial(to_device, device=torch_device)
    inside = on_device(mask) > 0
    m = on_device(inside)
    chi0 = on_device(chi_init) * m
    if n_iter <= 0:
        return to_numpy(chi0)
    big = padded_shape(chi0.shape, pad_factor)
    if harmonic_radius_mm:  # the SMV must not wrap either
        check_high_pass_radius(harmonic_radius_mm, voxel_size_mm)
        big = tuple(max(a, b) for a, b in zip(big, smv_padded_shape(chi0.shape, voxel_size_mm, harmonic_radius_mm)))
    d = dipole_kernel(big, voxel_size_mm, b0_dir, rfft=True, device=torch_device)
    w2 = m if weights is None else m * on_device(weights) ** 2
    field = zero_outside(on_device(local_field_ppm), inside)  # NaN outside: unused
    if harmonic_radius_mm:
        smv = smv_kernel(big, voxel_size_mm, harmonic_radius_mm, rfft=True, device=torch_device)
        fits = sphere_fits(fft_module(m).rfftn(m, big), smv, big, voxel_size_mm, harmonic_radius_mm)
        if not fits.any():  # no data term left: the starting map would come back under the method's name
            raise DataError(f"the {harmonic_radius_mm:g} mm high-pass sphere fits nowhere inside the mask (a slab or "
                            f"mask thinner than {2 * harmonic_radius_mm:g} mm), so there is no field to fit: give a "
                            "smaller radius, or 0 for none (qsmprep-invert: --refine-radius; the qsmprep pipeline "
                            "fits the radius to each run's mask itself)")
        w2 = w2 * fits[tuple(slice(0, n) for n in m.shape)]
        field = filter_padded(field, 1 - smv, big)
        d = (1 - smv) * d

    def dipole(x):  # real-symmetric kernel (H D too), so it is its own adjoint
        return filter_padded(x, d, big)

    def normal(x):
        return m * dipole(w2 * dipole(m * x)) + lam * m * x

    rhs = m * dipole(w2 * field) + lam * chi0
    if not tv_weight:
        return to_numpy(cg(normal, rhs, x0=chi0, tol=REFINE_TOL, max_iter=n_iter) * m)
    edges = [on_device(w) for w in inner_edge_weights(to_numpy(m), voxel_size_mm)]
    chi = chi0
    for start in range(0, n_iter, TV_REWEIGHT_ITERS):
        tv = tv_weight * ((forward_gradient(chi, edges) ** 2).sum(0) + TV_EPSILON**2) ** -0.5

        def normal_tv(x):
            return normal(x) + m * forward_gradient_adjoint(tv * forward_gradient(m * x, edges), edges)

        chi = cg(normal_tv, rhs, x0=chi, tol=REFINE_TOL, max_iter=min(TV_REWEIGHT_ITERS, n_iter - start)) * m
    return to_numpy(chi)


def _mm(voxel_size_mm):
    """'3x3x3 mm' for a log line: 4 significant digits hide an oblique affine's float32 noise (3.00000011)."""
    return "x".join(f"{v:.4g}" for v in voxel_size_mm) + " mm"


def free_memory_bytes(device):
    """Bytes free for a forward pass on ``device`` (a torch.device), or None where unknown.

    On CUDA the driver's free memory plus what torch's caching allocator holds
    unused (reserved, not allocated: a second call in one process reuses it);
    else ``qsmprep.resources.available_memory_bytes``.
    """
    import torch

    if device.type == "cuda":
        unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused_cache
    return available_memory_bytes()


def tile_for_memory(shape, free_bytes, bytes_per_voxel):
    """Tile shape for ``predict_tiled`` that fits a network's forward pass into free memory.

    The whole grid when its pass needs at most ``MEMORY_SHARE`` of
    ``free_bytes``, else the largest cube, a multiple of ``TILE_MULTIPLE``
    voxels, that does, and at least ``MIN_TILE`` (with a warning when even
    that may not fit). ``FALLBACK_TILE`` cubes when ``free_bytes`` is None.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid the network runs on (voxels).
    free_bytes : int or None
        Memory available to the pass (``free_memory_bytes``), bytes.
    bytes_per_voxel : float
        The network's peak memory per input voxel (``NETWORK_BYTES_PER_VOXEL``), bytes.
    """
    if free_bytes is None:
        return (FALLBACK_TILE,) * 3
    budget_voxels = MEMORY_SHARE * free_bytes / bytes_per_voxel
    voxels = np.prod(shape, dtype=float)
    need_gb = voxels * bytes_per_voxel / 1e9
    grid = "x".join(map(str, shape))
    if voxels <= budget_voxels:
        log.info("deep inversion: the %s grid in one pass (about %.1f GB, %.1f GB available)", grid, need_gb,
                 free_bytes / 1e9)
        return tuple(int(n) for n in shape)
    side = int(round(budget_voxels ** (1 / 3), 6)) // TILE_MULTIPLE * TILE_MULTIPLE
    if side < MIN_TILE:
        log.warning("deep inversion: only %.1f GB of memory available; even %d^3 tiles need about %.1f GB and may "
                    "run out of memory", free_bytes / 1e9, MIN_TILE, MIN_TILE**3 * bytes_per_voxel / 1e9)
        side = MIN_TILE
    log.info("deep inversion: the %s grid needs about %.1f GB in one pass, %.1f GB is available: %d^3 tiles",
             grid, need_gb, free_bytes / 1e9, side)
    return (side,) * 3


def _frame_affine(voxel_size_mm, b0_dir):
    """A voxel-to-world affine in which B0 (world z) has direction ``b0_dir`` in voxel coordinates."""
    b = np.asarray(b0_dir, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = rotation_between(b / np.linalg.norm(b), np.array([0.0, 0.0, 1.0])) @ np.diag(voxel_size_mm)
    return affine


def network_frame(voxel_size_mm, b0_dir, meta, resolution_tolerance=RESOLUTION_TOLERANCE):
    """Where ``deep_invert`` runs a checkpoint's network: (aligned, target voxel size).

    ``aligned`` is True when the input is resampled onto a B0-aligned grid
    (B0 tilted more than ``OBLIQUE_THRESHOLD_DEG``, or a relative voxel-size
    mismatch beyond ``resolution_tolerance`` for a model that does not take
    the voxel size, or whose CFL2 prior is its only use of it); the target
    voxel size (mm) is the model's training one when it is resampled to it,
    else None (the input's voxel sizes are kept). ``meta`` is the checkpoint
    metadata.
    """
    voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
    trained_vs = tuple(meta.get("recipe", {}).get("data", {}).get("voxel_size_mm", voxel_size_mm))
    # rounded: 0.85 / 1 - 1 is -0.15000000000000002, which read as over a 15 % tolerance while 1.15 was not
    mismatch = round(max(abs(v / t - 1) for v, t in zip(voxel_size_mm, trained_vs)), 9)
    resample_resolution = not meta["conventions"]["needs_voxel_size"] or meta.get("params", {}).get("prior")
    target_vs = trained_vs if (resample_resolution and mismatch > resolution_tolerance) else None
    return b0_tilt_deg(b0_dir) > OBLIQUE_THRESHOLD_DEG or target_vs is not None, target_vs


def network_grid_shape(shape, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), model=DEFAULT_MODEL,
                       resolution_tolerance=RESOLUTION_TOLERANCE):
    """Shape of the grid ``deep_invert`` runs ``model``'s network on for an input of ``shape`` (memory planning).

    The input's own shape, or that of its B0-aligned grid at the model's
    training resolution (``network_frame``, with ``resolution_tolerance`` as
    in ``deep_invert``): a 3 mm input is inverted on a grid 27 times larger at
    1 mm. Reads the checkpoint metadata only.
    """
    aligned, target_vs = network_frame(voxel_size_mm, b0_dir, read_metadata(model), resolution_tolerance)
    if not aligned:
        return tuple(int(n) for n in shape[:3])
    return b0_aligned_grid(shape, _frame_affine(voxel_size_mm, b0_dir), target_vs)[0]


def inference_device(device):
    """What a deep Chimap's sidecar records of the torch ``device`` its network ran on (``DeepInferenceDevice``):
    ``Device`` ("cpu", "cuda:0"), ``Name`` (the GPU's, or "CPU") and ``NetworkPrecision`` ("float32", or "float16
    autocast" on CUDA). The refinement runs there too, in float32 (on the CPU if the GPU's memory runs out, to the
    same map within float32 round-off)."""
    import torch

    cuda = device.type == "cuda"
    if cuda and device.index is None:  # "cuda" means the current GPU: name which
        device = torch.device("cuda", torch.cuda.current_device())
    return {"Device": str(device), "Name": torch.cuda.get_device_name(device) if cuda else "CPU",
            "NetworkPrecision": "float16 autocast" if cuda else "float32"}


def device_text(device):
    """How the log names a torch device: "the CPU (2 threads)", or the GPU's name with its float16 autocast."""
    import torch

    if device.type == "cuda":
        record = inference_device(device)
        return f"{record['Device']} ({record['Name']}), the network in {record['NetworkPrecision']}"
    return f"the CPU ({torch.get_num_threads()} threads)"


def data_domain(meta):
    """The batch-norm domain a checkpoint (``meta``) runs measured data through: 1, the target (real) domain, for a
    network trained with a [domain] section (QSMInvNet+'s domain adaptation), else 0 (synthetic, the only one it
    learnt). Returns the forward keywords: {"domain": 1} or {}."""
    return {"domain": 1} if "domain" in meta.get("recipe", {}) else {}


def network_predictor(model, voxel_size_mm, device, **options):
    """``predict(field, mask, **context) -> chi`` for numpy or torch tiles, running ``model`` on ``device`` (fp16
    autocast on CUDA) and returning a float32 tensor there, which the refinement takes as it is (no copy to the CPU
    and back); and ``context(field, mask)``: the model's ``tile_context`` of a whole volume, as numpy arrays (only
    tiled runs need it, where the device's memory is short). ``options``: forward keywords for every call
    (``data_domain``)."""
    import torch
    import torch.nn.functional as F

    voxel_size = torch.tensor(voxel_size_mm, dtype=torch.float32, device=device)
    if device.type == "cuda":  # cuDNN's channels-last 3D convolutions: the 256^3 forward 0.089 -> 0.026 s on an H100
        model = model.to(memory_format=torch.channels_last_3d)
    margin = model.crop_margin  # QSMGAN's output is its input less this many voxels a side

    def tensor(array):  # a (1, 1, i, j, k) batch
        return to_device(array, device)[None, None]

    def network_input(array):  # with zeros for the margin the network crops, so that its output has the input's grid
        return F.pad(tensor(array), (margin,) * 6) if margin else tensor(array)

    def predict(field, mask, **context):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            m = network_input(mask)
            extra = {name: network_input(value) for name, value in context.items()}
            return model(network_input(field) * m, mask=m, voxel_size=voxel_size, **extra, **options)[0, 0].float()

    def context(field, mask):
        with torch.inference_mode():
            whole = model.tile_context(tensor(field) * tensor(mask), voxel_size)
            return {name: to_numpy(value[0, 0]) for name, value in whole.items()}

    return predict, context


def deep_invert(local_field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), model=DEFAULT_MODEL,
                device="auto", refine_iters=REFINE_ITERS, refine_lambda=REFINE_LAMBDA,
                refine_radius_mm=None, refine_tv_weight=0.0, resolution_tolerance=RESOLUTION_TOLERANCE, tile_shape=None,
                overlap=TILE_OVERLAP):
    """Susceptibility (ppm) from the local field (ppm) by a trained network.

    The network sees the data in the frame it was trained in: when B0 is
    tilted more than ``OBLIQUE_THRESHOLD_DEG`` from the third axis, or the
    voxel size differs by more than ``resolution_tolerance`` from the training
    voxel size of a model that does not take the voxel size as an input, the
    field (cubic B-spline, ``RESAMPLE_ORDER``) and mask (trilinear) are
    resampled, anti-aliased, onto a B0-aligned grid at the training
    resolution, inverted there and the result resampled back (cubic).
    Volumes too large for the free memory are inverted in overlapping tiles
    (``predict_tiled``).
    An optional data-consistency refinement follows (``refine_data_consistency``).

    Parameters
    ----------
    local_field_ppm, mask : arrays (i, j, k)
        Local field in ppm and the region to invert.
    voxel_size_mm : tuple of 3 float, default (1, 1, 1)
    b0_dir : tuple of 3 float, default (0, 0, 1)
        B0 direction in voxel coordinates.
    model : str or Path, default DEFAULT_MODEL
        Shipped model name or checkpoint path (``qsmprep.deep.registry.load_model``).
    device : "auto", "cpu" or "cuda", default "auto"
        Where the network and the refinement run ("auto": CUDA when available).
    refine_iters : int, default 10
        Conjugate-gradient iterations of data-consistency refinement (0 = off).
        On the 2016 challenge data it takes the shipped model from 61.23 % NRMSE /
        59.52 % HFEN to 61.94 % / 57.65 %, on the simulated subjects from
        30-33 % to 23-24 % (docs/benchmarks.md).
    refine_lambda : float, default 0.05
        Weight of the network prior in the refinement; larger keeps more of the
        network output (0.1 scores better on the 2016 in-vivo data, 0.02 on the
        simulations; docs/benchmarks.md, Refinement prior weight).
    refine_radius_mm : float or None, default None
        SMV radius (mm) of the refinement's high-pass, which makes it ignore
        residual background fields (``refine_data_consistency``'s
        ``harmonic_radius_mm``); None or 0: off. The pipeline passes 8 mm
        (``qsmprep.config.PIPELINE_HIGH_PASS_RADIUS_MM``): its local fields carry
        such residuals.
    refine_tv_weight : float, default 0
        Weight (ppm mm) of a total-variation term in the refinement, 0: off
        (``refine_data_consistency``'s ``tv_weight``).
    resolution_tolerance : float, default 0.15 (``RESOLUTION_TOLERANCE``)
        Largest relative voxel-size mismatch (per axis) to the model's training
        voxel size at which the network keeps the input's voxel size; ``inf``
        always keeps it (an input tilted more than ``OBLIQUE_THRESHOLD_DEG`` is
        still rotated into a B0-aligned frame at that voxel size). Resampling is the more accurate: on the scale-invariance
        phantom at 3.75-1.875 mm the native grid gives 12-14 % more refined RMSE
        than the cubic resampling (docs/benchmarks.md, Scale invariance).
    tile_shape : int or tuple of 3 int or None, default None
        Largest block the network sees at once (an int: a cube); the shipped
        model needs about 7.8 GB of CPU memory for 256^3, 2.2 GB for 160^3.
        None: the whole grid when free memory allows, else the largest tile
        that fits (``tile_for_memory``). At least ``MIN_TILE`` (64) along each
        axis, else ValueError.
    overlap : int, default 32
        Overlap of neighbouring tiles, in voxels, 0 to ``MIN_TILE - 1`` (else
        ValueError: tiles that do not advance past their overlap cover nothing).

    Returns
    -------
    float32 array, same shape as the input: chi in ppm, zero outside the mask.
    """
    import torch

    from ..deep.registry import load_model

    for name, value, what in refine_setting_errors({"refine_iters": refine_iters, "refine_lambda": refine_lambda,
                                                    "refine_radius_mm": refine_radius_mm,
                                                    "refine_tv_weight": refine_tv_weight}):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if refine_iters and refine_radius_mm:  # refused before the network runs, not after
        check_high_pass_radius(refine_radius_mm, voxel_size_mm)
    if tile_shape is not None and min(np.broadcast_to(tile_shape, (3,))) < MIN_TILE:
        raise ValueError(f"tile_shape {tile_shape}: tiles must be at least {MIN_TILE} voxels along each axis")
    if not 0 <= overlap < MIN_TILE:  # a tile must advance past its overlap, or the tiles cover nothing (zeros)
        raise ValueError(f"overlap {overlap}: give 0 to {MIN_TILE - 1} voxels")
    dev = resolve_device(device)
    log.info("deep inversion on %s", device_text(dev))
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    net, meta = load_model(model, device=dev)
    m = np.asarray(mask) > 0
    field = np.where(m, np.asarray(local_field_ppm, dtype=np.float32), np.float32(0))
    voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
    aligned, target_vs = network_frame(voxel_size_mm, b0_dir, meta, resolution_tolerance)
    if aligned:
        log.info("deep inversion in a B0-aligned frame (tilt %.1f deg, voxel size %s -> %s)", b0_tilt_deg(b0_dir),
                 _mm(voxel_size_mm), _mm(target_vs) if target_vs else "kept")
        native = _frame_affine(voxel_size_mm, b0_dir)
        field_n, mask_n, affine_a = field_and_mask_to_b0_aligned(field, m, native, target_vs, order=RESAMPLE_ORDER)
        vs_n = tuple(float(v) for v in np.linalg.norm(affine_a[:3, :3], axis=0))
    else:  # the network's frame is the input's
        field_n, mask_n, vs_n = field, m, voxel_size_mm
    if tile_shape is None:
        tile_shape = tile_for_memory(field_n.shape, free_memory_bytes(dev), NETWORK_BYTES_PER_VOXEL[dev.type])
    else:  # as tile_for_memory does, the log says which
        tile_shape = (int(tile_shape),) * 3 if np.ndim(tile_shape) == 0 else tuple(int(n) for n in tile_shape)
        one_pass = all(n <= t for n, t in zip(field_n.shape, tile_shape))
        log.info("deep inversion: the %s grid %s (tile_shape %s, as asked)", "x".join(map(str, field_n.shape)),
                 "in one pass" if one_pass else "in tiles", "x".join(map(str, tile_shape)))
    predict, context = network_predictor(net, vs_n, dev, **data_domain(meta))
    whole = cache(partial(context, field_n, mask_n))  # the whole volume's prior, once however often tiles shrink
    chi = run_with_smaller_tiles_on_oom(lambda tiles: predict_tiled(predict, field_n, mask_n, tiles, overlap, whole),
                                        tile_shape, dev)
    if aligned:
        chi = from_b0_aligned(to_numpy(chi) * mask_n, affine_a, field.shape, native, order=RESAMPLE_ORDER)
    if refine_iters:  # it masks chi where it runs
        refine = partial(refine_data_consistency, chi, field, m, voxel_size_mm, b0_dir, lam=refine_lambda,
                         n_iter=refine_iters, harmonic_radius_mm=refine_radius_mm, tv_weight=refine_tv_weight)
        return run_with_cpu_fallback(refine, dev, "the refinement")
    return zero_outside(to_numpy(chi), m)


GPU_OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUFFT_ALLOC_FAILED", "CUFFT_INTERNAL_ERROR",
                              "CUDNN_STATUS_NOT_ENOUGH_MEMORY", "CUDNN_STATUS_ALLOC_FAILED")
"""Texts of the RuntimeErrors by which cuFFT and cuDNN, rather than torch's allocator, report that GPU memory ran out
(cuFFT cannot make a plan, pytorch/pytorch#119420)."""


def gpu_out_of_memory(err):
    """Why ``err`` says a CUDA device ran out of memory (its first line), or None if it does not."""
    import torch

    text = str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError) or (
            isinstance(err, RuntimeError) and any(m in text for m in GPU_OUT_OF_MEMORY_MESSAGES)):
        return text.splitlines()[0] if text else type(err).__name__
    return None


def run_with_smaller_tiles_on_oom(run, tile_shape, device):
    """``run(tile_shape)``, run again in tiles of half the edge (down to ``MIN_TILE``) while CUDA runs out of memory.

    Tiles are sized by the memory free when the inversion starts (``tile_for_memory``), which another process on
    the same GPU can take meanwhile: a second run's deep inversion started beside it by MultiProc, or another
    job. Out of memory even in ``MIN_TILE`` cubes, a QSMPrepError names the fixes. On a CPU ``run`` is called once.
    """
    import torch

    while True:
        try:
            return run(tile_shape)
        except RuntimeError as err:
            reason = gpu_out_of_memory(err) if device.type == "cuda" else None
            if reason is None:
                raise
            if max(tile_shape) <= MIN_TILE:
                raise QSMPrepError(f"deep inversion: out of GPU memory ({reason}), in tiles down to {MIN_TILE}^3: "
                                   "free the GPU (other processes on it), or run on the CPU with --device cpu.") from err
        # out of the except block: the failed pass's frames, and the GPU memory they hold, are released now
        torch.cuda.empty_cache()
        side = max(MIN_TILE, max(tile_shape) // 2 // TILE_MULTIPLE * TILE_MULTIPLE)
        log.warning("deep inversion: out of GPU memory in %s tiles (%s); trying %d^3 tiles",
                    "x".join(map(str, tile_shape)), reason, side)
        tile_shape = (side,) * 3


def run_with_cpu_fallback(step, device, what):
    """``step(device=...)`` on ``device``, run again on the CPU if a CUDA device runs out of memory.

    The refinement is not tiled: it works on the whole zero-padded grid (1.5 times each axis), so a
    large volume can outgrow a small or shared GPU where the network's tiles fit. The CPU gives the
    same map, to float32 round-off, more slowly, so the run goes on with a warning instead of failing.
    ``step`` takes "cpu" (numpy) or the torch device; ``what`` names it in the warning.
    """
    import torch

    if device.type == "cpu":
        return step(device="cpu")
    try:
        return step(device=device)
    except RuntimeError as err:
        reason = gpu_out_of_memory(err)
        if reason is None:
            raise
    # out of the except block: the failed step's frames, and the GPU memory they hold, are released now
    torch.cuda.empty_cache()
    log.warning("deep inversion: %s ran out of GPU memory (%s); running it on the CPU, which is slower", what, reason)
    return step(device="cpu")
