"""Checks of settings read from TOML files (training recipes, pipeline parameters).

A check is a pair (what the value must be, predicate); tables map the keys of a
section to checks, and ``check_table`` refuses unknown keys and values a check
refuses with a UsageError naming the file, the section and the key.
"""

import math

from .errors import UsageError


def is_int(value):
    """An int, not a bool (True is an int to Python, never a count or an iteration number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """A finite int or float, not a bool: NaN passes no range test and infinity is never a usable setting. An int
    beyond a float's range (a hand-edited JSON may hold one) is not one either: ``math.isfinite`` cannot take it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def number(what, ok=lambda v: True, integer=False):
    """Check of a finite number (an integer if ``integer``) for which ``ok`` holds."""
    kind = is_int if integer else is_number
    return what, lambda v: kind(v) and ok(v)


def one_of(*choices):
    """Check (what, test) of a string that is one of ``choices``."""
    return f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices


def is_sequence(value, n):
    """A list or tuple of ``n`` items (as JSON, TOML and argparse give them)."""
    return isinstance(value, (list, tuple)) and len(value) == n


def each(check, n, shape):
    """``n`` values written as ``shape`` (e.g. "[X, Y, Z]"), each passing ``check``."""
    what, ok = check
    return f"{shape}, each {what}", lambda v: is_sequence(v, n) and all(map(ok, v))


def value_range(check):
    """A range [low, high] with low <= high, both passing ``check``."""
    what, ok = check
    return f"a range [low, high] with low <= high, each {what}", lambda v: is_sequence(v, 2) and all(map(ok, v)) and v[0] <= v[1]


POSITIVE = number("a positive number", lambda v: v > 0)
NON_NEGATIVE = number("a number >= 0", lambda v: v >= 0)
NUMBER = number("a finite number")
PROBABILITY = number("a probability in [0, 1]", lambda v: 0 <= v <= 1)
POSITIVE_INT = number("a positive integer", lambda v: v >= 1, integer=True)
COUNT = number("an integer >= 0", lambda v: v >= 0, integer=True)
BOOL = ("true or false", lambda v: isinstance(v, bool))
TABLE = ("a table", lambda v: isinstance(v, dict))


def check_table(table, checks, where, source, closed=True, required=()):
    """Raise UsageError naming ``source`` and ``where`` (e.g. "[data]") for a key of ``table`` that ``checks``
    lacks (when ``closed``), a key of ``required`` that ``table`` lacks, or a value its check refuses."""
    unknown = sorted(set(table) - set(checks)) if closed else []
    if unknown:
        raise UsageError(f"{source}: unknown {where} key(s) {unknown}; known: {sorted(checks)}.")
    missing = [key for key in required if key not in table]
    if missing:
        raise UsageError(f"{source}: {where} lacks the key(s) {missing}; add them (see the shipped recipes).")
    for key, value in table.items():
        if key in checks and not checks[key][1](value):
            raise UsageError(f"{source}: {where} {key} must be {checks[key][0]}, got {value!r}.")
