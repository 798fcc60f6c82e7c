"""On-the-fly synthetic training data: an infinite, seeded PyTorch dataset.

``build_dataset(data_cfg, augment_cfg, seed)`` returns an ``IterableDataset``
yielding dicts of float32 tensors:

- "field" (1, X, Y, Z): local field in ppm (zero outside the mask);
- "chi" (1, X, Y, Z): susceptibility in ppm;
- "mask" (1, X, Y, Z): 0/1 region of interest;
- "magnitude" (1, X, Y, Z): magnitude image (relative units);
- "voxel_size" (3,): voxel size in mm.

The default ``torch.utils.data.default_collate`` batches them (all samples of
one dataset share the patch shape). Each DataLoader worker draws from its own
stream, seeded by (seed, worker id), so a run is reproducible for a given
seed and number of workers, and workers never repeat each other.

``data_cfg`` keys (TOML-friendly; all optional):

- ``generator``: "patterns" (``random_patterns_chi``), "analytic"
  (``analytic_spheres_cylinders``), "brain" (``brain_like_sample``), or a
  table of weights such as ``{patterns = 0.5, brain = 0.5}``; default "patterns".
- ``patch``: [X, Y, Z] generated grid shape, default [64, 64, 64].
- ``voxel_size_mm``: [x, y, z], default [1, 1, 1]; or ``voxel_size_range_mm``:
  [[lo, hi], [lo, hi], [lo, hi]], a uniform voxel size per axis and sample
  (Meta-QSM: [[0.5, 1.0], [0.5, 1.0], [2.0, 4.0]]).
- ``b0_dir``: [x, y, z] B0 in voxel coordinates, default [0, 0, 1].
- ``border_vox``: source-free border of the pattern generator, default 10
  (shorthand for ``patterns.border_vox``).
- ``pad_factor``: zero padding of the FFT forward model used for the
  pattern and brain generators, default 2 (at least 2).
- ``mask``: region of interest of the pattern and analytic generators:
  "full" (all ones, default), "border" (ones except ``mask_border_vox``
  voxels on each face, default ``border_vox``) or "blob" (a random smooth
  blob, ``random_blob_mask``). For "patterns", chi is zeroed outside the
  mask before the forward model, so the field inside is explained by chi
  inside; for "analytic", chi and field are masked after (its objects, like
  its infinite cylinders, may extend outside). The brain generator always
  uses its brain mask. The field is zero outside the mask.
- ``magnitude``: "random" (``random_magnitude``, default) or "ones", for the
  pattern and analytic generators; the brain generator uses the phantom's.
- ``patterns``, ``analytic``, ``brain``: tables of keyword options passed to
  the generator (e.g. ``patterns = {large_share = 0.5}``).

``augment_cfg`` is the ``qsmprep.deep.augment.Augmenter`` configuration
(rot90_b0, flip, amplitude, background_residual, field_noise_ppm, rician_snr, te_s, b0_tesla,
crop); a crop makes the yielded patch smaller than ``patch``.
"""

import numpy as np
import torch
from scipy import fft as spfft
from torch.utils.data import IterableDataset, get_worker_info

from qsmprep.checks import check_table
from qsmprep.deep.augment import Augmenter
from qsmprep.deep.generators import (
    BORDER_VOX,
    analytic_spheres_cylinders,
    brain_like_sample,
    random_blob_mask,
    random_magnitude,
    random_patterns_chi,
)
from qsmprep.errors import UsageError
from qsmprep.physics.forward import forward_field_ppm

GENERATORS = ("patterns", "analytic", "brain")
"""Generator names a data config may use."""

DEFAULT_PATCH = (64, 64, 64)
"""Generated grid shape (voxels) when a data config gives no ``patch``."""

SAMPLE_KEYS = ("field", "chi", "mask", "magnitude", "voxel_size")
"""Keys of every yielded sample."""

_VALIDATION_STREAM = 0x5EED
"""Seed-sequence key that keeps validation samples apart from training streams."""


class _SampleMaker:
    """Draws one un-augmented sample (dict of NumPy arrays) from a data config."""

    def __init__(self, data_cfg):
        from .recipes import active_generators, library_checks  # the recipes' tables (they import this module too)

        cfg = dict(data_cfg or {})
        checks = library_checks()
        check_table(cfg, checks["data"], "[data]", "data config")
        for name in GENERATORS:
            check_table(cfg.get(name, {}), checks[f"data.{name}"], f"[data.{name}]", "data config")
        generator = cfg.get("generator", "patterns")
        self.names = active_generators(cfg)  # a generator of weight 0 is never drawn, nor checked as if it were
        self.probs = np.asarray([1.0] if isinstance(generator, str) else [generator[n] for n in self.names],
                                dtype=np.float64)
        self.probs /= self.probs.sum()
        self.patch = tuple(int(n) for n in cfg.get("patch", DEFAULT_PATCH))
        if "voxel_size_mm" in cfg and "voxel_size_range_mm" in cfg:
            raise UsageError("data config: give [data] voxel_size_mm or voxel_size_range_mm, not both")
        self.voxel = tuple(float(v) for v in cfg.get("voxel_size_mm", (1.0, 1.0, 1.0)))
        self.voxel_range = cfg.get("voxel_size_range_mm")
        if self.voxel_range is not None:
            self.voxel_range = np.asarray(self.voxel_range, dtype=np.float64)
        self.b0_dir = tuple(float(b) for b in cfg.get("b0_dir", (0.0, 0.0, 1.0)))
        self.pad_factor = float(cfg.get("pad_factor", 2.0))
        self.border_vox = int(cfg.get("border_vox", BORDER_VOX))
        self.mask = cfg.get("mask", "full")
        self.mask_border_vox = int(cfg.get("mask_border_vox", self.border_vox))
        self.magnitude = cfg.get("magnitude", "random")
        self.options = {n: dict(cfg.get(n, {})) for n in GENERATORS}
        self.options["patterns"].setdefault("border_vox", self.border_vox)

    def voxel_size(self, rng):
        if self.voxel_range is None:
            return self.voxel
        # float32-representable, so the float32 "voxel_size" reproduces the field exactly
        return tuple(float(np.float32(rng.uniform(lo, hi))) for lo, hi in self.voxel_range)

    def roi(self, rng, voxel):
        if self.mask == "full":
            return np.ones(self.patch, dtype=np.float32)
        if self.mask == "blob":
            return random_blob_mask(rng, self.patch, voxel)
        mask = np.zeros(self.patch, dtype=np.float32)
        b = self.mask_border_vox
        mask[tuple(slice(b, n - b) for n in self.patch)] = 1
        return mask

    def __call__(self, rng):
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        voxel = self.voxel_size(rng)
        opts = self.options[name]
        if name == "brain":
            sample = brain_like_sample(rng, self.patch, voxel, **opts)
            chi, mask, magnitude = sample["chi"], sample["mask"], sample["magnitude"]
            field = forward_field_ppm(chi, voxel, self.b0_dir, self.pad_factor)
        else:
            mask = self.roi(rng, voxel)
            if name == "patterns":
                chi = random_patterns_chi(rng, self.patch, voxel, **opts) * mask
                field = forward_field_ppm(chi, voxel, self.b0_dir, self.pad_factor)
            else:
                chi, field = analytic_spheres_cylinders(rng, self.patch, voxel, self.b0_dir, **opts)
                chi = chi * mask
            if self.magnitude == "random":
                magnitude = random_magnitude(rng, self.patch, voxel) * mask
            else:
                magnitude = mask.copy()
        return {
            "chi": chi.astype(np.float32),
            "field": (field * mask).astype(np.float32),
            "mask": mask.astype(np.float32),
            "magnitude": magnitude.astype(np.float32),
            "voxel_size": np.asarray(voxel, dtype=np.float32),
        }


def _to_tensors(sample):
    out = {k: torch.from_numpy(np.ascontiguousarray(sample[k], dtype=np.float32))[None] for k in SAMPLE_KEYS[:4]}
    out["voxel_size"] = torch.as_tensor(np.asarray(sample["voxel_size"], dtype=np.float32))
    return out


class SyntheticQSMDataset(IterableDataset):
    """Infinite stream of synthetic (field, chi, mask, magnitude, voxel_size) samples.

    Worker w of a DataLoader (w = 0 without workers) draws from
    ``numpy.random.default_rng([seed, w])``; iterating again restarts the
    same stream. See the module docstring for the configurations.
    """

    def __init__(self, data_cfg, augment_cfg, seed):
        self.make = _SampleMaker(data_cfg)
        self.augment_cfg = dict(augment_cfg or {})
        self.seed = int(seed)
        Augmenter(self.augment_cfg, np.random.default_rng(0), self.make.b0_dir)  # validate early

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, worker])
        augment = Augmenter(self.augment_cfg, rng, self.make.b0_dir)
        # a DataLoader worker is one of several processes: one FFT thread each (a fork would inherit
        # the trainer's scipy.fft.set_workers, all cores, and oversubscribe them)
        with spfft.set_workers(1 if info is not None else spfft.get_workers()):
            while True:
                yield _to_tensors(augment(self.make(rng)))


def build_dataset(data_cfg, augment_cfg, seed):
    """Infinite seeded training dataset (``SyntheticQSMDataset``) from the two config tables."""
    return SyntheticQSMDataset(data_cfg, augment_cfg, seed)


def build_validation_set(data_cfg, n, seed):
    """``n`` fixed samples (list of tensor dicts, no augmentation) for validation.

    Drawn from ``numpy.random.default_rng([seed, 0x5EED])``, a stream no
    training worker uses, so validation never repeats a training sample.
    """
    make = _SampleMaker(data_cfg)
    rng = np.random.default_rng([int(seed), _VALIDATION_STREAM])
    return [_to_tensors(make(rng)) for _ in range(int(n))]
