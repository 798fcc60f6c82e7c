"""BIDS input discovery and validation, and derivatives naming."""

from .discovery import GRE_SUFFIXES, GRERun, discover_runs, read_filter_file
from .validation import Problem, check_bids_dataset, validate_run, validate_runs

__all__ = [
    "GRE_SUFFIXES",
    "GRERun",
    "Problem",
    "check_bids_dataset",
    "discover_runs",
    "read_filter_file",
    "validate_run",
    "validate_runs",
]
