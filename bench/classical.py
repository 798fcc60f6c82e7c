"""Classical dipole inversions on the 2016 QSM challenge data: NRMSE, HFEN and time.

    python bench/classical.py [--data DIR]

Prints one row per method (NRMSE and HFEN in %, vs COSMOS, both demeaned in
the mask; wall time in s), then iLSQR timed on the same data zero-padded to a
256x256x160 grid. Writes nothing. DIR defaults to ../shared/data/qsm2016 next
to the repository. Reproduces docs/benchmarks.md.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np

from qsmprep.inversion import cfl2, ilsqr, tkd
from qsmprep.io import load_nifti
from qsmprep.metrics import hfen, nrmse
from qsmprep.physics import voxel_size_from_affine

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qsm2016"
B0_DIR = (0.0, 0.0, 1.0)  # the third array axis, as the challenge states


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"qsm2016 folder (default {DEFAULT_DATA})")
    data = parser.parse_args().data
    field, affine, _ = load_nifti(data / "phs_tissue.nii.gz", "local field")
    mask = load_nifti(data / "msk.nii.gz", "mask")[0] > 0
    magnitude = load_nifti(data / "magn.nii.gz", "magnitude")[0]
    cosmos = load_nifti(data / "chi_cosmos.nii.gz", "COSMOS map")[0]
    voxel_size = voxel_size_from_affine(affine)
    print(f"qsm2016: {field.shape} at {np.round(voxel_size, 4)} mm; {os.cpu_count()} CPUs visible")
    runs = [
        ("TKD, threshold 0.19", lambda: tkd(field, mask, voxel_size, B0_DIR, threshold=0.19)),
        ("TKD, threshold 0.1", lambda: tkd(field, mask, voxel_size, B0_DIR, threshold=0.1)),
        ("CFL2, lambda 0.05", lambda: cfl2(field, mask, voxel_size, B0_DIR, lam=0.05)),
        ("CFL2, lambda 0.1 (default)", lambda: cfl2(field, mask, voxel_size, B0_DIR, lam=0.1)),
        ("CFL2, lambda 0.2", lambda: cfl2(field, mask, voxel_size, B0_DIR, lam=0.2)),
        ("iLSQR (tol 0.01, 50 iterations)", lambda: ilsqr(field, mask, voxel_size, B0_DIR)),
        ("iLSQR with magnitude weighting", lambda: ilsqr(field, mask, voxel_size, B0_DIR, magnitude=magnitude)),
    ]
    print(f"{'method':34s} {'NRMSE %':>8s} {'HFEN %':>8s} {'time s':>8s}")
    for name, run in runs:
        start = time.perf_counter()
        chi = run()
        seconds = time.perf_counter() - start
        print(f"{name:34s} {nrmse(chi, cosmos, mask):8.2f} {hfen(chi, cosmos, mask):8.2f} {seconds:8.1f}", flush=True)
    # the same brain in a 256x256x160 matrix: iLSQR time grows with the grid
    big = (256, 256, 160)
    pad = [(0, n - s) for n, s in zip(big, field.shape)]
    start = time.perf_counter()
    chi = ilsqr(np.pad(field, pad), np.pad(mask, pad), voxel_size, B0_DIR)[: field.shape[0], : field.shape[1]]
    seconds = time.perf_counter() - start
    name = "iLSQR on a 256x256x160 grid"
    print(f"{name:34s} {nrmse(chi, cosmos, mask):8.2f} {hfen(chi, cosmos, mask):8.2f} {seconds:8.1f}")


if __name__ == "__main__":
    main()
