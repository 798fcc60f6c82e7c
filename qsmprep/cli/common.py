"""What every qsmprep console script shares: verbosity, logging, exit codes.

``run_cli(parser, run, argv)`` adds ``-v/--verbose`` to an argparse parser,
parses ``argv``, configures logging and calls ``run(args)`` with scipy.fft using
every core the process may run on (the library's FFTs follow
``scipy.fft.set_workers``, one thread unless a caller sets more). A
``QSMPrepError`` becomes one line on standard error, "PROG: error: MESSAGE",
and its BIDS execution-spec exit code (64 usage, 65 data, 66 no input);
argparse's own usage errors exit with 64 instead of 2.
"""

import argparse
import logging
import os
import sys

from ..errors import QSMPrepError, UsageError
from ..resources import available_cores

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the BIDS-Apps usage exit code (64) instead of 2, for scripts that parse on their own."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


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


def torch_on_all_cores():
    """Let torch use every core this process may use: the container sets OMP_NUM_THREADS=1 (for the pipeline's
    worker processes, which set their own threads), which would otherwise leave torch on one core."""
    import torch

    torch.set_num_threads(available_cores())


def run_cli(parser, run, argv=None):
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

    Returns
    -------
    int : 0 on success, else the error's exit code; ``BROKEN_PIPE_EXIT`` when standard output
    was closed by its reader.
    """
    _add_verbosity(parser)
    return quiet_on_closed_pipe(_parse_and_run, parser, run, argv)


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


def _parse_and_run(parser, run, argv):
    """``run_cli`` without the closed-pipe handling: parse, set up logging and FFT workers, run."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse usage error (2), already printed
        return UsageError.exit_code if exc.code == 2 else (exc.code or 0)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger("qsmprep").setLevel(level)
    from scipy import fft

    try:
        with fft.set_workers(available_cores()):
            code = run(args)
    except QSMPrepError as exc:
        message = " ".join(str(exc).split())  # one line
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        return exc.exit_code
    return 0 if code is None else int(code)
