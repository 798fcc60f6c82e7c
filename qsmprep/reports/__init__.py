"""Per-subject HTML reports with slice mosaics."""

from .report import build_subject_report, write_subject_report

__all__ = ["build_subject_report", "write_subject_report"]
