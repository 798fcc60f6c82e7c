"""qsmprep: the BIDS-App. Multi-echo GRE magnitude + phase in, Chimap(s) and field maps out.

    qsmprep BIDS_DIR OUTPUT_DIR participant [options]

Follows the BIDS-Apps contract (Gorgolewski et al., PLoS Comput Biol 2017)
and its exit codes: 0 success, 64 usage error, 65 bad input data (some runs
could not be used; the others were processed), 66 no input data, 70 a
processing step failed (the other subjects still finished; crash files are
in OUTPUT_DIR/logs/<run_id>/), 73 OUTPUT_DIR or --work-dir cannot be created
or written. See docs/usage.md.

Heavy libraries (nipype, pybids, torch) are imported only after the command
line is parsed, so ``--help`` and usage errors answer at once.
"""

import argparse
import copy
import logging
import logging.handlers
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

from .. import __version__
from ..config import (
    B0_RESAMPLE_TILT_DEG,
    BGREMOVE_METHODS,
    INVERSION_METHODS,
    MASK_STRATEGIES,
    PIPELINE_HIGH_PASS_RADIUS_MM,
    PRESETS,
    SELF_RESAMPLING_INVERSIONS,
    UNWRAP_METHODS,
    Config,
    deep_model_available,
    inversion_high_pass_mm,
    preset_methods,
)
from ..errors import DataError, QSMPrepError, UsageError, few_named
from ..resources import available_cores
from .common import (
    DEEP_OPTIONS,
    LOG_FORMAT,
    STOP_SIGNALS,
    ArgumentParser,
    add_deep_options,
    check_b0_dir_option,
    check_b0_tesla_option,
    check_deep_options,
    check_output_folder,
    finite_float,
    install_stop_handler,
    quiet_on_closed_pipe,
    restore_handlers,
)

log = logging.getLogger("qsmprep")

EXIT_PROCESSING_FAILED = 70
"""Exit code when a workflow node crashed (EX_SOFTWARE); other subjects still finish."""

DEFAULT_WORK_DIR = Path("work")
"""``--work-dir``'s default, in the current folder (as fMRIPrep's)."""


def stop_on_signals(config):
    """Make SIGTERM (``kill``, ``docker stop``, a scheduler's time limit) and SIGINT (Ctrl-C) stop qsmprep at once.

    Nipype runs some steps in qsmprep's own process (all of them with one process) and records any exception
    they raise, SystemExit and KeyboardInterrupt included, as that step's failure, then goes on with the other
    runs; and MultiProc's forked workers outlived a parent killed by SIGTERM, waiting for ever on a queue whose
    write end they inherited. The handler stops the workers, removes what it cut short (``remove_cut_short``)
    and exits at once with 128 + the signal's number (143, 130), as a shell reports a process the signal
    killed. The workers are ended by SIGKILL, which nothing delays or drops: a SIGTERM that reaches a child just
    after its fork, before it has the default handlers back (``_default_stop_handlers_in_child``), is caught by
    Python and then dropped, as the handler it finds is the default (the likely cause of two workers that outlived
    their parent once, in a CI run under load). Returns the handlers it replaced, {signal number: handler}, for a
    caller that goes on to restore.
    """
    import multiprocessing

    from ..interfaces.bids import STAGING_FOLDERS  # imported now: an import in a signal handler can deadlock

    def stop(signum, frame):
        logging.getLogger("concurrent.futures").disabled = True  # its traceback of the pool broken on purpose
        workers = multiprocessing.active_children()
        for worker in workers:
            worker.kill()
        cut_short = remove_cut_short(config, STAGING_FOLDERS)
        log.error("stopped by %s, with %d worker process(es)%s; run the same command again to go on from the work "
                  "directory's finished steps.", signal.Signals(signum).name, len(workers),
                  f"; removed the derivatives already written of {', '.join(cut_short)}" if cut_short else "")
        logging.shutdown()
        os._exit(128 + signum)

    stop.stops_qsmprep = True  # what a forked child looks for (_default_stop_handlers_in_child)
    return install_stop_handler(stop)


def _default_stop_handlers_in_child():
    """In a forked child, the default handler for each of ``STOP_SIGNALS`` that has ``stop_on_signals``'s: a
    Ctrl-C, which the terminal sends to every process of the group, then ends the child mid-node instead of running
    the parent's handler there. Handlers a Python caller set are left to it."""
    for signum in STOP_SIGNALS:
        if getattr(signal.getsignal(signum), "stops_qsmprep", False):
            signal.signal(signum, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_stop_handlers_in_child)  # once per process, not once per main()


def remove_cut_short(config, staging_folders):
    """Delete what a stopped run leaves half-done in OUTPUT_DIR; return the names of the runs whose derivatives it
    deleted. A run's derivatives are written one after the other at its end (each renamed into place from a
    hidden folder, ``qsmprep.interfaces.bids.STAGING_FOLDERS``): the hidden ``staging_folders`` being written
    and, for a run with only some of its derivatives in place, those (an earlier run's were deleted when this
    one started). Its modules are loaded by then (by ``qsmprep.interfaces.bids``), as a signal handler needs."""
    import shutil

    from ..bids.derivatives import run_output_files

    for folder in list(staging_folders):
        shutil.rmtree(folder, ignore_errors=True)
    cut_short = []
    for run in config.runs:
        paths = [Path(config.output_dir) / name for name in run_output_files(run, config.inversion)]
        present = [path for path in paths if path.exists()]
        if 0 < len(present) < len(paths):
            for path in present:
                path.unlink(missing_ok=True)
            cut_short.append(run.name)
    return cut_short


EPILOG = """presets (explicit --unwrap/--bgremove/--inversion override them):
  fast      laplacian unwrapping, V-SHARP, TKD: seconds per run
  default   laplacian unwrapping, V-SHARP, deep inversion with the shipped model (iLSQR if it is absent)
  research  laplacian unwrapping, V-SHARP, deep + TKD + closed-form L2 + iLSQR + TV (deep if the model is present),
            one Chimap per method

exit codes: 0 success; 64 usage error; 65 some input runs unusable (the others were processed) or none
usable; 66 no input data found; 70 a processing step failed (crash files in OUTPUT_DIR/logs/); 73 OUTPUT_DIR
or --work-dir cannot be created or written; 130 stopped by Ctrl-C (SIGINT); 143 stopped by SIGTERM.

examples:
  qsmprep /data/bids /data/derivatives/qsmprep participant --participant-label 01 02
  qsmprep bids out participant --preset research --nprocs 8 --omp-nthreads 4 -w /scratch/work
  qsmprep bids out participant --inversion tkd ilsqr --mask /data/derivatives/qsmprep-masks
  qsmprep bids out participant --use-plugin workflows/nipype_slurm.yml
  qsmprep bids out group      # after the participant level: group_qsm.tsv/.html over every run
"""


def build_parser():
    """The qsmprep command-line parser."""
    p = ArgumentParser(
        prog="qsmprep",
        description="Quantitative susceptibility mapping (QSM) of multi-echo gradient-echo BIDS data.\n"
        "Writes a BIDS derivatives dataset with susceptibility maps (Chimap, ppm), brain masks,\n"
        "total (Hz) and local (ppm) field maps, a per-subject HTML report and a methods text.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="the output folder, written as a BIDS derivatives dataset")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="'participant': process the runs; 'group': a table and page of quality measures over "
                   "the runs OUTPUT_DIR holds (group_qsm.tsv/.html; reads --participant-label and --session-label)")
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more console output: -v Nipype's per-node lines (always in the log file), -vv debug")

    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", nargs="+", action="extend", default=[], metavar="LABEL",
                   help="subjects to process (with or without 'sub-'); default all")
    g.add_argument("--session-label", nargs="+", action="extend", default=[], metavar="LABEL",
                   help="sessions to process (with or without 'ses-'); default all")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help='JSON restricting the GRE query with pybids entities, e.g. {"megre": {"acquisition": "fast"}}')
    g.add_argument("--skip-bids-validation", action="store_true", help="skip the light BIDS check of file names")

    g = p.add_argument_group("methods")
    g.add_argument("--preset", choices=list(PRESETS), default="default", help="method set (see below; default 'default')")
    g.add_argument("--unwrap", choices=UNWRAP_METHODS, help="spatial phase unwrapping")
    g.add_argument("--bgremove", choices=BGREMOVE_METHODS, help="background field removal")
    g.add_argument("--inversion", nargs="+", action="extend", choices=INVERSION_METHODS, metavar="METHOD",
                   help=f"dipole inversion(s), each written as its own desc-<method> Chimap: {', '.join(INVERSION_METHODS)}"
                   " ('deep' uses the model shipped in the package, docs/models/, or --model)")
    g.add_argument("--mask", default="quality", metavar="STRATEGY|PATH",
                   help=f"brain mask: a strategy ({', '.join(MASK_STRATEGIES)}; default quality), a mask NIfTI on "
                   "the runs' grid, or a derivatives folder holding <run>_desc-brain_mask.nii.gz per run")
    g.add_argument("--b0-tesla", type=finite_float, metavar="T", help="field strength in T (overrides the sidecars' ImagingFrequency and MagneticFieldStrength)")
    g.add_argument("--b0-dir", type=finite_float, nargs=3, metavar=("X", "Y", "Z"),
                   help="B0 direction in the images' voxel coordinates (i, j, k); default: from the NIfTI affine")
    g.add_argument("--resample-b0", action="store_true",
                   help="invert TKD, CFL2, iLSQR and TV on a B0-aligned grid when the acquisition is oblique by more "
                   f"than {B0_RESAMPLE_TILT_DEG:g} degree (helps TKD); deep always works in its own aligned frame and "
                   "is not resampled twice (docs/methods/pipeline.md)")

    g.add_argument("--invert-phase", action="store_true",
                   help="negate the phase of every echo: for data stored with the opposite polarity, whose "
                   "veins and iron-rich deep grey matter come out negative (dark) in the Chimaps; the report "
                   "warns when a Chimap looks so (docs/methods/phase.md)")

    g.add_argument("--parameters", type=Path, metavar="FILE",
                   help="TOML file of method parameters, a table per method, e.g. [inversion.tkd] threshold = 0.15 "
                   "or [mask.quality] erode_mm = 2 (docs/usage.md, Method parameters); the defaults are the "
                   "library's but for TV's harmonic_radius_mm (8 mm, as --refine-radius), recorded in "
                   "logs/<run_id>/config.json")

    g = p.add_argument_group("deep inversion")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="deep: where the network and its refinement run (default auto: CUDA when torch sees a GPU)")
    add_deep_options(g, PIPELINE_HIGH_PASS_RADIUS_MM)

    g = p.add_argument_group("resources and execution")
    g.add_argument("-w", "--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="Nipype working directory; reuse it to resume and to reuse cached results (default ./work)")
    g.add_argument("--nprocs", type=int, default=None, metavar="N",
                   help="processes run at once (default: the CPUs this process may use, as SLURM, taskset or a "
                        "container grant them)")
    g.add_argument("--omp-nthreads", type=int, default=None, metavar="N",
                   help="threads per process for FFTs (default: min(nprocs, 8))")
    g.add_argument("--mem", type=finite_float, default=None, metavar="GB", help="memory limit for scheduling, in GB")
    g.add_argument("--use-plugin", type=Path, metavar="FILE",
                   help="Nipype plugin YAML ({plugin: SLURM, plugin_args: {...}}) for SLURM/SGE/PBS execution")
    g.add_argument("--stop-on-first-crash", action="store_true", help="stop everything at the first failure")
    g.add_argument("--boilerplate-only", action="store_true", help="write the methods text (CITATION.md) and stop")
    return p


def _read_plugin(path):
    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise UsageError(f"plugin file {path} does not exist: check --use-plugin.") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"plugin file {path} is not valid YAML ({exc}): fix its syntax.") from exc
    except OSError as exc:
        raise UsageError(f"plugin file {path} cannot be read ({exc.strerror or exc}): give a YAML file to "
                         "--use-plugin.") from exc
    if not isinstance(content, dict) or "plugin" not in content:
        raise UsageError(f"plugin file {path} must hold a 'plugin' key (e.g. 'plugin: SLURM') and optional 'plugin_args'.")
    import nipype.pipeline.plugins as plugins

    # a plugin that submits the graph and returns (SLURMGraph, CondorDAGMan, ...) would end qsmprep before any job
    # ran, reporting success: only those that wait for their jobs are offered
    waiting = sorted(name.removesuffix("Plugin") for name in dir(plugins) if name.endswith("Plugin")
                     and not name.endswith(("GraphPlugin", "DAGManPlugin")) and name != "SomaFlowPlugin")
    plugin, arguments = str(content["plugin"]), content.get("plugin_args") or {}
    if plugin not in waiting:
        raise UsageError(f"plugin file {path}: plugin {plugin!r} is not one qsmprep can run, which waits for its jobs "
                         f"to end: use one of {', '.join(waiting)}.")
    if not isinstance(arguments, dict):
        raise UsageError(f"plugin file {path}: plugin_args must be a mapping of the plugin's arguments (e.g. "
                         f"'sbatch_args: ...'), not {arguments!r}.")
    return plugin, dict(arguments)


def check_output_location(bids_dir, output_dir, what="output folder"):
    """Raise UsageError unless ``output_dir`` (the ``what``, named in the message) leaves the input dataset
    ``bids_dir`` untouched.

    The output may lie outside the dataset, or inside it under
    ``BIDS_DIR/derivatives/<name>`` (the BIDS convention); never the dataset
    itself, a folder at its top level, or a folder inside a subject. Paths are
    compared as written with ``..`` resolved, and with symbolic links followed.
    """
    bids_dir, output_dir = Path(os.path.abspath(bids_dir)), Path(os.path.abspath(output_dir))
    example = "BIDS_DIR/derivatives/qsmprep" if what == "output folder" else "/tmp/qsmprep-work"
    hint = f"use a folder outside it or BIDS_DIR/derivatives/<name>, e.g. {example}"
    for base, out in dict.fromkeys([(bids_dir, output_dir), (bids_dir.resolve(), output_dir.resolve())]):
        if base in (out, out.parent):
            raise UsageError(f"{what} {output_dir} must not be the input dataset or a folder at its top level "
                             f"({hint}).")
        if out.is_relative_to(base) and out.relative_to(base).parts[0] != "derivatives":
            raise UsageError(f"{what} {output_dir} is inside the input dataset {bids_dir} (under "
                             f"{base / out.relative_to(base).parts[0]}), where the outputs would mix with the "
                             f"raw data: {hint}.")


def check_output_dataset(output_dir, bids_dir, work_dir=None):
    """Raise UsageError when ``output_dir`` is another tool's dataset: its ``dataset_description.json`` does not
    name qsmprep in ``GeneratedBy``. qsmprep would replace that description, and its files would mix with the
    other tool's. Warn when qsmprep made it from another input dataset than ``bids_dir``: the description then
    links this one, and the earlier runs' ``bids:raw:`` sources point into it; and when it is no dataset but holds
    files (``unexpected_contents``: a mistyped folder, whose files the derivatives would mix with)."""
    from ..bids.derivatives import dataset_makers, linked_input_dataset

    description = Path(output_dir) / "dataset_description.json"
    makers = dataset_makers(output_dir)
    found = unexpected_contents(output_dir, work_dir) if makers is None else []
    if found:
        log.warning("output folder %s is not a derivatives dataset yet holds %d other item(s) (%s): qsmprep writes "
                    "its dataset beside them; give an empty or new folder unless that is what you want.",
                    output_dir, len(found), few_named(found))
    if makers is not None and "qsmprep" not in makers:
        made_by = f"made by {', '.join(makers)}" if makers else "not made by qsmprep"
        raise UsageError(f"output folder {output_dir} holds another dataset ({description} says it is {made_by}): "
                         "give qsmprep a folder of its own, e.g. BIDS_DIR/derivatives/qsmprep.")
    linked = linked_input_dataset(output_dir) if makers else None
    if linked is not None and linked != Path(bids_dir).absolute():
        log.warning("output folder %s was made from another input dataset (%s), not %s: the runs already in it "
                    "will be described as if made from this one; give each input dataset its own output "
                    "folder.", output_dir, linked, bids_dir)


def unexpected_contents(output_dir, work_dir=None):
    """Sorted names of what ``output_dir`` holds besides what qsmprep puts in a folder before its dataset
    description (``logs/`` of a --boilerplate-only run, hidden files) and the ``work_dir`` (warned about apart)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    work = Path(work_dir).absolute() if work_dir is not None else None
    return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith(".")
                  and entry.name != "logs" and not (work and work.is_relative_to(entry.absolute())))


def chosen_parameters(path, bgremove, inversions, mask):
    """The method parameters of the parameters file ``path`` (``read_parameters_file``) for the methods this run
    uses; a table for a method it does not use is dropped with a warning naming it."""
    from ..config import read_parameters_file

    chosen = {"mask": {mask}, "bgremove": {bgremove}, "inversion": set(inversions)}
    parameters = {}
    for step, tables in read_parameters_file(path).items():
        for method, values in tables.items():
            if method in chosen[step]:
                parameters.setdefault(step, {})[method] = values
            else:
                log.warning("%s: [%s.%s] has no effect: this run does not use %s for %s.", path, step, method,
                            method, "the brain mask" if step == "mask" else step)
    return parameters


def resolve_config(args, argv):
    """Check the options and turn them into a Config (runs not yet discovered)."""
    unwrap, bgremove, inversions = preset_methods(args.preset)
    inversions = tuple(dict.fromkeys(args.inversion or inversions))
    check_method_options(args, inversions)
    check_resource_options(args)
    parameters = chosen_parameters(args.parameters, bgremove=args.bgremove or bgremove, inversions=inversions,
                                   mask=args.mask) if args.parameters else {}
    bids_dir, output_dir = checked_locations(args)
    if "deep" in inversions:
        parameters.setdefault("inversion", {}).setdefault("deep", {}).update(deep_parameters(args))
    nprocs, plugin, plugin_args = execution_plugin(args)
    config = Config(
        bids_dir=str(bids_dir), output_dir=str(output_dir), work_dir=str(args.work_dir.absolute()),
        analysis_level=args.analysis_level,
        participant_label=[s.removeprefix("sub-") for s in args.participant_label],
        session_label=[s.removeprefix("ses-") for s in args.session_label],
        nprocs=nprocs, omp_nthreads=args.omp_nthreads or min(nprocs, 8), mem_gb=args.mem,
        plugin=plugin, plugin_args=plugin_args, skip_bids_validation=args.skip_bids_validation,
        boilerplate_only=args.boilerplate_only, stop_on_first_crash=args.stop_on_first_crash,
        verbosity=args.verbose, preset=args.preset, unwrap=args.unwrap or unwrap,
        bgremove=args.bgremove or bgremove, inversion=inversions,
        mask=args.mask if args.mask in MASK_STRATEGIES else str(Path(args.mask).absolute()),
        b0_tesla=args.b0_tesla, b0_dir=tuple(args.b0_dir) if args.b0_dir else None,
        resample_b0=args.resample_b0, invert_phase=args.invert_phase, device=args.device or "auto",
        command=["qsmprep", *argv],
        parameters=parameters,
    )
    return config.resolve_parameters()


def check_method_options(args, inversions):
    """Raise UsageError for method options that cannot work together or with this install (the deep model, the
    GPU, the B0 options, ``--mask``); warn about ``--resample-b0`` where it does nothing."""
    if "deep" in inversions and not deep_model_available():
        from ..inversion.deep import default_model_path

        raise UsageError(
            f"--inversion deep: no trained deep-inversion model in this install ({default_model_path()} is missing): "
            f"reinstall qsmprep, or choose among {', '.join(m for m in INVERSION_METHODS if m != 'deep')}."
        )
    if "deep" in inversions and args.device == "cuda":
        from ..physics import resolve_device

        resolve_device("cuda")  # refuses at once rather than when the first run reaches the inversion
    chosen = f"--inversion {' '.join(inversions)}" + ("" if args.inversion else f" (of --preset {args.preset})")
    check_deep_options(args, (*DEEP_OPTIONS, "device"), "deep" in inversions, chosen)
    check_b0_tesla_option(args.b0_tesla)
    check_b0_dir_option(args.b0_dir)
    if args.b0_dir is not None and args.resample_b0:
        raise UsageError("--resample-b0 aligns to the scanner's B0 from the affine; it cannot be combined with --b0-dir.")
    if args.resample_b0 and set(inversions) <= set(SELF_RESAMPLING_INVERSIONS):
        log.warning("--resample-b0 has no effect with --inversion deep alone: deep resamples into its model's "
                    "B0-aligned frame itself.")
    if args.mask not in MASK_STRATEGIES and not Path(args.mask).exists():
        raise UsageError(f"--mask {args.mask}: neither a strategy ({', '.join(MASK_STRATEGIES)}) nor an existing file "
                         "or folder: check the path.")


def check_resource_options(args):
    """Raise UsageError for a ``--nprocs`` or ``--omp-nthreads`` below 1 or a ``--mem`` that is not positive; warn
    when more processes or threads are asked for than the CPUs this process may use."""
    for name in ("nprocs", "omp_nthreads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.mem is not None and args.mem <= 0:
        raise UsageError("--mem is in GB and must be positive.")
    cores = available_cores()
    for option, number in (("--nprocs", args.nprocs), ("--omp-nthreads", args.omp_nthreads)):
        if number and number > cores and not args.use_plugin:
            log.warning("%s %d is more than the %d CPU(s) this process may use: %s share them, which is slower and "
                        "takes more memory than %s %d.", option, number, cores,
                        "its processes" if option == "--nprocs" else "each node's threads", option, cores)


def checked_locations(args):
    """(BIDS_DIR, OUTPUT_DIR) as absolute paths, once the output, work and mask locations are checked: not inside
    the input dataset, writable, a mask not among the outputs it would be replaced by, OUTPUT_DIR not another
    tool's dataset (UsageError, or the output folder's own error); a warning for a work folder inside OUTPUT_DIR."""
    bids_dir, output_dir = args.bids_dir.absolute(), args.output_dir.absolute()
    check_output_location(bids_dir, output_dir)
    # a user who gave no -w is told where the default put it: running from inside the dataset is a natural first try
    given = args.work_dir is not DEFAULT_WORK_DIR  # argparse hands a non-string default over as it is
    check_output_location(bids_dir, args.work_dir, "--work-dir" if given else
                          "--work-dir (not given: the default ./work, in the folder qsmprep runs from)")
    if args.mask not in MASK_STRATEGIES and Path(args.mask).resolve().is_relative_to(output_dir.resolve()):
        raise UsageError(f"--mask {args.mask} is in OUTPUT_DIR {output_dir}, whose masks this run replaces with its "
                         "own (eroded by V-SHARP or RESHARP): copy the masks to another folder and give that, "
                         "or write to another OUTPUT_DIR.")
    if args.work_dir.resolve().is_relative_to(output_dir.resolve()):
        log.warning("--work-dir %s is inside OUTPUT_DIR %s: Nipype's intermediate files (gigabytes for large runs) "
                    "become part of the derivatives dataset, which BIDS tools then index; give a folder outside it.",
                    args.work_dir, output_dir)
    for option, folder in (("OUTPUT_DIR", output_dir), ("--work-dir", args.work_dir.absolute())):
        check_output_folder(option, folder)
    check_output_dataset(output_dir, bids_dir, args.work_dir)
    return bids_dir, output_dir


def deep_parameters(args):
    """The deep inversion's parameters given by its options (the others are the pipeline's,
    ``Config.resolve_parameters``), with the ``--model`` checked (``checked_model``: a name or a loadable
    checkpoint)."""
    deep = {key: getattr(args, dest) for dest, key in DEEP_OPTIONS.items() if getattr(args, dest) is not None}
    if "model" in deep:
        from ..deep.registry import checked_model

        deep["model"] = checked_model(deep["model"])
    return deep


def execution_plugin(args):
    """(nprocs, Nipype plugin, plugin_args): ``--use-plugin``'s file, else MultiProc over ``--nprocs`` processes
    (default: the CPUs this process may use) with ``--mem``, or Linear for one; a warning where ``--mem`` does
    nothing."""
    nprocs = args.nprocs or available_cores()
    if args.use_plugin:
        plugin, plugin_args = _read_plugin(args.use_plugin)
    else:
        plugin = "MultiProc" if nprocs > 1 else "Linear"
        plugin_args = {"n_procs": nprocs, "raise_insufficient": False} if nprocs > 1 else {}
        if nprocs > 1 and sys.platform == "linux":
            # forked workers inherit the logging set-up: their lines reach qsmprep.log, each naming its run
            # (NodeRunFilter); Python 3.14 makes forkserver Linux's default, whose workers would start without it
            plugin_args["mp_context"] = "fork"
        if args.mem and nprocs > 1:
            plugin_args["memory_gb"] = args.mem
    if args.mem and (args.use_plugin or nprocs == 1):
        log.warning("--mem %g has no effect %s.", args.mem,
                    "with --use-plugin: give the cluster's memory in the plugin file's plugin_args" if args.use_plugin
                    else "with one process (--nprocs 1), which runs the nodes one at a time")
    return nprocs, plugin, plugin_args


def find_inputs(config, filter_file=None):
    """Discover and validate the runs; set ``config.runs`` and ``config.problems``.

    Raises NoInputError (66) when nothing is found, DataError (65) when no
    run passes validation.
    """
    from ..bids import check_bids_dataset, discover_runs, read_filter_file, validate_runs
    from ..bids.discovery import require_bids_dir

    require_bids_dir(config.bids_dir)
    if not config.skip_bids_validation:
        check_bids_dataset(config.bids_dir)
    if filter_file is not None:
        config.bids_filters = read_filter_file(filter_file)
    runs = discover_runs(config.bids_dir, config.participant_label, config.session_label, config.bids_filters)
    valid, problems = validate_runs(runs, b0_tesla=config.b0_tesla, mask=config.user_mask)
    config.runs = valid
    config.problems = [{"subject": p.subject, "run": p.run, "file": p.file, "message": p.message} for p in problems]
    if not valid:
        raise DataError(f"none of the {len(runs)} gradient-echo run(s) found can be processed; fix the problems "
                        "listed above and run again.")
    return config


HIGH_PASS_RADII = {("bgremove", "vsharp", "radii_mm"): "[bgremove.vsharp] radii_mm in the --parameters file",
                   ("bgremove", "resharp", "radius_mm"): "[bgremove.resharp] radius_mm ({default:g} mm by default; a "
                                                         "--parameters file sets it)",
                   ("inversion", "deep", "refine_radius_mm"): "--refine-radius",
                   ("inversion", "tv", "harmonic_radius_mm"): f"[inversion.tv] harmonic_radius_mm "
                                                              f"({PIPELINE_HIGH_PASS_RADIUS_MM:g} mm in the pipeline; "
                                                              "a --parameters file sets it)"}
"""The spherical-mean radii (mm) of the chosen methods' high-pass filters, and where the user sets each ({default}:
the library's default)."""


def check_high_pass_radii(config):
    """Raise UsageError, before any work, for a spherical-mean radius (V-SHARP's, RESHARP's, the deep refinement's,
    TV's) that reaches no neighbouring voxel of some run: that method's field would be zero there
    (``check_high_pass_radius``).
    V-SHARP's default radii follow each run's voxel size and always fit."""
    from ..bgremove.smv import check_high_pass_radius
    from ..config import default_parameters
    from ..physics import voxel_size_from_affine

    problems = {}  # message -> the runs it concerns: runs of one voxel size share a message
    for (step, method, key), where in HIGH_PASS_RADII.items():
        params = config.parameters.get(step, {}).get(method, {})
        value = inversion_high_pass_mm(method, params) if step == "inversion" else params.get(key)
        if not value:
            continue  # None: V-SHARP's defaults; 0: the high-pass is off (as without the deep refinement)
        where = where.format(default=default_parameters(step, method)[key])
        for run in config.runs:
            voxel_size_mm = voxel_size_from_affine(run.affine)
            for radius in (value if isinstance(value, (list, tuple)) else [value]):
                try:
                    check_high_pass_radius(radius, voxel_size_mm)
                except ValueError as exc:
                    problems.setdefault(f"{where}: {exc}", []).append(run.name)
    if problems:
        raise UsageError("; ".join(f"{message} (run {few_named(runs)})" for message, runs in problems.items()) + ".")


class NodeRunFilter(logging.Filter):
    """Sets ``record.run`` to "<run name>: " for a record logged by a node of a run ("sub-<label>: " by a node of
    a subject, its report), else to "", so that the lines of runs processed side by side say whose they are.

    Nipype runs each node in its own folder, <work dir>/qsmprep_<version>_wf/<subject workflow>/<run workflow>/<node>, in
    whichever process runs it (MultiProc workers too: forked, they inherit this filter), so the working folder
    names the run. ``folders`` maps the folder names to runs (``qsmprep.workflows.base.work_folder_names``); it is
    empty until the runs are known. Nodes that ``--use-plugin`` sends to cluster jobs log in those jobs' output.
    """

    def __init__(self):
        super().__init__()
        self.folders = {}

    def filter(self, record):
        record.run = ""
        try:
            parts = Path.cwd().parts
        except OSError:  # the working folder was removed
            return True
        for subject_folder, run_folder in zip(parts, parts[1:]):
            if subject_folder in self.folders:
                subject, runs = self.folders[subject_folder]
                record.run = f"{runs.get(run_folder, subject)}: "
        return True


RUN_LOG_FORMAT = LOG_FORMAT.replace("%(message)s", "%(run)s%(message)s")
"""``LOG_FORMAT`` with the run a node processes before its message (``NodeRunFilter``)."""

_node_run = NodeRunFilter()


TRACEBACK_LINE = re.compile(r"^\s*Traceback\b", re.MULTILINE)
"""The line that begins a traceback in a log record's message (``ConsoleFormatter`` cuts there)."""


class ConsoleFormatter(logging.Formatter):
    """Cuts a record's message before its first line that begins a traceback: a failed step's traceback is in its
    crash file and in qsmprep.log (formatted in full there), and the console showed it twice, in Nipype's record
    and in ours; the run's summary then gives each failed step's error."""

    def format(self, record):
        message = record.getMessage()
        start = TRACEBACK_LINE.search(message)
        if start is None:  # an internal error's own traceback (log.exception) stays: it is for the bug report
            return super().format(record)
        short = copy.copy(record)  # the file handler formats the record itself, traceback included
        short.msg = f"{message[:start.start()].rstrip()} (traceback in the crash file and in qsmprep.log)"
        short.args = None
        return super().format(short)


def _setup_logging(verbosity):
    level = logging.DEBUG if verbosity > 1 else logging.INFO
    logging.basicConfig(level=level, format=RUN_LOG_FORMAT, force=True)
    _node_run.folders = {}
    logging.getLogger().handlers[0].addFilter(_node_run)
    logging.getLogger().handlers[0].setFormatter(ConsoleFormatter(RUN_LOG_FORMAT))
    if not verbosity:  # other packages' progress lines (Nipype's per node, pybids' schema) go to the log file only;
        # -v shows them here too
        logging.getLogger().handlers[0].addFilter(
            lambda record: record.name.partition(".")[0] == "qsmprep" or record.levelno >= logging.WARNING)
    # the log file opens once the output folder is known to be valid (write_provenance): until then its records
    # (discovery, each run refused by validation) wait here, so that the file holds them too
    logging.getLogger().addHandler(logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1))


def _early_records():
    """The handlers holding the records logged before the log file opened (``_setup_logging``)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.handlers.MemoryHandler)]


def write_provenance(config):
    """Write the derivatives dataset files (not with ``--boilerplate-only``, which processes nothing: it re-linked an
    existing OUTPUT_DIR to its input dataset) and OUTPUT_DIR/logs/<run_id>/{command.txt,config.json,CITATION.md}."""
    from ..bids.derivatives import write_dataset_description
    from ..workflows.base import methods_text

    if not config.boilerplate_only:
        write_dataset_description(config.output_dir, config.bids_dir)
    log_dir = config.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "command.txt").write_text(shlex.join(config.command) + "\n")
    config.write(log_dir / "config.json")
    citation = log_dir / "CITATION.md"
    citation.write_text("# Methods\n\n" + methods_text(config))
    handler = logging.FileHandler(log_dir / "qsmprep.log")
    handler.setFormatter(logging.Formatter(RUN_LOG_FORMAT))
    handler.addFilter(_node_run)
    for early in _early_records():
        early.setTarget(handler)
        early.close()  # writes what it held, in order
        logging.getLogger().removeHandler(early)
    logging.getLogger().addHandler(handler)
    return citation


def _configure_nipype(config):
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(config.log_dir), "crashfile_format": "txt", "hash_method": "content",
            "stop_on_first_crash": config.stop_on_first_crash, "remove_unnecessary_outputs": False,
            "get_linked_libs": False, "check_version": False, "poll_sleep_duration": 0.2,
        },
        # Nipype's own log file handler holds a file lock that breaks in forked MultiProc workers;
        # its messages reach OUTPUT_DIR/logs/<run_id>/qsmprep.log through the root logger instead.
        "logging": {"log_to_file": False, **dict.fromkeys(("workflow_level", "interface_level", "utils_level"),
                                                          "DEBUG" if config.verbosity > 1 else "INFO")},
    })
    nipype_logging.update_logging(nipype_config)
    logging.getLogger("nipype").handlers.clear()  # one stream of messages: through qsmprep's root handlers


_CRASHED_NODE = re.compile(r"^Node: (\S+)", re.MULTILINE)


NIPYPE_NO_RESULT_NOTE = "When creating this crashfile, the results file corresponding"
"""How the note begins that Nipype's report_crash appends to a crash file when the node left no result file."""


def crashed_nodes(log_dir):
    """{subject label: ["<failed node>: <its error>"]} from the text crash files in ``log_dir``."""
    from ..workflows.base import subject_of_node

    failed = {}
    for crash in sorted(Path(log_dir).glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        # the exception's last line, e.g. "...DataError: <why, fix>", before the note Nipype adds when the node
        # left no result file (a worker process that died)
        error = text.split(NIPYPE_NO_RESULT_NOTE)[0].strip().splitlines()[-1].strip()
        for node in _CRASHED_NODE.findall(text):
            failed.setdefault(subject_of_node(node) or "?", []).append(f"{node}: {error}")
    return failed


def written_chimaps(config, run):
    """The Chimaps ``run`` wrote, in ``config.inversion`` order (its earlier outputs were removed before it ran)."""
    from ..bids.derivatives import run_output_paths

    paths = run_output_paths(run, config.inversion)
    return [path for m in config.inversion if (path := Path(config.output_dir) / paths[f"chimap:{m}"]).is_file()]


def run_finished(config, run):
    """Whether ``run`` wrote every Chimap asked for."""
    return len(written_chimaps(config, run)) == len(config.inversion)


def stopped_subjects(config, failed):
    """Subjects none of whose steps failed (``failed``) but with runs left unfinished: ``--stop-on-first-crash``
    ended the whole run at another subject's crash."""
    if not (config.stop_on_first_crash and failed):
        return set()
    return {run.subject for run in config.runs if run.subject not in failed and not run_finished(config, run)}


def _error_reports(config, failed):
    """A report listing the problems for subjects none of whose runs could be processed, and for subjects
    where a step failed (their report step never ran): the input problems, each failed step's error, and the
    figures and methods of the subject's runs that did finish (a run writes its derivatives only when complete)."""
    from ..reports import write_subject_report
    from ..workflows.base import methods_text, report_runs

    processed = {run.subject for run in config.runs}
    rejected = {p["subject"] for p in config.problems} - processed
    stopped = stopped_subjects(config, failed)
    for subject in sorted(rejected | set(failed) | stopped):
        errors = [p["message"] for p in config.problems if p["subject"] == subject]
        crashes = Path(config.log_dir).relative_to(config.output_dir)  # relative, as the report's log link
        errors += [f"processing failed at {step} (crash files in {crashes}/ beside this report)"
                   for step in failed.get(subject, [])]
        if subject in stopped:
            errors.append(f"processing stopped before this subject's runs finished: --stop-on-first-crash ended the "
                          f"run at the crash of {', '.join('sub-' + s for s in sorted(failed))}; run the participant "
                          "level again for this subject")
        runs = [run for run in config.runs if run.subject == subject]
        finished = [(run, entry) for run, entry in zip(runs, report_runs(runs, config)) if Path(entry["mask"]).is_file()]
        write_subject_report(config.output_dir, subject, [entry for _, entry in finished],
                             methods_text=methods_text(config, [run for run, _ in finished]) if finished else "",
                             command=shlex.join(config.command), errors=errors, log_dir=config.log_dir)


def summarize(config, failed):
    """Print where the outputs are, and what went wrong; return the exit code."""
    from ..reports.group import GROUP_STEM

    out = Path(config.output_dir)
    lines = [f"qsmprep {__version__} finished; outputs in {out}"]
    stopped = stopped_subjects(config, failed)
    for run in config.runs:
        written = written_chimaps(config, run)
        # per run, from what it wrote (earlier outputs were removed first): a failed run's subject may have others
        # that finished, and after --stop-on-first-crash a subject that never failed may have written nothing
        state = "ok" if len(written) == len(config.inversion) else "STOPPED" if run.subject in stopped else "FAILED"
        lines.append(f"  {run.name} [{state}]")
        lines += [f"    Chimap: {p}" for p in written]
    for subject in sorted({run.subject for run in config.runs} | {p["subject"] for p in config.problems}):
        report = out / f"sub-{subject}.html"
        if report.is_file():
            lines.append(f"  report sub-{subject}: {report}")
    code = 0
    if config.problems:
        lines.append(f"{len(config.problems)} input problem(s); those runs were skipped:")
        lines += [f"  - {p['message']}" for p in config.problems]
        code = DataError.exit_code
    if failed:
        lines.append(f"processing failed for subject(s) {', '.join('sub-' + s for s in sorted(failed))}; "
                     f"crash files in {config.log_dir}:")
        lines += [f"  - {node}" for nodes in failed.values() for node in nodes]
        code = EXIT_PROCESSING_FAILED
    if stopped:
        lines.append(f"stopped at the first crash (--stop-on-first-crash) before finishing subject(s) "
                     f"{', '.join('sub-' + s for s in sorted(stopped))}: run the participant level again for them")
    group_table = out / f"{GROUP_STEM}.tsv"
    if group_table.is_file():  # the group level's table is a snapshot: it does not follow the participant level
        lines.append(f"{group_table} predates this run: run the group level again "
                     f"(qsmprep {config.bids_dir} {out} group) to include it")
    lines.append(f"log, command, configuration and methods text: {config.log_dir}")
    print("\n".join(lines))
    return code


def remove_earlier_outputs(config):
    """Delete the derivatives and figures an earlier qsmprep run wrote for the runs about to be processed, so that
    none made with other options (e.g. a Chimap of a method no longer asked for) is left beside the new ones.
    Only the names qsmprep writes are deleted: other tools' files (e.g. fMRIPrep's ``sub-01_desc-preproc_T1w``)
    in the same folders are kept."""
    from ..bids.derivatives import run_output_files
    from ..reports.report import FIGURE_DESCS, figure_stem

    out = Path(config.output_dir)
    for run in config.runs:
        figures = Path(f"sub-{run.subject}", "figures")
        names = [*run_output_files(run, INVERSION_METHODS),
                 *(figures / f"{figure_stem(run.name, desc)}.png" for desc in (*FIGURE_DESCS, *INVERSION_METHODS))]
        earlier = [out / name for name in names if (out / name).is_file()]
        for path in earlier:
            path.unlink()
        if earlier:
            log.info("%s: removed %d files of an earlier qsmprep run from %s; this run writes them anew",
                     run.name, len(earlier), out)


def run(config, filter_file=None):
    """Discover, validate, build and run the workflow; return the exit code."""
    start = time.perf_counter()
    find_inputs(config, filter_file)
    check_high_pass_radii(config)
    citation = write_provenance(config)
    log.info("%d run(s) to process; methods text in %s", len(config.runs), citation)
    if config.boilerplate_only:  # the exit code says, as after a whole run, whether runs were left out
        skipped = f"; {len(config.problems)} input problem(s), those runs left out" if config.problems else ""
        print(f"methods text written to {citation}{skipped}")
        return DataError.exit_code if config.problems else 0
    _configure_nipype(config)
    remove_earlier_outputs(config)
    from ..workflows.base import init_qsmprep_wf, work_folder_names

    workflow = init_qsmprep_wf(config)
    _node_run.folders = work_folder_names(config.runs)
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    from traits.api import TraitError

    plugin = config.plugin
    if plugin == "MultiProc":  # Nipype's, but a node whose worker process dies fails instead of hanging the run
        from ..workflows.multiproc import MultiProcPlugin

        plugin = MultiProcPlugin(plugin_args=config.plugin_args)
    try:
        workflow.run(plugin=plugin, plugin_args=config.plugin_args)
    except RuntimeError as exc:  # Nipype: "Workflow did not execute cleanly", or a failed node's traceback
        log.error("the workflow did not finish: %s", exc)
    except TraitError as exc:  # Nipype's scheduler read a cached node whose output files were deleted
        raise QSMPrepError(  # exit 70, as a failed step
            f"the work directory {config.work_dir} holds a cached step whose files are gone ({exc}): delete that "
            "folder, or give another -w, and run again.") from None
    failed = crashed_nodes(config.log_dir)
    _error_reports(config, failed)
    log.info("finished in %.1f s", time.perf_counter() - start)
    return summarize(config, failed)


GROUP_LEVEL_OPTIONS = ("bids_dir", "output_dir", "analysis_level", "participant_label", "session_label", "verbose")
"""The argparse dests the group level reads; it warns that any other option given has no effect there."""


def held_labels(folders, run_names, entity):
    """The labels of ``entity`` (e.g. "ses") that OUTPUT_DIR holds: of its ``folders`` (``<entity>-<label>``) and
    of the runs its logs name (``run_names``): a run that failed, or was stopped, may have left no folder."""
    from ..bids.derivatives import run_name_labels

    named = {run_name_labels(name).get(entity) for name in run_names} - {None}
    return sorted({folder.name.removeprefix(f"{entity}-") for folder in folders if folder.is_dir()} | named)


def run_group(args):
    """The group level: ``group_qsm.tsv``/``.html`` over the runs the participant level wrote in OUTPUT_DIR
    (``qsmprep.reports.group``) for ``--participant-label`` and ``--session-label`` (default every subject and
    session); returns the exit code: 0, or 65 when some run's derivatives are missing or cannot be measured, or the
    last participant run refused its input (its row says why; the others are in the table)."""
    from ..bids.derivatives import dataset_makers, logged_runs, refused_runs, run_name_labels, runs_gone_from_input
    from ..errors import NoInputError
    from ..reports.group import counts, group_rows, write_group_report

    defaults = vars(build_parser().parse_args([str(args.bids_dir), str(args.output_dir), "group"]))
    ignored = [dest for dest, value in vars(args).items() if dest not in GROUP_LEVEL_OPTIONS and value != defaults[dest]]
    if ignored:
        log.warning("%s %s no effect at the group level, which only measures what the participant level wrote.",
                    ", ".join("--" + dest.replace("_", "-") for dest in ignored), "has" if len(ignored) == 1 else "have")
    out = args.output_dir.absolute()
    if not out.is_dir():
        raise NoInputError(f"OUTPUT_DIR {out} {'is a file, not a folder' if out.exists() else 'does not exist'}: give "
                           "the folder the participant level wrote.")
    if "qsmprep" not in (dataset_makers(out) or []):
        raise NoInputError(f"{out} holds no qsmprep derivatives ({out / 'dataset_description.json'} missing or not "
                           "written by qsmprep): run the participant level into it first.")
    logged, refused = logged_runs(out), refused_runs(out)
    gone = runs_gone_from_input(out, args.bids_dir, [*logged, *refused])
    for name in sorted(gone):
        log.info("%s: named by a participant run's log, but no longer in %s: left out (its derivatives, if any, are "
                 "still measured)", name, args.bids_dir)
    logged = {name: value for name, value in logged.items() if name not in gone}
    refused = {name: value for name, value in refused.items() if name not in gone}
    named = [*logged, *refused]  # runs the logs name: a failed or refused one may have left no folder
    present = held_labels(out.glob("sub-*"), named, "sub")
    wanted = list(dict.fromkeys(s.removeprefix("sub-") for s in args.participant_label)) or present
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise NoInputError(f"--participant-label {' '.join(missing)}: no such subject in {out} (it has "
                           f"{', '.join(present) or 'none'}).")
    sessions = list(dict.fromkeys(s.removeprefix("ses-") for s in args.session_label))
    held = held_labels([p for subject in wanted for p in (out / f"sub-{subject}").glob("ses-*")],
                       [name for name in named if run_name_labels(name).get("sub") in wanted], "ses")
    if set(sessions) - set(held):
        raise NoInputError(f"--session-label {' '.join(s for s in sessions if s not in held)}: no such session of "
                           f"subject(s) {', '.join(wanted)} in {out} (they have {', '.join(held) or 'none'}).")
    rows = group_rows(out, wanted, sessions, logged, refused)
    if not rows:  # refused before writing: an earlier table is kept, not replaced by an empty one
        of_sessions = f" in session(s) {', '.join(sessions)}" if sessions else ""
        check = "check --session-label, or " if sessions else ""
        raise NoInputError(f"{out} holds no processed run for subject(s) {', '.join(wanted)}{of_sessions}: {check}run "
                           "the participant level first.")
    asked = ([f"subject(s) {', '.join(wanted)}"] if args.participant_label else []) + (
        [f"session(s) {', '.join(sessions)}"] if sessions else [])
    tsv, page = write_group_report(out, rows, "the runs of " + " and of ".join(asked) if asked else "every run")
    flagged = sorted({row["run"] for row in rows if row["flags"]})
    runs, chimaps = counts(rows)
    print(f"{runs} run(s), {chimaps} Chimap(s): {tsv}\ngroup report: {page}")
    for run in flagged:
        print(f"  flagged {run}: " + "; ".join(row["flags"] for row in rows if row["run"] == run and row["flags"]))
    unmeasured = sorted({row["run"] for row in rows if row["problem"]})
    if unmeasured:
        log.error("%d run(s) not measured (derivatives missing or unreadable, or input refused), flagged in the table: "
                  "%s", len(unmeasured), ", ".join(unmeasured))
        return DataError.exit_code
    return 0


def main(argv=None):
    """Entry point of ``qsmprep``; returns the exit code."""
    return quiet_on_closed_pipe(_main, argv)


def _main(argv):
    """``main`` without the closed-pipe handling."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network check for Nipype updates
    _setup_logging(args.verbose)
    try:
        if args.analysis_level == "group":
            return run_group(args)
        config = resolve_config(args, argv)
        replaced = stop_on_signals(config)
        try:
            return run(config, args.bids_filter_file)
        finally:
            restore_handlers(replaced)
    except QSMPrepError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except BrokenPipeError:  # the reader of the summary went away: not a bug (quiet_on_closed_pipe)
        raise
    except Exception:  # a bug in qsmprep itself: the traceback is for the bug report
        log.exception("internal error in qsmprep %s; please report it with this traceback", __version__)
        return EXIT_PROCESSING_FAILED
    finally:  # refused before the log file opened: what was held for it is dropped
        for early in _early_records():
            logging.getLogger().removeHandler(early)


if __name__ == "__main__":
    sys.exit(main())
