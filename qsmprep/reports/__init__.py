"""HTML reports with slice mosaics: one per subject, and the group level's table of quality measures."""

from .report import build_subject_report, write_subject_report

__all__ = ["build_subject_report", "write_subject_report"]
