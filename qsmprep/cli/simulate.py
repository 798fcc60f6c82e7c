"""qsmprep-simulate: write a simulated multi-echo GRE BIDS dataset with its ground truth.

    qsmprep-simulate OUT_DIR [--subjects N] [--sessions LABEL ...] [--echoes 4]
        [--te-first 0.004] [--te-spacing 0.004] [--b0-tesla 3] [--voxel-size X Y Z]
        [--oblique DEG] [--fine-voxel-size MM] [--snr 100] [--phase-units arbitrary|rad]
        [--no-phase-offset] [--matrix X Y Z | --fov-mm X Y Z] [--seed 0] [-v]

Each subject's head is drawn from (seed, subject index); sessions of a
subject share the head and differ in noise and receive phase. Axial
isotropic data are simulated directly on the output grid; oblique or
anisotropic data on a finer isotropic grid resampled onto the slab
(``qsmprep.sim.gre.acquire``). See docs/simulator.md.
"""

import logging
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import CantCreateError, UsageError
from ..sim.bids_writer import (
    PHASE_UNITS,
    acquisition_bytes,
    check_dataset_files,
    made_by_simulator,
    write_bids_dataset,
)
from ..phase.combine import MAX_PLAUSIBLE_TE_S
from ..physics.forward import padded_shape
from ..resources import available_memory_bytes
from ..sim.gre import acquire, simulate_gre, slab_affine
from ..sim.phantom import head_phantom
from .common import (
    ArgumentParser,
    Stopped,
    check_b0_tesla_option,
    check_writable_folder,
    finite_float,
    run_cli,
    stopped_by_signals,
)

log = logging.getLogger("qsmprep.simulate")

DEFAULT_VOXEL_SIZE_MM = (1.5, 1.5, 1.5)
DEFAULT_FOV_MM = (168.0, 204.0, 168.0)
"""Whole-head field of view of the default dataset (112 x 136 x 112 at 1.5 mm)."""
MIN_MATRIX = 8
"""Fewest voxels per axis of the output grid."""
MAX_MATRIX = 32767
"""Most output voxels along an axis: NIfTI-1 stores the dimensions as int16 (a 40000 x 8 x 8 matrix ended, once
simulated, in nibabel's HeaderDataError)."""
MAX_VOXEL_MM = 20.0
"""Largest output voxel size (mm): the phantom's brain (about 120 x 156 x 112 mm) is then at least 5 voxels
across. Beyond about 70 mm no voxel centre need fall in it, and an empty brain mask gave NaN images."""
MAX_OBLIQUE_DEG = 90.0
"""Largest slab tilt (degrees, either way): 90 is a coronal slab; a larger tilt is a smaller one upside down."""
def build_parser():
    p = ArgumentParser(
        prog="qsmprep-simulate",
        description="Simulate a multi-echo GRE BIDS dataset (magnitude + phase) from a numerical head phantom, "
        "with the ground truth (chi, fields, mask, labels) under OUT_DIR/derivatives/groundtruth.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset root to write (empty, new, or an existing BIDS dataset)")
    p.add_argument("--subjects", type=int, default=1, help="number of subjects, labelled 01, 02, ... (default 1)")
    p.add_argument("--sessions", nargs="+", action="extend", default=None, metavar="LABEL", help="session labels (default: no sessions)")
    p.add_argument("--echoes", type=int, default=4, help="number of echoes (default 4)")
    p.add_argument("--te-first", type=finite_float, default=0.004, help="first echo time in s (default 0.004)")
    p.add_argument("--te-spacing", type=finite_float, default=0.004, help="echo spacing in s (default 0.004)")
    p.add_argument("--b0-tesla", "--b0", type=finite_float, default=3.0, metavar="T",
                   help="field strength in tesla (default 3)")  # fmt: skip
    p.add_argument("--voxel-size", type=finite_float, nargs=3, default=DEFAULT_VOXEL_SIZE_MM, metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default 1.5 1.5 1.5)")  # fmt: skip
    p.add_argument("--oblique", type=finite_float, default=0.0, metavar="DEG", help="slab tilt about the L-R axis in degrees (default 0)")
    p.add_argument("--snr", type=finite_float, default=100.0, help="first-echo brain SNR; 0 for noiseless data (default 100)")
    p.add_argument("--phase-units", choices=PHASE_UNITS, default="arbitrary",
                   help="phase storage: vendor-style int16 -4096..4095 ('arbitrary', default) or float radians ('rad')")  # fmt: skip
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--matrix", type=int, nargs=3, metavar=("X", "Y", "Z"), help="matrix size (default: FOV / voxel size)")
    grid.add_argument("--fov-mm", type=finite_float, nargs=3, metavar=("X", "Y", "Z"),
                      help=f"field of view in mm (default {' '.join(f'{v:g}' for v in DEFAULT_FOV_MM)})")  # fmt: skip
    p.add_argument("--fine-voxel-size", type=finite_float, default=None, metavar="MM",
                   help="isotropic voxel size (mm) of the grid oblique/anisotropic data are simulated on "
                   "(default: the smallest output voxel size, at most 1 mm)")  # fmt: skip
    p.add_argument("--no-phase-offset", action="store_true", help="no receive-phase offset (phase is the field alone)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="debugging detail on standard error (progress is logged without it)")  # fmt: skip
    return p


def _check_out_dir(out_dir, subjects):
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file: give a directory for the dataset.")
    check_writable_folder("OUT_DIR", out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "dataset_description.json").is_file():
        raise UsageError(
            f"{out_dir} is not empty and is not a BIDS dataset (no dataset_description.json): "
            "give a new or empty directory."
        )
    check_dataset_files(out_dir)
    clash = [f"sub-{s}" for s in subjects if (out_dir / f"sub-{s}").exists()]
    if clash and not made_by_simulator(out_dir):  # a simulated dataset may be simulated again; real data never
        raise UsageError(
            f"{out_dir} is a BIDS dataset that qsmprep-simulate did not make, and it already has {', '.join(clash)}: "
            "simulating would overwrite them. Give a new directory."
        )


def _check_free_space(out_dir, needed):
    """Raise CantCreateError when the file system of ``out_dir`` has less than ``needed`` bytes free."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # out_dir itself may not exist yet
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise CantCreateError(f"the dataset needs up to {needed / 1e6:,.1f} MB and {existing} has {free / 1e6:,.1f} MB "
                              "free: simulate fewer --subjects, --sessions or --echoes, a smaller grid, or free space.")


def _mm(values):
    """Numbers as a command line gives them, e.g. "1.5 1.5 2" (mm)."""
    return " ".join(f"{v:g}" for v in values)


def _check_args(args):
    if args.subjects < 1 or args.echoes < 1:
        raise UsageError("--subjects and --echoes must be at least 1.")
    if args.te_first <= 0 or args.te_spacing <= 0:
        raise UsageError("--te-first and --te-spacing are in seconds and must be positive (e.g. 0.004).")
    last_te = args.te_first + (args.echoes - 1) * args.te_spacing
    if last_te > MAX_PLAUSIBLE_TE_S:
        raise UsageError(f"the last echo time, --te-first + (--echoes - 1) x --te-spacing, would be {last_te:g} s, over "
                         f"{MAX_PLAUSIBLE_TE_S:g} s: --te-first and --te-spacing are in seconds, not milliseconds (e.g. 0.004).")
    check_b0_tesla_option(args.b0_tesla)
    if not (min(args.voxel_size) > 0 and max(args.voxel_size) <= MAX_VOXEL_MM):
        raise UsageError(f"--voxel-size {_mm(args.voxel_size)}: give sizes in mm, each positive and at most "
                         f"{MAX_VOXEL_MM:g} (coarser voxels can miss the phantom's brain).")
    if args.snr < 0:
        raise UsageError(f"--snr must be 0 (noiseless) or positive, got {args.snr:g}.")
    if abs(args.oblique) > MAX_OBLIQUE_DEG:
        raise UsageError(f"--oblique is the slab tilt in degrees, from -{MAX_OBLIQUE_DEG:g} to {MAX_OBLIQUE_DEG:g} "
                         f"(e.g. 15), got {args.oblique:g}.")
    if args.matrix is not None and not MIN_MATRIX <= min(args.matrix) <= max(args.matrix) <= MAX_MATRIX:
        raise UsageError(f"--matrix must be at least {MIN_MATRIX} and at most {MAX_MATRIX} voxels per axis (NIfTI-1 "
                         "holds no more).")
    if args.fov_mm is not None and min(args.fov_mm) <= 0:
        raise UsageError(f"--fov-mm {_mm(args.fov_mm)}: give the field of view in mm, each positive.")
    labels = [s.removeprefix("ses-") for s in args.sessions or []]
    bad = [s for s in labels if not re.fullmatch(r"[A-Za-z0-9]+", s)]
    if bad or len(set(labels)) != len(labels):
        raise UsageError(f"--sessions {' '.join(args.sessions)}: give distinct BIDS labels of letters and digits "
                         f"(e.g. pre post, or 1 2){f'; not {bad}' if bad else ''}.")
    if args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed}.")
    if args.fine_voxel_size is not None and not 0 < args.fine_voxel_size <= min(args.voxel_size):
        raise UsageError(f"--fine-voxel-size must be positive and at most the smallest --voxel-size "
                         f"({min(args.voxel_size):g} mm), got {args.fine_voxel_size:g}.")


MEMORY_BASE_BYTES = 92e6
"""Peak memory of a simulation beside its grids (bytes): the interpreter and its imports (69 MB once
qsmprep.cli.simulate is imported) and what does not grow with the grid. Measured as the intercept of the peak RSS
(``/usr/bin/time -v qsmprep-simulate OUT ...``, "Maximum resident set size"; docs/simulator.md, "Memory check")
where the echoes make the peak: 92.1 MB from the default grid with 8 and 16 echoes (467 and 686 MB) and
200 x 200 x 160 at 1 mm with 12 (1910 MB). A 16^3 grid at 8 mm peaks at 106 MB."""
FIELD_BYTES_PER_FFT_VOXEL = 17.5
"""Peak memory while the field maps are computed, per voxel of the phantom grid zero-padded for the FFT
(``padded_shape``: each axis at least doubled, up to a fast FFT length) (bytes), the spectra and the phantom.
Measured beyond ``MEMORY_BASE_BYTES`` at 1 echo, where the echoes do not make the peak: 16.0, 17.0 and 16.6 bytes
on the default grid (325 MB; 1.71 M voxels, 14.6 M padded), 200 x 200 x 160 at 1 mm (964 MB; 6.40 M, 51.2 M) and the 1 mm
168 x 204 x 168 phantom grid of ``--oblique 15`` (1020 MB; 5.76 M, 56.0 M); rounded up. Per grid voxel that is 136
to 161 bytes: the padding to fast FFT lengths differs."""
HELD_BYTES_PER_VOXEL = 56
"""Memory held while the echoes are simulated and written (the phantom, its field maps, the ground truth), per voxel
of the phantom grid plus per voxel of the output grid (bytes). Measured where the echoes make the peak, beyond
``MEMORY_BASE_BYTES`` and ``ECHO_BYTES_PER_VOXEL``: 46 bytes on the default and 200 x 200 x 160 grids (8 to 16
echoes), 52 on the 1.5 mm phantom grid of ``--oblique 20 --fine-voxel-size 1.5`` (16 and 32 echoes), 60 with it
resampled onto a 200^3 matrix (4 echoes) and 66 onto a 3 mm 56 x 68 x 56 one (100 echoes); rounded to the middle."""
ECHO_BYTES_PER_VOXEL = 16
"""Memory per output voxel and echo (bytes): the complex64 echo and its float32 magnitude and phase. Measured as the
growth of the peak with the echoes: 16.0 bytes from 8 to 16 echoes of the default grid and from 16 to 32 of
``--oblique 20 --fine-voxel-size 1.5``, 17.3 from 1 to 4 echoes of it resampled onto a 200^3 matrix."""
MEMORY_MARGIN = 1.2
"""A simulation is refused when this times its estimated peak exceeds the available memory: ``peak_memory_bytes``
was 7 % under to 14 % over the peaks measured on phantom grids of 0.7 M voxels and more (12 % under for 16^3, where
the interpreter is all), and another numpy, scipy or allocator, or more FFT threads, can take more."""


def _fft_voxels(shape):
    """Voxels of the grid ``forward_field_ppm`` zero-pads ``shape`` to (``padded_shape``), a float: inf for a grid
    beyond any FFT length (2^62 along an axis), which no memory holds."""
    try:
        return np.prod(padded_shape(shape), dtype=float)
    except (OverflowError, ValueError):
        return np.inf


def peak_memory_bytes(grid, matrix, echoes):
    """Estimated peak memory of ``qsmprep-simulate`` (bytes, a float), from the measured ``MEMORY_BASE_BYTES``,
    ``FIELD_BYTES_PER_FFT_VOXEL``, ``HELD_BYTES_PER_VOXEL`` and ``ECHO_BYTES_PER_VOXEL``.

    The larger of two phases: the field maps, computed by FFT on the zero-padded phantom grid, and the echoes, made
    and written beside the phantom and the ground truth. Subjects and sessions are simulated one at a time, each
    freed once written, so their number does not change the peak.

    Parameters
    ----------
    grid : tuple of 3 numbers
        Phantom grid: the fine grid of an oblique or anisotropic simulation, else ``matrix``; floats are accepted
        (inf for a grid no integer holds).
    matrix : tuple of 3 int
        Output grid.
    echoes : int
        Echoes per acquisition.
    """
    grid_voxels, voxels = np.prod(grid, dtype=float), np.prod(matrix, dtype=float)
    fields = FIELD_BYTES_PER_FFT_VOXEL * _fft_voxels(grid)
    echo_images = HELD_BYTES_PER_VOXEL * (grid_voxels + voxels) + ECHO_BYTES_PER_VOXEL * voxels * echoes
    return MEMORY_BASE_BYTES + max(fields, echo_images)


def _grid_text(shape):
    """A grid as a message gives it, e.g. "112 x 136 x 112" (floats too: "inf x 8 x 8")."""
    return " x ".join(f"{n:.0f}" for n in shape)


def _check_memory(grid, matrix, echoes, fine_voxel_mm=None):
    """Raise UsageError when ``MEMORY_MARGIN`` times the estimated peak (``peak_memory_bytes``, same parameters)
    exceeds the memory this process may use (``available_memory_bytes``); where that cannot be read, warn.
    ``fine_voxel_mm``: the fine grid's voxel size, or None when ``grid`` is the matrix."""
    need = peak_memory_bytes(grid, matrix, echoes)
    available = available_memory_bytes()
    if available is None:
        log.warning("the free memory cannot be read here: the simulation's peak of about %.1f GB is not checked",
                    need / 1e9)
        return
    log.debug("the simulation needs about %.1f GB of memory at its peak; %.1f GB is available", need / 1e9,
              available / 1e9)
    if MEMORY_MARGIN * need > available:
        what = f"{echoes} echo{'es' if echoes > 1 else ''} on a {_grid_text(matrix)} matrix"
        larger = "--voxel-size"
        if fine_voxel_mm is not None:
            what += f" from a {_grid_text(grid)} grid of {fine_voxel_mm:g} mm"
            larger += " or --fine-voxel-size"
        fix = f"a smaller --fov-mm or --matrix, a larger {larger}, or fewer --echoes"
        raise UsageError(f"simulating {what} needs about {need / 1e9:,.1f} GB of memory at its peak "
                         f"({MEMORY_MARGIN * need / 1e9:,.1f} GB with a {(MEMORY_MARGIN - 1) * 100:.0f} % margin), and "
                         f"{available / 1e9:,.1f} GB is available: give {fix}.")


def _output_matrix(args):
    """The output matrix: ``--matrix``, or ``--fov-mm`` (default ``DEFAULT_FOV_MM``) over ``--voxel-size``,
    rounded, refused beyond ``MIN_MATRIX`` to ``MAX_MATRIX`` voxels per axis."""
    if args.matrix is not None:
        return tuple(args.matrix)
    voxel = tuple(args.voxel_size)
    fov = args.fov_mm if args.fov_mm is not None else DEFAULT_FOV_MM  # the default gives >= 8 up to 20 mm voxels
    across = [f / v for f, v in zip(fov, voxel)]  # a float: inf where the ratio overflows
    if max(across) >= MAX_MATRIX + 0.5:
        raise UsageError(f"--fov-mm {_mm(fov)} at --voxel-size {_mm(voxel)} gives more than {MAX_MATRIX} voxels "
                         "along an axis, more than a NIfTI-1 file holds: give a smaller --fov-mm or a larger "
                         "--voxel-size.")
    matrix = tuple(int(round(a)) for a in across)
    if min(matrix) < MIN_MATRIX:
        raise UsageError(f"--fov-mm {_mm(fov)} at --voxel-size {_mm(voxel)} gives a {_grid_text(matrix)} "
                         f"matrix, and the simulator needs at least {MIN_MATRIX} voxels per axis: give --fov-mm "
                         f"{_mm(MIN_MATRIX * v for v in voxel)} or more, or a smaller --voxel-size.")
    return matrix


def _grids(args):
    """Output matrix, and the fine phantom grid (shape, voxel) or None for direct simulation; refuses, before any
    work, a simulation that would not fit in memory (``_check_memory``)."""
    voxel = tuple(args.voxel_size)
    matrix = _output_matrix(args)
    if args.oblique == 0 and len(set(voxel)) == 1 and args.fine_voxel_size is None:
        _check_memory(matrix, matrix, args.echoes)
        return matrix, None
    fine = args.fine_voxel_size if args.fine_voxel_size is not None else min(1.0, min(voxel))
    # The fine grid covers the bounding box of the tilted slab, within the whole-head field of view
    # (the head fits in it: beyond it a slab would only see air and neck).
    extent = np.abs(slab_affine(matrix, voxel, args.oblique)[:3, :3]) @ np.asarray(matrix, dtype=float)
    extent = np.minimum(extent, DEFAULT_FOV_MM)
    with np.errstate(over="ignore"):  # a fine voxel of 1e-320 mm: an infinite grid, which the check refuses
        shape = np.ceil(extent / fine)
    _check_memory(tuple(shape), matrix, args.echoes, fine)
    return matrix, (tuple(int(n) for n in shape), (fine,) * 3)


def _seed(*parts):
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def simulate_dataset(args):
    """Simulate and write every subject and session described by parsed ``args``."""
    out_dir = args.out_dir
    _check_args(args)
    matrix, fine = _grids(args)
    subjects = [f"{i + 1:02d}" for i in range(args.subjects)]
    sessions = [s.removeprefix("ses-") for s in args.sessions] if args.sessions else [None]
    _check_out_dir(out_dir, subjects)
    _check_free_space(out_dir, len(subjects) * len(sessions) * acquisition_bytes(matrix, args.echoes, args.phase_units))
    te_s = tuple(round(args.te_first + n * args.te_spacing, 9) for n in range(args.echoes))
    snr = args.snr if args.snr > 0 else None
    log.info(
        "Simulating %d subject(s) x %d session(s): matrix %s, voxel %s mm, oblique %g deg, TE %s s, B0 %g T, SNR %s",
        len(subjects), len(sessions), matrix, tuple(args.voxel_size), args.oblique,
        ", ".join(f"{t:.4g}" for t in te_s), args.b0_tesla, snr or "inf",
    )  # fmt: skip
    def acquisitions():  # one at a time, each logged once written
        for i, subject in enumerate(subjects):
            start = time.perf_counter()
            shape, voxel = fine if fine else (matrix, tuple(args.voxel_size))
            phantom = head_phantom(shape, voxel, seed=_seed(args.seed, i))
            for j, session in enumerate(sessions):
                common = dict(te_s=te_s, b0_tesla=args.b0_tesla, snr=snr, phase_offset=not args.no_phase_offset,
                              seed=_seed(args.seed, i, j))  # fmt: skip
                if fine:
                    yield subject, session, acquire(phantom, tuple(args.voxel_size), args.oblique, shape=matrix, **common)
                else:
                    yield subject, session, simulate_gre(phantom, **common)
                log.info("sub-%s%s simulated (%.1f s)", subject, f" ses-{session}" if session else "",
                         time.perf_counter() - start)
            del phantom  # free it before the next subject's is built, not after

    try:
        with stopped_by_signals():
            write_bids_dataset(out_dir, acquisitions(), args.phase_units, replace_earlier=True)
    except Stopped as exc:
        sys.stderr.write(f"qsmprep-simulate: stopped by {exc}: nothing of this run was kept, {out_dir} is as it was; "
                         "run the same command again to simulate.\n")
        return 128 + exc.signum
    log.info("Dataset written to %s (ground truth in %s)", out_dir, out_dir / "derivatives" / "groundtruth")


def main(argv=None):
    """Entry point; returns the exit code (0, or a BIDS execution-spec code on error). Progress is logged
    without -v (a default dataset takes tens of seconds); -v adds debugging detail."""
    return run_cli(build_parser(), simulate_dataset, argv, verbosity=1)


if __name__ == "__main__":
    sys.exit(main())
