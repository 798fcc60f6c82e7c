"""Wall time and peak memory of every dipole inversion at 160^3 and 256^3, on CPU and CUDA.

    python bench/speed.py [--methods tkd cfl2 ilsqr deep] [--sizes 160 256] [--threads N]
                          [--model NAME_OR_PATH ...] [--refine N] [--refine-radius R] [--refine-tv A]
                          [--devices cpu cuda]
                          [--json OUT] [--profile N]

Input: the local field of the simulated head phantom (``qsmprep.sim.head_phantom``,
seed 0) on an N^3 grid of 1 mm voxels (a deep model trained at 1 mm then runs
without resampling; at 160^3 the brain touches the grid's edges, which does not
matter for timing): ``forward_field_ppm`` of the phantom's chi inside its brain mask, B0
along the third axis. It is built once per size in this process and saved to a
temporary .npy file.

Each (method, size, device) then runs in a fresh Python subprocess that loads the
input, calls the method once (a first call, as a user's run: it includes building
the dipole kernel and, for deep, loading the model, but not importing the modules it
imports on first use, which a user's run has loaded to read its input; on CUDA the context is
created before the clock starts, and a second, warm call is timed too) and reports its wall time and
the peak resident memory of its own address space, VmHWM in /proc/self/status
(Linux; psutil is not installed, tracemalloc misses the FFT buffers, and
``getrusage`` ru_maxrss would carry the parent's peak across fork/exec). "RSS before" is
the peak after imports and loading the input, so "peak - before" is what the
inversion added; divided by the voxel count it is the last column, "added bytes / voxel"
(the GPU peak per voxel on CUDA), which ``qsmprep.inversion.deep.NETWORK_BYTES_PER_VOXEL``
sizes deep tiles by. On CUDA the peak GPU memory is ``torch.cuda.max_memory_allocated``.
Only deep runs on CUDA (the classical methods are NumPy/SciPy).

``--threads N`` pins each worker to N cores (``os.sched_setaffinity``; the library
runs scipy.fft with as many workers as the affinity allows), sets
OMP_NUM_THREADS/MKL_NUM_THREADS and ``torch.set_num_threads(N)``. ``--profile N`` prints
where each first call's time went (cProfile, the N costliest functions). Prints a Markdown
table; reproduces docs/benchmarks.md.
"""

import argparse
import cProfile
import importlib
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import fft

from qsmprep.config import INVERSION_METHODS, library_function
from qsmprep.resources import available_cores

VOXEL_MM = 1.0
B0_DIR = (0.0, 0.0, 1.0)


def synthetic_input(n, folder):
    """Save the phantom's local field and brain mask on an n^3 grid; return the .npz path."""
    from qsmprep.physics import forward_field_ppm
    from qsmprep.sim import head_phantom

    voxel = VOXEL_MM
    phantom = head_phantom((n, n, n), (voxel, voxel, voxel), seed=0)
    chi = np.where(phantom.brain_mask, phantom.chi_ppm, 0).astype(np.float32)
    field = forward_field_ppm(chi, (voxel,) * 3, B0_DIR) * phantom.brain_mask
    path = Path(folder) / f"field_{n}.npz"
    np.savez(path, field=field.astype(np.float32), mask=phantom.brain_mask, voxel_mm=voxel)
    return path


def peak_rss_gb():
    """Peak resident set size of this process's address space (VmHWM), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def worker(args):
    """Run one inversion on the saved input; print one JSON line of measurements."""
    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    data = np.load(args.worker)
    field, mask, voxel = data["field"], data["mask"], float(data["voxel_mm"])
    kwargs = {}
    if args.methods[0] == "deep":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        kwargs = {"model": args.model[0], "device": args.devices[0], "refine_iters": args.refine,
                  "refine_radius_mm": args.refine_radius, "refine_tv_weight": args.refine_tv}
        # deep_invert imports these on first use; the CLIs and the pipeline have them loaded before (nibabel
        # reads their input), so their import (0.21 s on an H100 machine, --profile) is not the inversion's time
        importlib.import_module("qsmprep.deep.registry")
    invert = library_function("inversion", args.methods[0])

    cuda = args.devices[0] == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")  # CUDA context creation (about a second) is not the inversion's time
    rss_before_gb = peak_rss_gb()
    times = []
    profiler = cProfile.Profile() if args.profile else None
    for call in range(2 if cuda else 1):  # on CUDA also a second, warm call (cuDNN plans and model cached)
        start = time.perf_counter()
        if profiler and call == 0:
            profiler.enable()
        with fft.set_workers(available_cores()):
            invert(field, mask, (voxel,) * 3, B0_DIR, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        if profiler and call == 0:
            profiler.disable()
        times.append(time.perf_counter() - start)
    if profiler:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile)
    result = {"time_s": times[0], "rss_before_gb": rss_before_gb, "peak_rss_gb": peak_rss_gb()}
    if cuda:
        result["second_call_s"] = times[1]
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(result))


def deep_available(model):
    from qsmprep.deep.registry import load_model
    from qsmprep.errors import NoInputError

    try:
        load_model(model)
    except NoInputError as err:
        print(f"note: deep model {model!r} skipped: {err}", flush=True)
        return False
    return True


def main():
    from qsmprep.inversion.deep import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["tkd", "cfl2", "ilsqr", "tv", "deep"], choices=INVERSION_METHODS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[160, 256])
    parser.add_argument("--threads", type=int, default=0, help="cores per run (default: all visible)")
    parser.add_argument("--model", action="append", help=f"deep model, repeatable (default {DEFAULT_MODEL})")
    parser.add_argument("--refine", type=int, default=0,
                        help="deep data-consistency iterations (default 0: the network alone; deep_invert's default is 10)")
    parser.add_argument("--refine-radius", type=float, default=0.0, metavar="R",
                        help="deep: SMV high-pass radius of the refinement, mm (default 0: off, qsmprep-invert's "
                             "default; the pipeline's is 8)")
    parser.add_argument("--refine-tv", type=float, default=0.0, metavar="A",
                        help="deep: total-variation weight of the refinement, ppm mm (default 0: off)")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                        help="devices for deep (default cpu, plus cuda when torch sees a GPU)")
    parser.add_argument("--json", type=Path, help="also save the results to this JSON file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions that took longest (cumulative) in each first call (cProfile; "
                             "its overhead is in that call's time)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or [DEFAULT_MODEL]
    if args.worker:
        return worker(args)
    if args.devices is None:
        import torch

        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    runs = []  # (method label, worker arguments)
    for method in args.methods:
        if method != "deep":
            runs.append((method, ["--methods", method, "--devices", "cpu"]))
            continue
        for model in args.model:
            if not deep_available(model):
                continue
            label = f"deep {Path(str(model)).stem}" + (f" + refine {args.refine}" if args.refine else "")
            label += f" radius {args.refine_radius:g}" if args.refine and args.refine_radius else ""
            label += f" TV {args.refine_tv:g}" if args.refine and args.refine_tv else ""
            for device in args.devices:
                runs.append((label, ["--methods", "deep", "--model", str(model), "--refine", str(args.refine),
                                     "--refine-radius", str(args.refine_radius), "--refine-tv", str(args.refine_tv),
                                     "--devices", device]))
    cores = args.threads or available_cores()
    print(f"{cores} cores per run; load average {os.getloadavg()[0]:.1f}", flush=True)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = synthetic_input(n, tmp)
            for label, extra in runs:
                cmd = [sys.executable, __file__, "--worker", str(path), "--threads", str(args.threads),
                       "--profile", str(args.profile), *extra]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{label} at {n}^3 failed:\n{out.stderr}")
                if args.profile:
                    print(f"{label} at {n}^3, first call:", *out.stdout.strip().splitlines()[:-1], sep="\n")
                row = {"method": label, "size": n, "device": extra[extra.index("--devices") + 1],
                       **json.loads(out.stdout.strip().splitlines()[-1])}
                results.append(row)
                print(f"{label} {n}^3 {row['device']}: {row['time_s']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB",
                      flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
    print("| method | grid | device | time s | second call s | peak RSS GB | RSS before GB | peak GPU GB "
          "| added bytes / voxel |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gpu = f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else "-"
        second = f"{r['second_call_s']:.2f}" if "second_call_s" in r else "-"
        # what one voxel costs: the GPU peak on CUDA, else the RSS the inversion added (deep_invert's tile sizing)
        added_gb = r.get("peak_gpu_gb", r["peak_rss_gb"] - r["rss_before_gb"])
        print(f"| {r['method']} | {r['size']}^3 | {r['device']} | {r['time_s']:.2f} | {second} | "
              f"{r['peak_rss_gb']:.2f} | {r['rss_before_gb']:.2f} | {gpu} | {added_gb * 1e9 / r['size'] ** 3:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "results": results}, indent=1))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
