"""Train a dipole-inversion network from a recipe (see ``qsmprep.deep.recipes``).

One loop serves the five methods:

- supervised (U-Net/Jochmann, Meta-QSM, SI-QSM, and QSMGAN's pre-training):
  loss(model(field), chi) on on-the-fly synthetic pairs;
- QSMInvNet+ (``[domain]``): the supervised loss on synthetic data (batch-norm
  domain 0) plus lambda x the data-consistency loss on unlabelled target-domain
  fields (domain 1), lambda rising linearly to ``lambda_max`` over ``lambda_ramp_steps``, then constant;
- QSMGAN (``[adversarial]``): L1 generator pre-training, then the critic alone
  with the generator fixed, then WGAN-GP with ``n_critic`` critic updates per
  generator update.

Outputs in ``out_dir``: ``checkpoint.safetensors`` (+ ``.json``, latest),
``best.safetensors`` (+ ``.json``, lowest validation NRMSE),
``optimizer.safetensors`` (optimiser, and for QSMGAN critic, state for
``resume``), ``losses.csv``, ``validation.csv`` and ``losses.png``.

Determinism: one seed sets Python, NumPy and torch RNGs, the data stream
(``build_dataset(..., seed)``, which seeds its workers) and the fixed
validation set.  A resumed run restarts the data stream and the RNGs from
``seed + step``, so it is reproducible but not sample-identical to an
uninterrupted run; it keeps the optimiser state and the fp16 loss scale.
"""

import csv
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from qsmprep.deep import recorded_recipe
from qsmprep.deep.data import DEFAULT_PATCH, build_dataset, build_validation_set
from qsmprep.deep.losses import (
    build_loss, tanh_target, wgan_generator_loss, wgan_gp_critic_loss,
)
from qsmprep.deep.models import QSMGANCritic, build_model
from qsmprep.deep.recipes import active_generators, recipe_changes, toml_like, validate_recipe
from qsmprep.deep.registry import load_model, read_tensors, save_checkpoint, save_tensors
from qsmprep.errors import DataError, NoInputError, UsageError
from qsmprep.metrics import hfen, nrmse
from qsmprep.physics import resolve_device
from qsmprep.resources import available_cores

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 1_000_003
TARGET_SEED_OFFSET = 2_000_003


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(optim_cfg, step):
    """Learning rate at ``step``: constant, or lr x decay_rate^(step // decay_steps)."""
    lr = float(optim_cfg["lr"])
    if optim_cfg["schedule"] == "exponential":
        lr *= float(optim_cfg["decay_rate"]) ** (step // int(optim_cfg["decay_steps"]))  # defaults: OPTIM_DEFAULTS
    return lr


def make_optimizer(params, optim_cfg, lr=None, betas=None):
    """Adam or RMSprop from an ``[optim]``-like table."""
    lr = float(optim_cfg["lr"] if lr is None else lr)
    wd = float(optim_cfg.get("weight_decay", 0.0))
    if optim_cfg.get("name", "adam") == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas or optim_cfg.get("betas", (0.9, 0.999))), weight_decay=wd)


def optimizer_tensors(optimizer, prefix):
    """Flatten an optimiser state into safetensors-ready tensors (+ JSON-able groups)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"{prefix}.{index}.{key}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def restore_optimizer(optimizer, tensors, groups, prefix):
    """Inverse of :func:`optimizer_tensors`."""
    state = {}
    for name, value in tensors.items():
        head, index, key = name.split(".", 2)
        if head == prefix:
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def earlier_stages(meta):
    """The training stages behind a checkpoint's weights, oldest first, for the ``lineage`` of a run started from
    it: its own ``lineage`` and then itself, each as {"step", "recipe" (description), "init"}, with the stage's
    ``recipe_changes`` where it was resumed with a changed recipe. A fine-tune's checkpoint then tells the model's
    whole training, not only its own last stage."""
    recipe, train = recorded_recipe(meta)
    stage = {"step": meta.get("step"), "recipe": recipe.get("description"), "init": train.get("init") or None}
    if meta.get("recipe_changes"):
        stage["recipe_changes"] = meta["recipe_changes"]
    return [*(meta.get("lineage") or []), stage]


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _crop(x, margin):
    return x[..., margin:-margin, margin:-margin, margin:-margin] if margin else x


def _stacked(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _scorable(chi, mask):
    """Whether NRMSE and HFEN can score a sample: a mask of two voxels or more, with chi contrast inside."""
    return mask.sum() >= 2 and np.ptp(chi[mask > 0]) > 0


STRUCTURE_KEYS = {"patterns": "amplitude_ppm and n_structures", "analytic": "chi_max_ppm, n_spheres and n_cylinders",
                  "brain": "contrast_scale and contrast_offset_ppm"}
"""The keys of each generator's [data.<generator>] table that decide whether its samples hold any contrast."""


def check_validation_set(samples, crop_margin, data_cfg):
    """Raise UsageError, naming the likely [data] keys, when no validation sample can be scored (``validation_scores``
    would fail at the first validation, after training ``val_every`` steps for nothing)."""
    m = crop_margin
    if not any(_scorable(_crop(s["chi"], m)[0].numpy(), _crop(s["mask"], m)[0].numpy()) for s in samples):
        keys = "; ".join(f"[data.{name}] {STRUCTURE_KEYS[name]}" for name in active_generators(data_cfg))
        raise UsageError(f"none of the {len(samples)} validation samples of the recipe's [data] has susceptibility "
                         f"contrast inside its mask: check {keys}, or raise [train] val_samples.")


@torch.no_grad()
def validation_scores(model, samples, device="cpu"):
    """Mean NRMSE and HFEN (%, demeaned in the mask) of ``model`` on ``samples``.

    Parameters
    ----------
    model : torch.nn.Module
        A network with the ``model(field, mask=, voxel_size=, domain=)`` call of
        ``qsmprep.deep.models``; left in eval mode.
    samples : list of dict
        Tensor dicts from ``build_validation_set`` (field, chi, mask, voxel_size).
    device : str or torch.device, default "cpu"

    Samples whose mask holds fewer than two voxels or no chi contrast are
    skipped; a set with none left raises DataError.
    """
    model.eval()
    m = model.crop_margin
    scores = []
    for sample in samples:
        batch = _to({k: v[None] for k, v in sample.items()}, device)
        chi = model(batch["field"], mask=batch["mask"], voxel_size=batch["voxel_size"], domain=0).float()
        ref = _crop(batch["chi"], m)[0, 0].cpu().numpy()
        mask = _crop(batch["mask"], m)[0, 0].cpu().numpy()
        if not _scorable(ref, mask):
            continue
        pred = chi[0, 0].cpu().numpy()
        scores.append((nrmse(pred, ref, mask), hfen(pred, ref, mask)))
    if not scores:
        raise DataError("the validation set has no sample with structure inside its mask: check the [data] section.")
    return {"nrmse": float(np.mean([s[0] for s in scores])), "hfen": float(np.mean([s[1] for s in scores]))}


def data_workers(num_workers, cuda):
    """DataLoader worker processes that synthesise the training samples, for ``[train] num_workers``: the number
    given, or for "auto" every core this process may use but the trainer's own (``available_cores``; at least 1)
    when the network trains on a GPU, which steps faster than samples are made (on an H100, 7 workers kept it about
    11 % busy: docs/models/qsmprep-cfl2unet.md); on a CPU 1, the network's own step taking most of the time there
    (1.6 s a step of 2 64^3 samples on 2 cores, against about 0.1 s to make a sample)."""
    if num_workers != "auto":
        return int(num_workers)
    return max(1, available_cores() - 1) if cuda else 1


def _check_target_field(field, inside, path):
    """Raise DataError for a target-domain field with non-finite values in its mask, or far stronger than a tissue
    field in ppm (a field in Hz, a phase in rad or a total field: the data-consistency loss would then train the
    network on fields wrong in scale, without a word); warn when it is outside the usual range
    (``qsmprep.physics.units.local_field_scale``)."""
    from qsmprep.physics.units import GAMMA_BAR_MHZ_PER_T, TYPICAL_LOCAL_FIELD_PPM, local_field_scale

    bad = int((~np.isfinite(field[inside])).sum())
    if bad:
        raise DataError(f"target-domain field {path} has {bad} NaN or infinite values inside its mask: fill them or "
                        "remove them from the mask.")
    level, verdict = local_field_scale(field, inside)
    read = f"target-domain field {path}: 1 % of its mask's voxels are beyond {level:.3g} ppm"
    gamma = f"{GAMMA_BAR_MHZ_PER_T:.3f}"
    convert = (f"the fields must be local (tissue) fields in ppm of B0: Hz / ({gamma} x B0 in T), "
               f"rad / (2 pi x TE in s x {gamma} x B0 in T)")
    low, high = TYPICAL_LOCAL_FIELD_PPM
    if verdict == "implausible":
        raise DataError(f"{read}, but a local field is rarely beyond {high:g} ppm: {convert}; a total field needs "
                        "background-field removal first (qsmprep writes the local field as desc-local_fieldmap).")
    if verdict:
        log.warning("%s, outside the %g-%g ppm of tissue fields: if it is not a large lesion, check its units (%s).",
                    read, low, high, convert)


class TargetDomainFields:
    """Unlabelled target-domain local fields for QSMInvNet+ (``[domain]``).

    ``source = "simulated"`` (default): brain-like fields from the data
    generator with the ``[domain.augment]`` noise, their chi discarded.
    Otherwise ``source`` is a directory of ``<name>_field.nii[.gz]`` (local
    field, ppm) with ``<name>_mask.nii[.gz]`` and optionally
    ``<name>_magnitude.nii[.gz]``; random patches of the recipe's patch size
    are cut from them (volumes smaller than a patch are zero-padded).
    """

    def __init__(self, domain_cfg, data_cfg, seed, num_workers):
        self.batch_size = int(domain_cfg.get("batch_size", 1))
        self.patch = tuple(int(n) for n in data_cfg.get("patch", DEFAULT_PATCH))
        source = domain_cfg.get("source", "simulated")
        if source == "simulated":
            target_data = {**data_cfg, "generator": "brain"}
            dataset = build_dataset(target_data, domain_cfg.get("augment", {}), seed + TARGET_SEED_OFFSET)
            self._iter = iter(DataLoader(dataset, batch_size=self.batch_size, num_workers=num_workers))
            self.volumes = None
        else:
            self.volumes = self._load_directory(Path(source))
            self.rng = np.random.default_rng(seed + TARGET_SEED_OFFSET)

    @staticmethod
    def _load_directory(directory):
        from qsmprep.io import check_same_grid, load_nifti
        from qsmprep.masking import check_mask
        from qsmprep.physics.orientation import voxel_size_from_affine

        if not directory.is_dir():
            raise NoInputError(f"target-domain directory {directory} does not exist: give a folder of *_field/*_mask NIfTI pairs.")
        volumes = []
        for field_path in sorted(directory.glob("*_field.nii*")):
            stem = field_path.name.split("_field.nii")[0]
            suffix = field_path.name[len(stem) + len("_field") :]
            mask_path = directory / f"{stem}_mask{suffix}"
            field, affine, _ = load_nifti(field_path, "target-domain local field (ppm)")
            mask, mask_affine, _ = load_nifti(mask_path, "target-domain mask")
            check_same_grid(field_path, (field.shape, affine), mask_path, (mask.shape, mask_affine), labels=True)
            mag_path = directory / f"{stem}_magnitude{suffix}"
            if mag_path.is_file():
                magnitude, mag_affine, _ = load_nifti(mag_path, "target-domain magnitude")
                check_same_grid(field_path, (field.shape, affine), mag_path, (magnitude.shape, mag_affine))
            else:
                magnitude = (mask > 0).astype(np.float32)
            if field.ndim != 3:
                raise DataError(f"{field_path} has shape {field.shape}: a 3D local field map (ppm) is needed.")
            inside = check_mask(mask, source=f"target-domain mask {mask_path}", region="a brain mask")
            _check_target_field(field, inside, field_path)
            volumes.append((field, inside.astype(np.float32), magnitude, np.asarray(voxel_size_from_affine(affine), np.float32)))
        if not volumes:
            raise NoInputError(f"{directory} holds no <name>_field.nii[.gz] files: add field/mask pairs or use source = \"simulated\".")
        log.info("target domain: %d field maps from %s", len(volumes), directory)
        return volumes

    def _patch(self):
        field, mask, magnitude, voxel = self.volumes[self.rng.integers(len(self.volumes))]
        pad = [(0, max(p - n, 0)) for n, p in zip(field.shape, self.patch)]
        starts = [int(self.rng.integers(max(n + a + b - p, 0) + 1)) for n, (a, b), p in zip(field.shape, pad, self.patch)]
        cut = tuple(slice(s, s + p) for s, p in zip(starts, self.patch))
        return {
            "field": torch.from_numpy(np.pad(field, pad)[cut][None].copy()),
            "mask": torch.from_numpy(np.pad(mask, pad)[cut][None].copy()),
            "magnitude": torch.from_numpy(np.pad(magnitude, pad)[cut][None].copy()),
            "voxel_size": torch.from_numpy(voxel),
        }

    def next(self):
        """A batch dict with field, mask, magnitude (B, 1, X, Y, Z) and voxel_size (B, 3)."""
        if self.volumes is None:
            return next(self._iter)
        return _stacked([self._patch() for _ in range(self.batch_size)])


class _CsvLog:
    """Append-only CSV with a header; on resume keeps only rows up to ``step``."""

    def __init__(self, path, fields, resume_step=None):
        self.path, self.fields = Path(path), list(fields)
        rows = []
        if resume_step is not None and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.fields} for r in rows)

    def add(self, row):
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row.get(k, "") for k in self.fields})

    def read(self):
        with self.path.open() as f:
            return list(csv.DictReader(f))


def plot_curves(loss_rows, val_rows, path):
    """Training loss (log scale) and validation NRMSE against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.array([int(r["step"]) for r in loss_rows])
    loss = np.array([float(r["loss"]) for r in loss_rows])
    ax.plot(steps, loss, lw=0.5, color="tab:blue", alpha=0.3, label="training loss")
    window = len(loss) // 50  # a small batch's loss is noisy: show its trend over 2 % of the run too
    if window > 1:
        trend = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], trend, lw=1.5, color="tab:blue", label=f"training loss, mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    if val_rows:
        ax2 = ax.twinx()
        ax2.plot([int(r["step"]) for r in val_rows], [float(r["nrmse"]) for r in val_rows], ".-", color="tab:red", label="validation NRMSE")
        ax2.set_ylabel("validation NRMSE (%)")
    fig.legend(loc="upper right", bbox_to_anchor=(0.87, 0.93), framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Trainer:
    """State of one training run; use :func:`train`."""

    def __init__(self, recipe, out_dir, device):
        self.recipe = recipe
        self.out = Path(out_dir)
        self.device = device
        self.cuda = device.type == "cuda"
        tr = recipe["train"]
        self.seed = int(tr["seed"])
        seed_everything(self.seed)
        model_cfg = {k: v for k, v in recipe["model"].items() if k != "arch"}
        self.model = build_model(recipe["model"]["arch"], **model_cfg).to(device)
        self.memory_format = torch.channels_last_3d if self.cuda else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer = make_optimizer(self.model.parameters(), recipe["optim"])
        self.loss_fn = build_loss(recipe["loss"])
        self.amp = bool(tr["amp"]) and self.cuda
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.adv = recipe.get("adversarial")
        self.critic = self.critic_opt = None
        if self.adv:
            self.critic = QSMGANCritic(int(self.adv.get("critic_width", recipe["model"].get("width", 32)))).to(device)
            self.critic = self.critic.to(memory_format=self.memory_format)
            self.critic_opt = make_optimizer(self.critic.parameters(), recipe["optim"], lr=self.adv["lr"], betas=self.adv.get("betas"))
        self.domain = recipe.get("domain")
        if self.domain:
            self.domain_loss = build_loss(self.domain.get("loss", {"name": "data_consistency", "magnitude_weights": True}))
        self.step = 0
        self.best_nrmse = math.inf
        self.last_validation = {}  # NRMSE / HFEN of the checkpoint restored, if any
        self.lineage = []  # the earlier training stages of the weights it starts from (``initialise_from``)
        self.recipe_changes = []  # the steps at which resumes changed the recipe (``restore``), oldest first
        if tr["init"]:
            self.initialise_from(tr["init"])

    def _check_same_network(self, source, meta, fix):
        """DataError naming what differs between the network in ``source`` and the recipe's, and the ``fix``."""
        if meta.get("arch") != self.model.arch:
            raise DataError(f"{source} holds a {meta.get('arch')}, not this recipe's {self.model.arch}: {fix}.")
        theirs, ours = meta.get("params") or {}, self.model.params
        differ = [f"{key} {theirs.get(key)!r} against the recipe's {ours.get(key)!r}"
                  for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
        if differ:
            raise DataError(f"{source} holds a {self.model.arch} with {'; '.join(differ)}: {fix}.")

    def initialise_from(self, name_or_path):
        """Start from the weights of a shipped model or checkpoint (fine-tuning); the optimiser starts afresh."""
        net, meta = load_model(name_or_path, device=self.device)
        self._check_same_network(f"[train] init {name_or_path!r}", meta,
                                 "set [model] to match it (--set model.KEY=VALUE), or give another train.init")
        self.model.load_state_dict(net.state_dict())
        self.lineage = earlier_stages(meta)
        log.info("initialised from %s (its step %s)", name_or_path, meta.get("step", "?"))

    # -- data ---------------------------------------------------------------
    def start_data(self):
        tr = self.recipe["train"]
        workers = data_workers(tr["num_workers"], self.cuda)
        log.info("training data: %d worker process(es)%s", workers, " (auto)" if tr["num_workers"] == "auto" else "")
        # first: a [data] without contrast is refused before any step is trained or data worker started
        self.validation = build_validation_set(self.recipe["data"], int(tr["val_samples"]), self.seed + VALIDATION_SEED_OFFSET)
        check_validation_set(self.validation, self.model.crop_margin, self.recipe["data"])
        self.target = None
        if self.domain:  # a bad --target-domain is refused before the training data workers start
            self.target = TargetDomainFields(self.domain, self.recipe["data"], self.seed + self.step, workers)
        dataset = build_dataset(self.recipe["data"], self.recipe["augment"], self.seed + self.step)
        loader = DataLoader(
            dataset,
            batch_size=int(tr["batch_size"]),
            num_workers=workers,
            pin_memory=self.cuda,
            persistent_workers=workers > 0,
        )
        self.batches = iter(loader)

    def next_batch(self):
        batch = _to(next(self.batches), self.device)
        for key in ("field", "chi", "mask", "magnitude"):
            if key in batch:
                batch[key] = batch[key].contiguous(memory_format=self.memory_format)
        return batch

    # -- losses -------------------------------------------------------------
    def predict(self, batch, domain=0, raw=True):
        """The model on ``batch`` (under autocast when training in mixed precision), in float32: network space
        (``raw``, default) or ppm; ``domain`` 0 for synthetic, 1 for target-domain data (QSMInvNet+)."""
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp):
            return self.model(batch["field"], mask=batch["mask"], voxel_size=batch["voxel_size"], raw=raw,
                              domain=domain).float()

    def content_loss(self, batch):
        """Supervised loss in network space; returns (loss, raw prediction)."""
        m = self.model.crop_margin
        raw = self.predict(batch)
        cropped = {k: _crop(v, m) if v.dim() == 5 else v for k, v in batch.items()}
        target = cropped["chi"]
        if self.model.output_transform == "tanh10":
            target = tanh_target(target)
        return self.loss_fn(raw, target, cropped), raw

    def domain_weight(self):
        return float(self.domain.get("lambda_max", 0.1)) * min(1.0, self.step / max(1, int(self.domain.get("lambda_ramp_steps", 1))))

    def adversarial_phase(self):
        """"content" (generator pre-training), "critic" (critic alone) or "joint"."""
        if not self.adv:
            return "content"
        g_pre, c_pre = int(self.adv["generator_pretrain_steps"]), int(self.adv["critic_pretrain_steps"])
        return "content" if self.step < g_pre else "critic" if self.step < g_pre + c_pre else "joint"

    def _backward_step(self, loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def _critic_update(self, batch):
        with torch.no_grad():
            fake = self.predict(batch)
        real = tanh_target(_crop(batch["chi"], self.model.crop_margin))
        loss = wgan_gp_critic_loss(self.critic, real, fake, gp_weight=float(self.adv["gp_weight"]))
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        return loss.item()

    def train_step(self):
        """One optimisation step; returns a dict of logged values."""
        lr = learning_rate(self.recipe["optim"], self.step)
        phase = self.adversarial_phase()
        if phase != "content":
            lr = float(self.adv["lr"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        row = {"lr": lr}
        self.model.train()
        if phase == "critic":
            row["critic_loss"] = self._critic_update(self.next_batch())
            with torch.no_grad():
                row["loss"] = float(self.content_loss(self.next_batch())[0])
            return row
        if phase == "joint":
            row["critic_loss"] = sum(self._critic_update(self.next_batch()) for _ in range(int(self.adv["n_critic"]))) / int(self.adv["n_critic"])
        batch = self.next_batch()
        loss, raw = self.content_loss(batch)
        row["loss"] = loss.item()
        total = loss
        if phase == "joint":
            adv_loss = wgan_generator_loss(self.critic, raw)
            row["adversarial_loss"] = adv_loss.item()
            total = float(self.adv["content_weight"]) * loss + float(self.adv["adversarial_weight"]) * adv_loss
        if self.target is not None:
            weight = self.domain_weight()
            tb = _to(self.target.next(), self.device)
            dc = self.domain_loss(self.predict(tb, domain=1, raw=False), None, tb)
            row["domain_loss"], row["domain_weight"] = dc.item(), weight
            total = total + weight * dc
        self._backward_step(total, self.optimizer)
        return row

    # -- validation and checkpoints -----------------------------------------
    def validate(self):
        """Mean NRMSE and HFEN (%) of the model on the held-out synthetic set."""
        return validation_scores(self.model, self.validation, self.device)

    def save(self, metrics):
        """Write the optimiser state, then the checkpoint: a run stopped between the two leaves an optimiser state
        that ``restore`` sees is not the checkpoint's (its "step" differs) and does not load."""
        tensors, groups = optimizer_tensors(self.optimizer, "model")
        extra = {"model": groups}
        if self.critic is not None:
            critic_tensors, critic_groups = optimizer_tensors(self.critic_opt, "critic")
            tensors.update(critic_tensors)
            tensors.update({f"critic_weights.{k}": v for k, v in self.critic.state_dict().items()})
            extra["critic"] = critic_groups
        # the fp16 loss scale (empty where the scaler is off: CPU, bf16) resumes where it was, not at 2^16
        save_tensors(self.out / "optimizer.safetensors", tensors,
                     {"step": self.step, "param_groups": extra, "grad_scaler": self.scaler.state_dict()})
        meta = {"recipe": self.recipe, "step": self.step, "validation": metrics, "best_nrmse": self.best_nrmse,
                "lineage": self.lineage, "recipe_changes": self.recipe_changes}
        save_checkpoint(self.model, self.out / "checkpoint.safetensors", meta)

    def restore(self):
        """Load the latest checkpoint and optimiser state from ``out_dir``; returns the step."""
        if not (self.out / "checkpoint.safetensors").is_file():
            raise NoInputError(f"--resume: {self.out} holds no checkpoint.safetensors to continue from: run without "
                               "--resume to start a new run there, or give the --out of the run to continue.")
        tensors, meta = read_tensors(self.out / "checkpoint.safetensors", self.device)
        self._check_same_network(self.out / "checkpoint.safetensors", meta, "resume with the recipe it was trained with, "
                                 "or choose a new --out")
        self.model.load_state_dict(tensors)
        self.step = int(meta["step"])
        seed_everything(self.seed + self.step)  # as the data stream: random draws in the loop (QSMGAN's penalty) go on
        optimizer_file = self.out / "optimizer.safetensors"
        opt_tensors, opt_meta = read_tensors(optimizer_file, self.device) if optimizer_file.is_file() else ({}, {})
        if opt_meta.get("step") != self.step:  # the run stopped while saving: the two states do not belong together
            log.warning("%s %s, not from the checkpoint's step %d (the run was stopped while saving): %s afresh at "
                        "step %d", optimizer_file, f"is from step {opt_meta['step']}" if opt_meta else "is missing",
                        self.step, "the optimisers and the critic start" if self.critic is not None else
                        "the optimiser starts", self.step)
        else:
            restore_optimizer(self.optimizer, opt_tensors, opt_meta["param_groups"]["model"], "model")
            if opt_meta.get("grad_scaler"):
                self.scaler.load_state_dict(opt_meta["grad_scaler"])
            if self.critic is not None:
                self.critic.load_state_dict({k.split(".", 1)[1]: v for k, v in opt_tensors.items()
                                             if k.startswith("critic_weights.")})
                restore_optimizer(self.critic_opt, opt_tensors, opt_meta["param_groups"]["critic"], "critic")
        self.best_nrmse = float(meta.get("best_nrmse", math.inf))
        self.last_validation = meta.get("validation") or {}
        self.lineage = meta.get("lineage") or []
        self.recipe_changes = [*(meta.get("recipe_changes") or []), *self._changed_recipe(meta.get("recipe") or {})]
        return self.step

    def _changed_recipe(self, recorded):
        """[{"step", "changes": {key: {"from", "to"}}}] where this run's recipe differs from the ``recorded`` one of
        the checkpoint it resumes (``recipe_changes``; [] where it does not), warned of: the checkpoint's recipe
        will be this one, which its steps so far were not trained with."""
        changes = recipe_changes(recorded, self.recipe)
        if not changes:
            return []
        log.warning("resuming %s at step %d with a recipe that differs from its checkpoint's: %s. Steps after %d use "
                    "the new values; the checkpoint records the change under recipe_changes. To go on as before, "
                    "resume with the run's own recipe and --set options.", self.out, self.step,
                    "; ".join(f"{key} {toml_like(old)} -> {toml_like(new)}" for key, (old, new) in changes.items()),
                    self.step)
        return [{"step": self.step, "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}]


PROGRESS_EVERY_S = 60.0
"""Seconds between ``train``'s progress lines where standard error is not a terminal (no progress bar)."""


def progress_line(arch, step, last, row, elapsed_s, steps_done):
    """One line of training progress for a log: step of ``last``, loss, samples/s and the time left at the
    mean pace of the ``steps_done`` steps of ``elapsed_s`` seconds so far (validation included)."""
    left_min = (last - step) * elapsed_s / max(steps_done, 1) / 60
    return (f"train {arch}: step {step}/{last} ({100 * step / last:.0f} %), loss {row['loss']:.4g}, "
            f"{row['samples_per_s']:.1f} samples/s, about {left_min:.0f} min left")


def _last_step(train_cfg, max_steps):
    """The step a run ends at: the recipe's ``train.steps``, or ``max_steps`` if lower (a higher one is warned of)."""
    steps = int(train_cfg["steps"])
    if max_steps is None:
        return steps
    if int(max_steps) > steps:
        log.warning("max_steps %d is past the recipe's %d steps, which end the run: to train longer, raise "
                    "train.steps (--set train.steps=%d)", int(max_steps), steps, int(max_steps))
    return min(steps, int(max_steps))


def _timed_step(trainer, batch_size):
    """Run and count one optimisation step; returns its row with step and samples/s, DataError if the loss diverged."""
    tick = time.perf_counter()
    row = trainer.train_step()
    trainer.step += 1
    row["step"] = trainer.step
    row["samples_per_s"] = batch_size / max(time.perf_counter() - tick, 1e-9)
    if not math.isfinite(row["loss"]):
        raise DataError(f"training diverged at step {trainer.step} (loss {row['loss']}): lower [optim] lr.")
    return row


def _validate_and_save(trainer, loss_log, val_log):
    """Validate and log the scores, save the best and latest checkpoints and redraw the curves; returns the scores."""
    metrics = trainer.validate()
    val_log.add({"step": trainer.step, **metrics})
    log.info("step %d: validation NRMSE %.1f%%, HFEN %.1f%%", trainer.step, metrics["nrmse"], metrics["hfen"])
    if metrics["nrmse"] < trainer.best_nrmse:
        trainer.best_nrmse = metrics["nrmse"]
        save_checkpoint(trainer.model, trainer.out / "best.safetensors",
                        {"recipe": trainer.recipe, "step": trainer.step, "validation": metrics,
                         "lineage": trainer.lineage, "recipe_changes": trainer.recipe_changes})
    trainer.save(metrics)
    plot_curves(loss_log.read(), val_log.read(), trainer.out / "losses.png")
    return metrics


RUN_FILES = ("checkpoint.safetensors", "checkpoint.json", "best.safetensors", "best.json", "optimizer.safetensors",
             "losses.csv", "validation.csv", "losses.png")
"""The files a run writes in its output folder."""


def check_new_run_folder(out):
    """Raise UsageError naming the ``RUN_FILES`` that ``out`` already holds: a new run there would overwrite them,
    or, stopped before its first checkpoint, delete them."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held:
        return
    if "checkpoint.safetensors" in held:
        fix = "pass --resume to continue that run, or choose another --out"
    else:  # a user's own files, or what a run killed (SIGKILL) before its first checkpoint left
        fix = "choose another --out, or move those files away (--resume needs the run's checkpoint.safetensors)"
    raise UsageError(f"--out {out} already holds {', '.join(held)}, files a training run writes, which a new run "
                     f"there would overwrite: {fix}.")


def _remove_unsaved_run(out, made):
    """Delete what a run stopped before its first checkpoint wrote, and ``out`` itself if this run ``made`` it and
    nothing else is in it: logs without a checkpoint are a partial output, which nothing can resume. Only a new run
    gets here (a resumed one has its checkpoint), and ``check_new_run_folder`` let it start only where none of the
    ``RUN_FILES`` was, so every one there is its own."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if made and not any(out.iterdir()):
        out.rmdir()


def _train_steps(trainer, last, max_minutes, resume):
    """Train from ``trainer.step`` to ``last``, logging, validating and saving as the recipe asks; returns the
    losses of these steps and the last validation scores."""
    from tqdm.auto import tqdm

    out, tr, arch = trainer.out, trainer.recipe["train"], trainer.recipe["model"]["arch"]
    loss_fields = ["step", "loss", "lr", "samples_per_s", "critic_loss", "adversarial_loss", "domain_loss", "domain_weight"]
    loss_log = _CsvLog(out / "losses.csv", loss_fields, trainer.step if resume else None)
    val_log = _CsvLog(out / "validation.csv", ["step", "nrmse", "hfen"], trainer.step if resume else None)
    started = reported = time.monotonic()
    losses, metrics = [], trainer.last_validation
    bar_shown = sys.stderr.isatty()  # a batch job's log gets a progress line a minute instead of a bar
    with tqdm(total=last, initial=min(trainer.step, last), desc=f"train {arch}", unit="step",
              disable=not bar_shown) as bar:
        while trainer.step < last:
            row = _timed_step(trainer, int(tr["batch_size"]))
            losses.append(row["loss"])
            loss_log.add(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", samples_s=f"{row['samples_per_s']:.1f}")
            if not bar_shown and time.monotonic() - reported >= PROGRESS_EVERY_S:
                reported = time.monotonic()
                sys.stderr.write(progress_line(arch, trainer.step, last, row, reported - started, len(losses)) + "\n")
            out_of_time = max_minutes is not None and time.monotonic() - started > 60 * float(max_minutes)
            if trainer.step % int(tr["val_every"]) == 0 or trainer.step == last or out_of_time:
                metrics = _validate_and_save(trainer, loss_log, val_log)
            if out_of_time:
                log.info("stopping after %.1f minutes at step %d", float(max_minutes), trainer.step)
                break
    return losses, metrics


def train(recipe, out_dir, device="auto", max_steps=None, max_minutes=None, resume=False):
    """Train the network a recipe describes and write checkpoints and curves to ``out_dir``.

    Parameters
    ----------
    recipe : dict
        A recipe (``qsmprep.deep.recipes.load_recipe``); validated here.
    out_dir : str or Path
        Output folder (created).
    device : "auto", "cpu" or "cuda", default "auto"
        "auto" uses CUDA when available.  AMP (recipe ``amp``) and the
        channels-last memory format are used on CUDA only.
    max_steps : int, optional
        Stop at this step even if the recipe asks for more; the recipe's ``train.steps`` still ends the run
        (a larger value is logged as a warning).
    max_minutes : float, optional
        Stop (after saving) once this much wall time has passed.
    resume : bool, default False
        Continue from ``out_dir``'s last checkpoint and optimiser state.

    Returns
    -------
    dict with ``step``, ``validation`` (last NRMSE/HFEN), ``losses`` (the
    per-step training losses of this call), ``checkpoint`` (path) and
    ``model`` (the trained network, in eval mode).  Without ``resume``, an ``out_dir`` holding any file a run
    writes is refused (UsageError); a run stopped before its first checkpoint (an exception, KeyboardInterrupt
    included) removes the files it wrote, and ``out_dir`` if it made it and it is left empty.  A resume whose
    recipe differs from the checkpoint's (``qsmprep.deep.recipes.recipe_changes``) is warned of and recorded in the
    checkpoint's ``recipe_changes``.
    """
    recipe = validate_recipe(recipe)
    out = Path(out_dir)
    device = resolve_device(device)
    if not resume:
        check_new_run_folder(out)
    trainer = Trainer(recipe, out, device)
    if resume:
        trainer.restore()
        log.info("resuming at step %d from %s", trainer.step, out)
    trainer.start_data()
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # only once every check has passed: a refused run leaves no folder
    last = _last_step(recipe["train"], max_steps)
    if trainer.step >= last:
        log.info("%s is already at step %d, not under %d: nothing to train (its last validation is reported)",
                 out, trainer.step, last)
    try:
        losses, metrics = _train_steps(trainer, last, max_minutes, resume)
    except BaseException:  # a diverged loss, Ctrl-C, SIGTERM
        if not (out / "checkpoint.safetensors").exists():
            _remove_unsaved_run(out, made)
        raise
    return {
        "step": trainer.step, "validation": metrics, "losses": losses,
        "checkpoint": out / "checkpoint.safetensors", "model": trainer.model.eval(),
    }
