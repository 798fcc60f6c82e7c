"""What every qsmprep console script shares: verbosity, logging, exit codes.

``run_cli(parser, run, argv)`` adds ``-v/--verbose`` to an argparse parser,
parses ``argv``, configures logging and calls ``run(args)`` with scipy.fft using
every core the process may run on (the library's FFTs follow
``scipy.fft.set_workers``, one thread unless a caller sets more). A
``QSMPrepError`` becomes one line on standard error, "PROG: error: MESSAGE",
and its BIDS execution-spec exit code (64 usage, 65 data, 66 no input, 73 an
output that cannot be created);
argparse's own usage errors exit with 64 instead of 2.
"""

import argparse
import logging
import math
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..config import DEEP_FLAG_PARAMETERS, PIPELINE_HIGH_PASS_RADIUS_MM
from ..errors import CantCreateError, QSMPrepError, UsageError
from ..resources import available_cores


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""SIGTERM (``kill``, ``docker stop``, a scheduler's time limit) and SIGINT (Ctrl-C): the signals that stop a
qsmprep command (``install_stop_handler``)."""


def install_stop_handler(handler, keep_ignored=False):
    """Make ``handler`` the handler of each of ``STOP_SIGNALS``; returns the handlers it replaced, {signal number:
    handler}, for ``restore_handlers``. With ``keep_ignored`` a signal the parent process ignores (a background job's
    SIGINT, ``nohup``) stays ignored."""
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
            if not (keep_ignored and signal.getsignal(signum) is signal.SIG_IGN)}


def restore_handlers(replaced):
    """Put back the signal handlers ``install_stop_handler`` replaced: a main() called from Python (a test, a
    notebook) gets its own back."""
    for signum, handler in replaced.items():
        signal.signal(signum, handler)


class Stopped(KeyboardInterrupt):
    """One of ``STOP_SIGNALS`` arrived. A KeyboardInterrupt, so that code which lets Ctrl-C
    through (a DataLoader worker, the trainer's clean-up) lets SIGTERM through too."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stopped_by_signals():
    """Raise ``Stopped`` on SIGINT or SIGTERM (whose default would end the process without a word); the handlers
    replaced are restored after. A signal the parent process ignores (nohup, a script's background job) stays
    ignored."""
    def stop(signum, frame):
        raise Stopped(signum)

    replaced = install_stop_handler(stop, keep_ignored=True)
    try:
        yield
    finally:
        restore_handlers(replaced)


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the BIDS-Apps usage exit code (64) instead of 2, for scripts that parse on their own."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


def finite_float(text):
    """argparse type of every numeric option: a float, refusing NaN and infinity (a usage error, exit 64), which
    would otherwise pass every range check (all comparisons with NaN are false) and give NaN maps."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


BROKEN_PIPE_EXIT = 141
"""Exit code when the reader of standard output closed it early (a shell reports 128 + SIGPIPE for tools it kills)."""


def _add_verbosity(parser):
    try:
        parser.add_argument(
            "-v", "--verbose", action="count", default=0,
            help="log progress (-v) or debugging detail (-vv) to standard error",
        )  # fmt: skip
    except argparse.ArgumentError:  # the parser already has -v/--verbose
        pass


DEEP_OPTIONS = {flag.removeprefix("--").replace("-", "_"): key for key, flag in DEEP_FLAG_PARAMETERS.items()}
"""The deep-inversion options ``qsmprep`` and ``qsmprep-invert`` share (argparse dest) -> keyword of ``deep_invert``."""


def add_deep_options(group, refine_radius_mm=None):
    """Add ``DEEP_OPTIONS`` to an argparse parser or group; ``refine_radius_mm`` is the radius the command uses
    without ``--refine-radius`` (None: off)."""
    from ..inversion.deep import DEFAULT_MODEL, REFINE_ITERS, REFINE_LAMBDA, TV_REWEIGHT_ITERS

    radius_default = (f"default {refine_radius_mm:g}; 0 = off" if refine_radius_mm else
                      f"default 0: off; qsmprep's pipeline uses {PIPELINE_HIGH_PASS_RADIUS_MM:g} on its own local fields")
    group.add_argument("--model", metavar="NAME|PATH",
                       help=f"deep: shipped model name or checkpoint path, e.g. one written by qsmprep-train "
                            f"(default {DEFAULT_MODEL})")  # fmt: skip
    group.add_argument("--refine", type=int, metavar="N",
                       help=f"deep: data-consistency refinement iterations after the network, at most (they stop "
                            f"once converged), 0 = off (default {REFINE_ITERS})")  # fmt: skip
    group.add_argument("--refine-lambda", type=finite_float, metavar="L",
                       help=f"deep: weight of the network prior in the refinement, > 0 (default {REFINE_LAMBDA})")
    group.add_argument("--refine-radius", type=finite_float, metavar="MM",
                       help="deep: compare fields in the refinement after an MM-radius spherical-mean high-pass, so "
                            f"residual background fields are ignored ({radius_default}; "
                            "docs/methods/deep-inversion.md)")  # fmt: skip
    group.add_argument("--refine-tv", type=finite_float, metavar="A",
                       help="deep: weight (ppm mm) of a total-variation term in the refinement, its weights renewed "
                            f"every {TV_REWEIGHT_ITERS} iterations; e.g. 3e-4 with --refine 30 --refine-lambda 0.03 "
                            "(default 0: off; docs/benchmarks.md)")  # fmt: skip


def check_b0_tesla_option(value):
    """Raise UsageError unless ``--b0-tesla`` (None: not given) is a plausible field strength in tesla."""
    from ..bids.validation import MAX_PLAUSIBLE_B0_TESLA, millitesla_hint

    if value is not None and not 0 < value <= MAX_PLAUSIBLE_B0_TESLA:
        raise UsageError(f"--b0-tesla is the field strength in tesla, a positive number such as 3; got "
                         f"{value:g}{millitesla_hint(value)}.")


def check_b0_dir_option(value):
    """Raise UsageError unless ``--b0-dir`` (None: not given) is a direction: a vector whose length, as the library
    normalises it (``numpy.linalg.norm``), is neither zero nor infinite (that of 1e-200 0 0 underflows to 0, that of
    1e200 0 0 overflows)."""
    import numpy as np

    if value is None:
        return
    with np.errstate(over="ignore", under="ignore"):
        length = np.linalg.norm(value)
    if not 0 < length < np.inf:
        raise UsageError("--b0-dir must be a non-zero vector, e.g. 0 0 1.")


def check_deep_options(args, dests, deep_chosen, choice):
    """Raise UsageError for deep options given without deep, or with values out of range.

    ``dests``: the argparse dests to check (``DEEP_OPTIONS`` and any of the command's own); ``deep_chosen``:
    whether the command runs the deep inversion; ``choice``: what the user chose instead, for the message
    (e.g. "--method tkd").
    """
    for dest in dests:
        if getattr(args, dest) is not None and not deep_chosen:
            raise UsageError(f"--{dest.replace('_', '-')} applies to the deep inversion, not {choice}: remove it.")
    from ..inversion.deep import refine_setting_errors

    given = {key: getattr(args, dest) for dest, key in DEEP_OPTIONS.items() if key.startswith("refine_")}
    for key, value, what in refine_setting_errors(given):
        raise UsageError(f"{DEEP_FLAG_PARAMETERS[key]} must be {what}, got {value}.")


def torch_on_all_cores():
    """Let torch use every core this process may use: the container sets OMP_NUM_THREADS=1 (for the pipeline's
    worker processes, which set their own threads), which would otherwise leave torch on one core."""
    import torch

    torch.set_num_threads(available_cores())


def run_cli(parser, run, argv=None, verbosity=0):
    """Parse ``argv`` with ``parser``, run ``run(args)`` and return the process exit code.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser; ``-v/--verbose`` (a count) is added if missing.
    run : callable
        ``run(args)``; returns an exit code (None counts as 0) and raises a
        ``qsmprep.errors.QSMPrepError`` for anything the user can fix.
    argv : list of str or None, default None
        Arguments (``sys.argv[1:]`` if None).
    verbosity : int, default 0
        Log level without ``-v``: 0 warnings, 1 progress (for commands whose work takes minutes); each
        ``-v`` adds one, 2 and more is debugging detail.

    Returns
    -------
    int : 0 on success, else the error's exit code; ``BROKEN_PIPE_EXIT`` when standard output
    was closed by its reader.
    """
    _add_verbosity(parser)
    return quiet_on_closed_pipe(_parse_and_run, parser, run, argv, verbosity)


def quiet_on_closed_pipe(main, *args):
    """Call ``main(*args)`` and return its exit code, or ``BROKEN_PIPE_EXIT`` if its reader closed stdout.

    ``qsmprep-eval ... | head -1``: the reader goes away before the output is written. A tool killed by
    SIGPIPE would stop quietly; Python raises BrokenPipeError instead, which this turns into that exit.
    """
    try:
        code = main(*args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # stdout goes to /dev/null so the interpreter's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
    return code


def _parse_and_run(parser, run, argv, verbosity):
    """``run_cli`` without the closed-pipe handling: parse, set up logging and FFT workers, run."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse usage error (2), already printed
        return UsageError.exit_code if exc.code == 2 else (exc.code or 0)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity + args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger("qsmprep").setLevel(level)
    from scipy import fft

    try:
        with fft.set_workers(available_cores()):
            code = run(args)
    except QSMPrepError as exc:
        return print_error(parser.prog, exc)
    return 0 if code is None else int(code)


def print_error(prog, exc):
    """Write ``exc`` (a QSMPrepError) as one line, ``PROG: error: ...``, on stderr; return its exit code."""
    message = " ".join(str(exc).split())
    sys.stderr.write(f"{prog}: error: {message}\n")
    return exc.exit_code


@contextmanager
def exit_73_if_unwritable(path):
    """Turn an OSError raised while writing ``path`` into a CantCreateError (exit 73) naming it."""
    try:
        yield
    except OSError as exc:
        raise CantCreateError(f"cannot write {path} ({exc.strerror or exc}): check the directory and its "
                              "permissions.") from exc


def check_output_folder(option, folder):
    """``check_writable_folder`` for a folder the command writes into, after refusing (UsageError) a path that is
    a file."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise UsageError(f"{option} {folder} is a file, not a folder: give a folder path (it is created if missing).")
    check_writable_folder(option, folder)


def check_not_an_input(option, out, inputs):
    """Raise UsageError when the output file ``out`` (given as ``option``) is one of ``inputs`` ({name: path, or
    None for an input not given}), which writing it would overwrite."""
    for name, path in inputs.items():
        if path is not None and Path(out).resolve() == Path(path).resolve():
            raise UsageError(f"{option} {out} is the input {name}, which it would overwrite: give another file name.")


def check_writable_folder(option, folder):
    """Raise CantCreateError unless ``folder`` can be created and a file written in it.

    Checked before any work, so that a read-only or mistyped location fails in
    seconds with its path rather than after validation and processing. The
    check leaves nothing behind: folders it created are removed again.

    Parameters
    ----------
    option : str
        How the command line names the folder (e.g. "OUTPUT_DIR"), for the message.
    folder : pathlib.Path
        The folder; it and its missing parents are created, probed, and removed
        again (only those this call made).
    """
    folder = Path(os.path.abspath(folder))  # "new/../out" is "out": never probe (or remove) through ".."
    made, step = [], "created"
    try:
        missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
        nearest = folder.parents[len(missing) - 1] if missing else folder
        if not nearest.is_dir():
            raise CantCreateError(f"{option} {folder} cannot be created: {nearest} is a file. Give a folder path "
                                  "that does not run through a file.")
        for parent in reversed(missing):  # shallowest first; one a parallel run makes meanwhile is not ours
            try:
                parent.mkdir()
                made.append(parent)
            except FileExistsError:
                pass
        step = "written"  # it exists now: say so, not "created", when only the probe file fails
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CantCreateError(f"{option} {folder} cannot be {step} ({exc.strerror}): give a folder "
                              "you can write to, or fix the permissions of the nearest existing one.") from None
    finally:
        for parent in reversed(made):  # deepest first; a parallel run may have put files in it meanwhile
            try:
                parent.rmdir()
            except OSError:
                pass
