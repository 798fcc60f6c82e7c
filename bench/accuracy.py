"""Accuracy of every dipole inversion: 2016 challenge data, simulated subjects, pipeline-made fields, scale invariance.

    python bench/accuracy.py [--part qsm2016 variants sim pipeline storage tiles wisnieff]
                             [--methods tkd cfl2 ilsqr tv deep]
                             [--model NAME_OR_PATH ...] [--refine N ...] [--refine-lambda L ...]
                             [--refine-radius MM ...] [--refine-tv A ...] [--resolution-tolerance T ...]
                             [--data DIR] [--json OUT] [--figure PNG] [--scale-figure PNG] [--tiles-figure PNG]
                             [--phantom-resampling {antialiased,plain}]

Parts (default: qsm2016 sim pipeline wisnieff):

qsm2016   The 2016 QSM challenge data (DIR/qsm2016): local field ``phs_tissue``
          (ppm) and ``msk`` in, NRMSE, HFEN and XSIM against ``chi_cosmos`` and
          ``chi_33`` (qsmprep.metrics; both maps demeaned in ``msk``), mean chi
          per deep grey matter label (1-6 of ``evaluation_mask``) and wall time;
          ``--figure PNG`` saves COSMOS and every method's map in three
          orientations (``qsmprep.reports.mosaic.comparison_png``).
          B0 along the third axis, voxel size from the affine.
variants  Parameter variants of the classical methods on the same data (TKD and
          CFL2 regularisation, iLSQR with magnitude weighting, iLSQR on the
          brain zero-padded into a 256x256x160 grid): NRMSE, HFEN vs COSMOS, time.
sim       Simulated subjects (qsmprep.sim, seed 0) with the phantom's 2.5 mm
          calcification: axial 1 mm (160x192x144), oblique 25 deg 1 mm
          (160x192x144 slab tilted about L-R, from a 1 mm phantom) and
          anisotropic 0.75x0.75x2 mm (213x256x72, from a 0.75 mm phantom).
          The simulator's noiseless ground-truth local field (ppm) and brain
          mask are inverted directly (no background removal); B0 direction and
          voxel size come from the affine. NRMSE, HFEN, XSIM vs the true chi
          and the calcification moment error (label ``calcification``).
pipeline  What the inversions make of the pipeline's own local fields: the
          end-to-end test's axial 3 mm subject and oblique (15 deg, 3x3x4 mm)
          subject and the Quick start's dataset (``qsmprep-simulate``), each run
          through ``qsmprep`` (default front end: quality mask, Laplacian
          unwrapping, V-SHARP), then every method inverts the output local field
          in the output mask. NRMSE and HFEN vs the simulator's true chi.
storage   The pipeline's oblique subject (float radians phase) stored RAS, LPS
          (flips, as a DICOM converter writes) and PSL (axes permuted too), and
          its axial 3 mm subject stored RAS and ASR (isotropic, sagittal), each
          run through ``qsmprep --inversion METHODS``: the brain mask's voxels
          that differ from the RAS run's, each Chimap's and the local field's
          difference from it (relative norm, maps compared in RAS order) and
          NRMSE vs the true chi (each in its own mask). Not in the default parts.
tiles     Tiled against whole-volume deep inference (``deep_invert``'s
          ``tile_shape`` and ``overlap``): the head phantom (seed 0) on a
          96x112x96 grid of 1 mm voxels, its noiseless local field
          (``forward_field_ppm`` of chi demeaned in the brain mask), every deep
          row inverted in one pass and in 64^3 tiles overlapping by 32 and 48
          voxels and 80^3 tiles overlapping by 32 (tiled along all three axes).
          NRMSE of the tiled map against the one-pass map and against the true
          chi, and the seam score: along each axis, the mean |step| between
          neighbouring planes of the difference map (tiled - one pass) in the
          mask, its largest plane over its median plane (1: no plane stands
          out; a step where tiles meet stands out), the worst of the three
          axes. ``--tiles-figure PNG`` saves, for the first deep row, the one-
          pass map, the 64^3-tiled map and their difference x 10.
          Not in the default parts.
wisnieff  Scale invariance (SI-QSM protocol) on DIR/phantom_wisnieff: the phantom
          (256x256x98 at 0.9375x0.9375x1.5 mm) is resampled (trilinear,
          anti-aliased, ``qsmprep.physics.resample_to_grid``) onto N^3 grids of
          isotropic voxels 240/N mm covering the same 240 mm cube (the 147 mm
          slab centred in it, zero beyond), N = 64, 96, 128, 256; mask = resampled
          mask > 0.5, chi set to 0 outside it. The local field is
          ``forward_field_ppm`` of that chi (B0 along the third axis, grid padded
          2x) in the mask, plus Gaussian noise of SD = RMS(field in mask) / 100
          (SNR 100, seed 0). Score: RMSE in ppm in the mask of the demeaned maps,
          per scale, and the ratio worst / best scale per method; also the RMS
          of the demeaned true chi per scale (the coarser grids average the
          phantom's small structures away, so their truth has less contrast)
          and each method's NRMSE per scale (RMSE / that RMS) with its ratio.
          The finest scale's error is also split at the coarsest grid's
          Nyquist frequency (1 / 7.5 mm): the part below it is what the
          coarse grids can hold, the rest what only the fine grid can show.
          Of that fine detail, "detail kept" is the map's projection on the
          truth (1: all of it, 0: none), inside the band where |D| < 0.19
          (the field barely determines it) and elsewhere.
          ``--phantom-resampling plain`` resamples without the pre-filter, so
          the coarse truths keep the phantom's full contrast (sampled, not
          averaged), as the SI-QSM thesis's RMSEs, flat or falling with scale,
          suggest its down-sampling did (it names no filter).
          ``--scale-figure PNG`` saves the true chi and every method's map at
          the coarsest and the finest scale (64^3 enlarged to 256^3 by
          repeating voxels), to see what each method does with the edges.

Deep rows use ``qsmprep.inversion.deep.deep_invert`` with each ``--model`` (default
the shipped default model), each ``--refine`` iteration count (default 0) and,
for refined rows, each ``--refine-lambda`` prior weight, each ``--refine-radius``
high-pass radius in mm (0: none) and each ``--refine-tv`` total-variation weight
in ppm mm (0: none; default for all three: deep_invert's), and for
every deep row each ``--resolution-tolerance`` (``inf``: the network runs on
the input grid instead of being resampled to its training voxel size);
a model that cannot be found is skipped with a note. Tables are printed as Markdown;
``--json OUT`` also saves every number. Reproduces docs/benchmarks.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from itertools import product
from pathlib import Path

import numpy as np
from scipy import fft

from qsmprep.config import INVERSION_METHODS, library_function
from qsmprep.errors import NoInputError
from qsmprep.inversion import cfl2, ilsqr, tkd
from qsmprep.inversion.deep import DEFAULT_MODEL
from qsmprep.io import load_nifti
from qsmprep.metrics import calcification_moment_error, hfen, label_means, nrmse, xsim
from qsmprep.physics import (b0_dir_from_affine, dipole_kernel, forward_field_ppm, resample_to_grid,
                              voxel_size_from_affine)
from qsmprep.reports.mosaic import comparison_png
from qsmprep.resources import available_cores
from qsmprep.sim import LABELS, acquire, head_phantom, simulate_gre

# the tests read the same folder (tests/conftest.py SHARED_DATA)
DEFAULT_DATA = Path(os.environ.get("QSMPREP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CHALLENGE_B0_DIR = (0.0, 0.0, 1.0)  # the third array axis, as the 2016 challenge states
DEEP_GM_LABELS = (1, 2, 3, 4, 5, 6)
SCALES = (64, 96, 128, 256)
SNR = 100.0
SIM_FOV_MM = (160, 192, 144)  # the brain (132x168x122 mm) with a margin
PARTS = ("qsm2016", "variants", "sim", "pipeline", "storage", "tiles", "wisnieff")
TILINGS = ((64, 32), (64, 48), (80, 32))  # (tile edge, overlap) in voxels
PIPELINE_DATASETS = {  # qsmprep-simulate arguments: the end-to-end test's two subjects and the Quick start's
    "axial 3 mm": ["--matrix", "64", "64", "64", "--voxel-size", "3", "3", "3", "--echoes", "3", "--te-first", "0.004",
                   "--te-spacing", "0.004"],
    "oblique 15 deg, 3x3x4 mm": ["--seed", "7", "--matrix", "64", "64", "48", "--voxel-size", "3", "3", "4",
                                 "--oblique", "15", "--fine-voxel-size", "2", "--echoes", "3", "--te-first", "0.004",
                                 "--te-spacing", "0.004"],
    "Quick start, 1.5 mm": [],
}


def inversions(method_names, models, refine_iters, refine_lambdas=None, refine_radii=None, refine_tvs=None,
               tolerances=None):
    """[(row label, f(field, mask, voxel_size, b0_dir) -> chi)] for the requested methods.

    Deep rows are added per model, refinement count, (for refined rows) each
    prior weight in ``refine_lambdas``, high-pass radius in ``refine_radii`` and
    total-variation weight in ``refine_tvs``,
    and each resolution tolerance in ``tolerances`` (None: deep_invert's
    default, unlabelled); a model that ``load_model`` cannot find is skipped
    with a printed note.
    """
    runs = []
    for name in method_names:
        if name != "deep":
            runs.append((name, library_function("inversion", name)))
            continue
        from qsmprep.deep.registry import load_model

        for model in models:
            try:
                load_model(model)
            except NoInputError as err:
                print(f"note: deep model {model!r} skipped: {err}")
                continue
            for n in refine_iters:
                refinements = (product(refine_lambdas or [None], refine_radii or [None], refine_tvs or [None]) if n
                               else [(None, None, None)])
                for (lam, radius, tv), tolerance in product(refinements, tolerances or [None]):
                    label = f"deep {Path(str(model)).stem}" + (f" + refine {n}" if n else "")
                    options = {"model": model, "refine_iters": n}
                    if tolerance is not None:
                        label += f" resolution tolerance {tolerance:g}"
                        options["resolution_tolerance"] = tolerance
                    if lam is not None:
                        label += f" lambda {lam:g}"
                        options["refine_lambda"] = lam
                    if radius is not None:
                        label += f" radius {radius:g}"
                        options["refine_radius_mm"] = radius
                    if tv is not None:
                        label += f" TV {tv:g}"
                        options["refine_tv_weight"] = tv
                    runs.append((label, partial(library_function("inversion", "deep"), **options)))
    return runs


def timed(run, *args, **kwargs):
    start = time.perf_counter()
    result = run(*args, **kwargs)
    return result, time.perf_counter() - start


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else f"{c:.2f}" for c in row) + " |")
    print("\n".join(lines), flush=True)


def part_qsm2016(data, runs, figure=None):
    folder = data / "qsm2016"
    field, affine, _ = load_nifti(folder / "phs_tissue.nii.gz", "local field")
    mask = load_nifti(folder / "msk.nii.gz", "mask")[0] > 0
    cosmos = load_nifti(folder / "chi_cosmos.nii.gz", "COSMOS map")[0]
    chi33 = load_nifti(folder / "chi_33.nii.gz", "STI chi33 map")[0]
    labels = load_nifti(folder / "evaluation_mask.nii.gz", "evaluation labels")[0].round().astype(int)
    voxel_size = voxel_size_from_affine(affine)
    print(f"\n## qsm2016: {field.shape} at {np.round(voxel_size, 4)} mm, B0 along the third axis\n")
    results, maps = [], {"COSMOS (reference)": cosmos}
    for name, run in runs:
        chi, seconds = timed(run, field, mask, voxel_size, CHALLENGE_B0_DIR)
        row = {"method": name, "time_s": seconds}
        for ref_name, ref in (("cosmos", cosmos), ("chi33", chi33)):
            row[ref_name] = {"nrmse": nrmse(chi, ref, mask), "hfen": hfen(chi, ref, mask), "xsim": xsim(chi, ref, mask)}
        # deep grey matter means of the map demeaned in the mask, as the scores compare demeaned maps
        row["dgm_means_ppm"] = label_means(chi - chi[mask].mean(), labels, DEEP_GM_LABELS)
        results.append(row)
        maps[f"{name}: NRMSE {row['cosmos']['nrmse']:.1f} %, HFEN {row['cosmos']['hfen']:.1f} %"] = chi
        print(f"{name}: {seconds:.1f} s", flush=True)
    if figure:
        figure.write_bytes(comparison_png(maps, mask, title="2016 challenge: chi (ppm), demeaned in msk"))
        print(f"saved {figure}")
    header = ["method", "NRMSE % COSMOS", "HFEN % COSMOS", "XSIM COSMOS", "NRMSE % chi33", "HFEN % chi33",
              "XSIM chi33", "time s"]
    markdown(header, [[r["method"], r["cosmos"]["nrmse"], r["cosmos"]["hfen"], r["cosmos"]["xsim"], r["chi33"]["nrmse"],
                       r["chi33"]["hfen"], r["chi33"]["xsim"], r["time_s"]] for r in results])
    print()
    references = [("COSMOS (reference)", cosmos), ("chi33 (reference)", chi33)]
    ref_rows = [[n, *(1000 * v for v in label_means(c - c[mask].mean(), labels, DEEP_GM_LABELS).values())]
                for n, c in references]
    markdown(["map"] + [f"label {i} ppb" for i in DEEP_GM_LABELS],
             ref_rows + [[r["method"], *(1000 * v for v in r["dgm_means_ppm"].values())] for r in results])
    return results


def part_variants(data):
    folder = data / "qsm2016"
    field, affine, _ = load_nifti(folder / "phs_tissue.nii.gz", "local field")
    mask = load_nifti(folder / "msk.nii.gz", "mask")[0] > 0
    magnitude = load_nifti(folder / "magn.nii.gz", "magnitude")[0]
    cosmos = load_nifti(folder / "chi_cosmos.nii.gz", "COSMOS map")[0]
    vs, b0 = voxel_size_from_affine(affine), CHALLENGE_B0_DIR
    big = (256, 256, 160)
    pad = [(0, n - s) for n, s in zip(big, field.shape)]
    crop = tuple(slice(0, s) for s in field.shape)
    variants = [
        ("TKD, threshold 0.19 (default)", lambda: tkd(field, mask, vs, b0, threshold=0.19)),
        ("TKD, threshold 0.1", lambda: tkd(field, mask, vs, b0, threshold=0.1)),
        ("CFL2, lambda 0.05", lambda: cfl2(field, mask, vs, b0, lam=0.05)),
        ("CFL2, lambda 0.1 (default)", lambda: cfl2(field, mask, vs, b0, lam=0.1)),
        ("CFL2, lambda 0.2", lambda: cfl2(field, mask, vs, b0, lam=0.2)),
        ("iLSQR (tol 0.01, 50 iterations; default)", lambda: ilsqr(field, mask, vs, b0)),
        ("iLSQR with magnitude weighting", lambda: ilsqr(field, mask, vs, b0, magnitude=magnitude)),
        ("iLSQR, same data in a 256x256x160 grid", lambda: ilsqr(np.pad(field, pad), np.pad(mask, pad), vs, b0)[crop]),
    ]
    print("\n## variants: classical methods on qsm2016, vs COSMOS\n")
    results = []
    for name, run in variants:
        chi, seconds = timed(run)
        results.append({"method": name, "nrmse": nrmse(chi, cosmos, mask), "hfen": hfen(chi, cosmos, mask),
                        "time_s": seconds})
        print(f"{name}: {seconds:.1f} s", flush=True)
    markdown(["method", "NRMSE %", "HFEN %", "time s"], [[r["method"], r["nrmse"], r["hfen"], r["time_s"]] for r in results])
    return results


def simulated_subjects():
    """{name: SimulatedGRE} for the axial, oblique and anisotropic subjects (noiseless, one echo)."""
    quiet = dict(te_s=(0.004,), snr=None, phase_offset=False)
    shape_1mm = SIM_FOV_MM
    phantom_1mm = head_phantom(shape_1mm, (1.0, 1.0, 1.0), seed=0)
    subjects = {
        "axial 1 mm": simulate_gre(phantom_1mm, **quiet),
        "oblique 25 deg, 1 mm": acquire(phantom_1mm, voxel_size_mm=(1.0, 1.0, 1.0), oblique_deg=25.0, **quiet),
    }
    del phantom_1mm
    fine = 0.75
    phantom_fine = head_phantom(tuple(round(f / fine) for f in SIM_FOV_MM), (fine, fine, fine), seed=0)
    subjects["anisotropic 0.75x0.75x2 mm"] = acquire(phantom_fine, voxel_size_mm=(0.75, 0.75, 2.0), **quiet)
    return subjects


def part_sim(runs):
    print("\n## sim: simulated subjects, ground-truth local field and brain mask\n")
    results = []
    subjects = simulated_subjects()
    for subject, sim in subjects.items():
        vs, b0 = voxel_size_from_affine(sim.affine), b0_dir_from_affine(sim.affine)
        mask = sim.brain_mask
        calc = sim.labels == LABELS["calcification"]
        print(f"{subject}: {mask.shape} at {np.round(vs, 3)} mm, B0 {np.round(b0, 3)}, "
              f"{int(calc.sum())} calcification voxels", flush=True)
        for name, run in runs:
            chi, seconds = timed(run, sim.local_field_ppm, mask, vs, b0)
            truth = sim.chi_ppm
            results.append({"subject": subject, "shape": list(mask.shape), "method": name, "time_s": seconds,
                            "nrmse": nrmse(chi, truth, mask), "hfen": hfen(chi, truth, mask),
                            "xsim": xsim(chi, truth, mask),
                            "calc_moment_error": calcification_moment_error(chi, truth, calc)})
            print(f"  {name}: {seconds:.1f} s", flush=True)
    markdown(["subject", "method", "NRMSE %", "HFEN %", "XSIM", "calc. moment error", "time s"],
             [[r["subject"], r["method"], r["nrmse"], r["hfen"], r["xsim"], r["calc_moment_error"], r["time_s"]]
              for r in results])
    return results


def part_pipeline(runs):
    print("\n## pipeline: local fields made by qsmprep from simulated GRE data\n")
    from qsmprep.cli import simulate
    from qsmprep.cli.run import main as qsmprep_main

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, arguments in PIPELINE_DATASETS.items():
            bids, out = Path(tmp) / "bids", Path(tmp) / "out"
            shutil.rmtree(bids, ignore_errors=True)
            if simulate.main([str(bids), "--subjects", "1", *arguments]) or qsmprep_main(
                    [str(bids), str(out), "participant", "-w", str(Path(tmp) / "work"), "--inversion", "tkd"]):
                raise SystemExit(f"qsmprep-simulate or qsmprep failed on the {dataset} dataset")
            derived, truth = out / "sub-01" / "anat" / "sub-01_", bids / "derivatives" / "groundtruth" / "sub-01" / "anat" / "sub-01_"
            field, affine, _ = load_nifti(f"{derived}desc-local_fieldmap.nii.gz", "local field")
            mask = load_nifti(f"{derived}desc-brain_mask.nii.gz", "brain mask")[0] > 0
            chi_true = load_nifti(f"{truth}Chimap.nii.gz", "true chi")[0]
            vs, b0 = voxel_size_from_affine(affine), b0_dir_from_affine(affine)
            print(f"{dataset}: {mask.shape} at {np.round(vs, 3)} mm, B0 {np.round(b0, 3)}", flush=True)
            for name, run in runs:
                chi, seconds = timed(run, field * mask, mask, vs, b0)
                results.append({"dataset": dataset, "method": name, "time_s": seconds,
                                "nrmse": nrmse(chi, chi_true, mask), "hfen": hfen(chi, chi_true, mask)})
            shutil.rmtree(out)
    markdown(["dataset", "method", "NRMSE %", "HFEN %", "time s"],
             [[r["dataset"], r["method"], r["nrmse"], r["hfen"], r["time_s"]] for r in results])
    return results


STORAGE_ORDERS = {  # per pipeline dataset, the orders it is also stored in
    "oblique 15 deg, 3x3x4 mm": ("LPS", "PSL"),  # a DICOM converter's order; a permuted one, as a sagittal slab
    "axial 3 mm": ("ASR",),  # isotropic voxels stored sagittally: no voxel size tells the slice axis
}


def stored_as(bids, axcodes):
    """Rewrite every image of the BIDS dataset ``bids`` in place, flipped and permuted into ``axcodes`` order."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    for path in sorted(Path(bids).glob("sub-*/**/*.nii.gz")):
        image = nib.load(path)
        nib.save(image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(axcodes))), path)


def part_storage(methods):
    """The same acquisition stored in RAS and other orders through the whole pipeline: masks and Chimaps should not
    differ."""
    print("\n## storage: " + "; ".join(f"the {dataset} subject stored RAS, {', '.join(orders)}"
                                       for dataset, orders in STORAGE_ORDERS.items()) + "\n")
    import nibabel as nib

    from qsmprep.cli import simulate

    def in_ras(path):
        return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float64)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, orders in STORAGE_ORDERS.items():
            maps = {}
            for axcodes in ("RAS", *orders):
                bids, out, work = (Path(tmp) / f"{name}-{axcodes}" for name in ("bids", "out", "work"))
                for folder in (bids, out, work):
                    shutil.rmtree(folder, ignore_errors=True)
                if simulate.main([str(bids), "--subjects", "1", "--phase-units", "rad", *PIPELINE_DATASETS[dataset]]):
                    raise SystemExit("qsmprep-simulate failed")
                if axcodes != "RAS":
                    stored_as(bids, axcodes)
                # a process of its own: its workers fork, which hangs once this process has run torch's threads
                if subprocess.run([sys.executable, "-m", "qsmprep.cli.run", str(bids), str(out), "participant", "-w",
                                   str(work), "--inversion", *methods]).returncode:
                    raise SystemExit(f"qsmprep failed on the {dataset} dataset stored {axcodes}")
                anat = out / "sub-01" / "anat"
                maps[axcodes] = {m: in_ras(anat / f"sub-01_desc-{m}_Chimap.nii.gz") for m in methods}
                maps[axcodes]["local field"] = in_ras(anat / "sub-01_desc-local_fieldmap.nii.gz")
                maps[axcodes]["mask"] = in_ras(anat / "sub-01_desc-brain_mask.nii.gz") > 0
            chi_true = in_ras(bids / "derivatives" / "groundtruth" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz")
            for axcodes in orders:
                for name, ras_map in maps["RAS"].items():
                    other = maps[axcodes][name]
                    difference = (f"{int((other != ras_map).sum())} of {int(ras_map.sum())} voxels" if name == "mask"
                                  else f"{np.linalg.norm(other - ras_map) / np.linalg.norm(ras_map):.2e}")
                    is_chi = name in methods  # each scored in its own run's mask
                    results.append({"dataset": dataset, "stored": axcodes, "map": name, "difference": difference,
                                    "nrmse_ras": nrmse(ras_map, chi_true, maps["RAS"]["mask"]) if is_chi else None,
                                    "nrmse_stored": nrmse(other, chi_true, maps[axcodes]["mask"]) if is_chi else None})
    markdown(["dataset", "stored", "map", "difference from RAS (relative norm; mask: voxels)", "NRMSE % (RAS)",
              "NRMSE % (stored)"],
             [[r["dataset"], r["stored"], r["map"], r["difference"], r["nrmse_ras"] or "", r["nrmse_stored"] or ""]
              for r in results])
    return results


def seam_score(difference, mask):
    """Worst axis's largest per-plane mean |step| of ``difference`` in ``mask`` over its median plane (1: no seam)."""
    scores = []
    for axis in range(3):
        steps = np.abs(np.diff(difference, axis=axis))
        inside = np.delete(mask, -1, axis) & np.delete(mask, 0, axis)
        across = tuple(a for a in range(3) if a != axis)
        per_plane = (steps * inside).sum(across)[inside.any(across)] / inside.sum(across)[inside.any(across)]
        scores.append(per_plane.max() / np.median(per_plane))
    return max(scores)


def part_tiles(runs, figure=None):
    print("\n## tiles: tiled against one-pass deep inference, head phantom 96x112x96 at 1 mm\n")
    phantom = head_phantom((96, 112, 96), (1.0, 1.0, 1.0), seed=0)
    mask = phantom.brain_mask
    truth = np.where(mask, phantom.chi_ppm - phantom.chi_ppm[mask].mean(), 0).astype(np.float32)
    field = forward_field_ppm(truth) * mask
    results, maps = [], {}
    for name, run in runs:
        if not name.startswith("deep"):
            continue
        whole = run(field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))
        for tile, overlap in TILINGS:
            tiled = run(field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), tile_shape=tile, overlap=overlap)
            results.append({"method": name, "tile": tile, "overlap": overlap,
                            "nrmse_vs_whole": nrmse(tiled, whole, mask), "nrmse": nrmse(tiled, truth, mask),
                            "nrmse_whole": nrmse(whole, truth, mask), "seam_score": seam_score(tiled - whole, mask)})
            if not maps:
                maps = {f"{name}, one pass": whole, f"{tile}^3 tiles, overlap {overlap}": tiled,
                        "(tiles - one pass) x 10": 10 * (tiled - whole)}
    if figure and maps:
        figure.write_bytes(comparison_png(maps, mask, window=(-0.1, 0.1),
                                          title="Tiled and one-pass deep inference, head phantom: chi (ppm)"))
        print(f"saved {figure}")
    markdown(["method", "tile", "overlap", "NRMSE % vs one pass", "NRMSE % vs truth", "one pass: NRMSE % vs truth",
              "seam score"],
             [[r["method"], str(r["tile"]), str(r["overlap"]), r["nrmse_vs_whole"], r["nrmse"], r["nrmse_whole"],
               r["seam_score"]] for r in results])
    return results


def scaled_phantom(chi, mask, affine, n, antialias=True):
    """The phantom on an n^3 grid of isotropic voxels covering its in-plane FOV as a cube, centred on it,
    resampled trilinearly with (``antialias``, default) or without the Gaussian anti-aliasing pre-filter."""
    fov_mm = np.array(chi.shape) * voxel_size_from_affine(affine)
    side_mm = float(fov_mm.max())
    voxel = side_mm / n
    centre_world = affine[:3, :3] @ ((np.array(chi.shape) - 1) / 2) + affine[:3, 3]
    target = np.diag([voxel, voxel, voxel, 1.0])
    target[:3, 3] = centre_world - voxel * (n - 1) / 2
    chi_n = resample_to_grid(chi, affine, (n, n, n), target, antialias=antialias)
    mask_n = resample_to_grid(mask.astype(np.float32), affine, (n, n, n), target, antialias=antialias) > 0.5
    return np.where(mask_n, chi_n, 0).astype(np.float32), mask_n, (voxel, voxel, voxel)


def demeaned_spectrum(volume, mask):
    """3D Fourier transform of ``volume`` demeaned in ``mask`` and zeroed outside it."""
    x = np.zeros(mask.shape, np.float32)
    x[mask] = volume[mask] - volume[mask].mean()
    return fft.fftn(x)


def below_frequency(shape, voxel_mm, cutoff_per_mm):
    """Boolean k-space mask of the frequencies under ``cutoff_per_mm`` (cycles/mm) along every axis."""
    k = np.meshgrid(*(np.abs(fft.fftfreq(n, voxel_mm)) for n in shape), indexing="ij", sparse=True)
    return (k[0] < cutoff_per_mm) & (k[1] < cutoff_per_mm) & (k[2] < cutoff_per_mm)


def rmse_below_ppm(recon, truth, mask, voxel_mm, cutoff_per_mm):
    """RMSE (ppm, per mask voxel) of the demeaned error's part at spatial frequencies below ``cutoff_per_mm``
    (cycles/mm) along every axis: the part a grid of voxels 1 / (2 cutoff) mm could hold."""
    error = demeaned_spectrum(recon, mask) - demeaned_spectrum(truth, mask)
    power = np.abs(error[below_frequency(mask.shape, voxel_mm, cutoff_per_mm)]) ** 2
    return float(np.sqrt(power.sum() / mask.size / mask.sum()))  # Parseval


def detail_kept(recon, truth, mask, voxel_mm, cutoff_per_mm, threshold=0.19):
    """How much of the true chi's fine detail a map holds: the map's projection on the truth,
    Re<R, T> / <T, T> over the spatial frequencies above ``cutoff_per_mm`` (cycles/mm, on any axis),
    1 for the truth itself and 0 for a map without it. Two numbers: inside the band where the dipole
    kernel (B0 along the third axis) is under ``threshold`` (TKD's default, 0.19), which the field
    barely determines, and outside it."""
    r, t = demeaned_spectrum(recon, mask), demeaned_spectrum(truth, mask)
    above = ~below_frequency(mask.shape, voxel_mm, cutoff_per_mm)
    weak = np.abs(dipole_kernel(mask.shape, (voxel_mm,) * 3, (0.0, 0.0, 1.0))) < threshold
    return tuple(float(np.real(np.vdot(t[band], r[band])) / np.real(np.vdot(t[band], t[band])))
                 for band in (above & weak, above & ~weak))


def nyquist(results):
    """Nyquist frequency (cycles/mm) of the coarsest grid in the wisnieff results (its rows come first)."""
    return 1 / (2 * results[0]["voxel_mm"])


def enlarged(volume, n):
    """A cube's voxels repeated to fill an n^3 grid (n a multiple of its size), for showing scales side by side."""
    factor = n // volume.shape[0]
    assert factor * volume.shape[0] == n, "the figure's scales must divide the finest one"
    for axis in range(3):
        volume = np.repeat(volume, factor, axis=axis)
    return volume


def part_wisnieff(data, runs, figure=None, antialias=True):
    folder = data / "phantom_wisnieff"
    chi, affine, _ = load_nifti(folder / "chi.nii.gz", "phantom chi")
    mask = load_nifti(folder / "mask.nii.gz", "phantom mask")[0] > 0
    print(f"\n## wisnieff: {chi.shape} at {np.round(voxel_size_from_affine(affine), 4)} mm -> N^3 "
          f"({'anti-aliased' if antialias else 'plain'} trilinear), SNR {SNR:g}\n")
    rng = np.random.default_rng(0)
    results, truth_rms, maps = [], {}, {}
    shown = (SCALES[0], SCALES[-1])  # the figure's scales: coarsest and finest
    for n in SCALES:
        chi_n, mask_n, vs = scaled_phantom(chi, mask, affine, n, antialias)
        field = forward_field_ppm(chi_n, vs, (0.0, 0.0, 1.0)) * mask_n
        sigma = float(np.sqrt(np.mean(field[mask_n] ** 2))) / SNR
        field = np.where(mask_n, field + rng.normal(0, sigma, field.shape).astype(np.float32), 0).astype(np.float32)
        truth = chi_n[mask_n] - chi_n[mask_n].mean()
        truth_rms[n] = float(np.sqrt(np.mean(truth**2)))
        print(f"{n}^3 at {vs[0]:.4f} mm: {int(mask_n.sum())} mask voxels, noise SD {sigma * 1000:.3f} ppb, "
              f"true chi RMS {truth_rms[n] * 1000:.2f} ppb", flush=True)
        if figure and n in shown:
            maps[f"{n}^3 true chi"] = enlarged(chi_n, SCALES[-1])
        for name, run in runs:
            recon, seconds = timed(run, field, mask_n, vs, (0.0, 0.0, 1.0))
            x = recon[mask_n] - recon[mask_n].mean()
            results.append({"scale": n, "voxel_mm": vs[0], "method": name, "time_s": seconds,
                            "rmse_ppm": float(np.sqrt(np.mean((x - truth) ** 2))), "nrmse": nrmse(recon, chi_n, mask_n)})
            if n == SCALES[-1]:
                results[-1]["rmse_below_coarsest_nyquist_ppm"] = rmse_below_ppm(recon, chi_n, mask_n, vs[0],
                                                                                nyquist(results))
                results[-1]["detail_kept_weak_kernel"], results[-1]["detail_kept_elsewhere"] = detail_kept(
                    recon, chi_n, mask_n, vs[0], nyquist(results))
            print(f"  {name}: {seconds:.1f} s", flush=True)
            if figure and n in shown:
                maps[f"{n}^3 {name}: RMSE {1000 * results[-1]['rmse_ppm']:.2f} ppb"] = enlarged(recon, SCALES[-1])
    if figure:
        figure.write_bytes(comparison_png(maps, mask_n, window=(-0.1, 0.1),  # the finest scale's mask
                                          title=f"Wisnieff phantom at {shown[0]}^3 and {shown[1]}^3: chi (ppm)"))
        print(f"saved {figure}")
    names = list(dict.fromkeys(r["method"] for r in results))
    rows = [["true chi RMS (ppb)", *(1000 * truth_rms[n] for n in SCALES), "", ""]]
    for name in names:
        rmse = [r["rmse_ppm"] for r in results if r["method"] == name]
        relative = [r["nrmse"] for r in results if r["method"] == name]  # RMSE / true chi RMS
        rows.append([name, *(1000 * v for v in rmse), max(rmse) / min(rmse), max(relative) / min(relative)])
    markdown(["method", *(f"RMSE ppb {n}^3" for n in SCALES), "worst / best", "worst / best of RMSE / true RMS"], rows)
    print(f"\nthe {SCALES[-1]}^3 error split at the {SCALES[0]}^3 grid's Nyquist frequency ({nyquist(results):.4f} cycles/mm):\n")
    rows = []
    for name in names:
        coarse, fine = (next(r for r in results if r["method"] == name and r["scale"] == n) for n in shown)
        below = fine["rmse_below_coarsest_nyquist_ppm"]
        above = np.sqrt(max(fine["rmse_ppm"] ** 2 - below**2, 0.0))
        rows.append([name, 1000 * coarse["rmse_ppm"], 1000 * fine["rmse_ppm"], 1000 * below, 1000 * above,
                     fine["detail_kept_weak_kernel"], fine["detail_kept_elsewhere"]])
    markdown(["method", f"RMSE ppb {shown[0]}^3", f"RMSE ppb {shown[1]}^3", "of which below Nyquist",
              "of which above", "detail kept above, \\|D\\| < 0.19", "detail kept above, elsewhere"], rows)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=PARTS, default=["qsm2016", "sim", "pipeline", "wisnieff"])
    parser.add_argument("--methods", nargs="+", choices=INVERSION_METHODS, default=["tkd", "cfl2", "ilsqr", "tv", "deep"])
    parser.add_argument("--model", action="append", help=f"deep model name or checkpoint path, repeatable "
                                                          f"(default {DEFAULT_MODEL})")
    parser.add_argument("--refine", nargs="+", type=int, default=[0], metavar="N",
                        help="data-consistency iterations after the network (default 0: the network alone; deep_invert's "
                             "default is 10); several values give several rows")
    parser.add_argument("--refine-lambda", nargs="+", type=float, metavar="L",
                        help="prior weight of the refinement (default deep_invert's); several values give several rows")
    parser.add_argument("--refine-radius", nargs="+", type=float, metavar="MM",
                        help="SMV high-pass radius of the refinement in mm, 0 for none (default deep_invert's); "
                             "several values give several rows")
    parser.add_argument("--refine-tv", nargs="+", type=float, metavar="A",
                        help="total-variation weight of the refinement in ppm mm, 0 for none (default deep_invert's); "
                             "several values give several rows")
    parser.add_argument("--resolution-tolerance", nargs="+", type=float, metavar="T",
                        help="relative voxel-size mismatch the network runs at without resampling, inf: never resample "
                             "(default deep_invert's); several values give several rows")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})")
    parser.add_argument("--json", type=Path, help="also save every number to this JSON file")
    parser.add_argument("--figure", type=Path, metavar="PNG", help="qsm2016: save the maps of every method as one figure")
    parser.add_argument("--scale-figure", type=Path, metavar="PNG",
                        help="wisnieff: save the truth and every method's map at the coarsest and finest scale")
    parser.add_argument("--tiles-figure", type=Path, metavar="PNG",
                        help="tiles: save the first deep row's one-pass map, tiled map and their difference")
    parser.add_argument("--phantom-resampling", choices=["antialiased", "plain"], default="antialiased",
                        help="wisnieff: resample the phantom to each scale with the Gaussian anti-aliasing pre-filter "
                             "(default) or without it")
    args = parser.parse_args()
    runs = inversions(args.methods, args.model or [DEFAULT_MODEL], args.refine, args.refine_lambda, args.refine_radius,
                      args.refine_tv, args.resolution_tolerance)
    print(f"methods: {', '.join(name for name, _ in runs)}; {available_cores()} CPUs usable, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {"methods": [name for name, _ in runs]}
    parts = {"qsm2016": lambda: part_qsm2016(args.data, runs, args.figure), "variants": lambda: part_variants(args.data),
             "sim": lambda: part_sim(runs), "pipeline": lambda: part_pipeline(runs),
             "storage": lambda: part_storage(args.methods), "tiles": lambda: part_tiles(runs, args.tiles_figure),
             "wisnieff": lambda: part_wisnieff(args.data, runs, args.scale_figure,
                                               args.phantom_resampling == "antialiased")}
    with fft.set_workers(available_cores()):  # the library's FFTs are single-threaded unless told otherwise
        for part in args.part:
            results[part] = parts[part]()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
