"""Errors a user can cause, each mapped to a BIDS execution-spec exit code.

The exit codes follow BSD sysexits, as the BIDS-Apps execution specification
asks: 64 usage, 65 bad input data, 66 no input, 70 internal software error,
73 an output that cannot be created.
"""


class QSMPrepError(Exception):
    """Base class: a message a user can act on, and the process exit code."""

    exit_code = 70


class UsageError(QSMPrepError):
    """The command line or a parameter is wrong (EX_USAGE)."""

    exit_code = 64


class DataError(QSMPrepError):
    """An input file exists but its content cannot be used (EX_DATAERR)."""

    exit_code = 65


class NoInputError(QSMPrepError):
    """An input file or dataset is missing or unreadable (EX_NOINPUT)."""

    exit_code = 66


class CantCreateError(QSMPrepError):
    """An output folder or file cannot be created or written (EX_CANTCREAT)."""

    exit_code = 73


def few_named(names, shown=3):
    """``names`` joined by commas, the first ``shown`` of them, then how many more: "a, b, c and 7 more"."""
    names = list(dict.fromkeys(names))
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
