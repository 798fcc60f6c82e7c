"""Top-level workflows: the whole dataset, then one workflow per subject (the nipreps layout)."""

import re
import shlex
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from ..bids.derivatives import run_output_paths
from ..interfaces.reports import SubjectReport
from ..reports.report import report_entry
from .qsm import RUNS_DESCRIBED, init_qsm_wf, methods_description, run_workflow_name, spoken_list, workflow_label


def top_workflow_name():
    """``qsmprep_<version>_wf`` (e.g. ``qsmprep_0_1_0_wf``), the work directory's top folder: another version's
    cached steps, whose nodes may have other outputs, are then never reused (as fMRIPrep names its work folder)."""
    return f"qsmprep_{re.sub(r'[^0-9A-Za-z]+', '_', __version__)}_wf"


def subject_workflow_name(subject):
    """Name of the workflow of ``subject`` (label without ``sub-``)."""
    return f"single_subject_{subject}_wf"


def subject_of_node(node_name):
    """The subject label in a node's dotted name (``...single_subject_01_wf.<run>...``), or None: the inverse of
    :func:`subject_workflow_name`."""
    match = re.search(r"\bsingle_subject_([a-zA-Z0-9]+)_wf\b", node_name)
    return match.group(1) if match else None


def work_folder_names(runs):
    """{subject workflow name: ("sub-<label>", {run workflow name: run name})}: the folders of the work directory
    in which each subject's and each run's nodes work (``init_qsmprep_wf``), by what they process."""
    folders = {}
    for run in runs:
        subject = folders.setdefault(subject_workflow_name(run.subject), (f"sub-{run.subject}", {}))
        subject[1][run_workflow_name(run)] = run.name
    return folders


def collect_methods(config, runs=None):
    """(distinct methods paragraphs, references) of ``runs`` (default: all of ``config.runs``); where runs differ
    (in echo times, field strength, B0 direction, voxel size), each paragraph names the runs it describes."""
    described, references = {}, []  # paragraph -> names of its runs
    for run in runs if runs is not None else config.runs:
        text, refs = methods_description(run, config)
        described.setdefault(text, []).append(run.name)
        references += [r for r in refs if r not in references]
    if len(described) == 1:  # one paragraph of every run: named by number only
        ((text, names),) = described.items()
        return [text if len(names) > 1 else text.replace(RUNS_DESCRIBED, "The run described here", 1)], references
    return [text.replace(RUNS_DESCRIBED, f"{'Runs' if len(names) > 1 else 'Run'} {spoken_list(names)}", 1)
            for text, names in described.items()], references


def format_references(references):
    """The references section of the boilerplate."""
    return "References\n\n" + "\n".join(f"- {r}" for r in references) + "\n"


def methods_text(config, runs=None):
    """The boilerplate methods text of ``runs`` (default: all of ``config.runs``) with its references."""
    paragraphs, references = collect_methods(config, runs)
    return "\n\n".join(paragraphs) + "\n\n" + format_references(references)


def report_runs(runs, config):
    """What ``build_subject_report`` needs per run: name, input magnitude, and the derivative paths."""
    out = Path(config.output_dir)
    return [report_entry(run.name, {k: out / v for k, v in run_output_paths(run, config.inversion).items()},
                         magnitude=run.magnitude[0])
            for run in runs]


def init_single_subject_wf(subject, runs, config, errors=()):
    """One subject: a QSM workflow per run, then the subject's HTML report.

    Parameters
    ----------
    subject : str
        Label without ``sub-``.
    runs : list of GRERun
        The subject's validated runs.
    config : qsmprep.config.Config
    errors : sequence of str
        Validation problems of this subject's other runs, shown in its report.

    Nodes: ``qsm_<label>_wf`` per run (see ``init_qsm_wf``), ``merge_written``
    and ``report`` (``qsmprep.reports.write_subject_report``).
    """
    workflow = Workflow(name=subject_workflow_name(subject))
    merge_written = pe.Node(niu.Merge(len(runs), ravel_inputs=True), name="merge_written",
                            run_without_submitting=True)
    report = pe.Node(
        SubjectReport(output_dir=str(config.output_dir), subject=subject,
                      runs=report_runs(runs, config),
                      methods_text=methods_text(config, runs), command=shlex.join(config.command),
                      errors=list(errors), log_dir=str(config.log_dir)),
        name="report", mem_gb=0.5)
    for index, run in enumerate(runs, start=1):
        qsm_wf = init_qsm_wf(run, config)
        workflow.connect(qsm_wf, "outputnode.written", merge_written, f"in{index}")
    workflow.connect(merge_written, "out", report, "written")
    return workflow


def init_qsmprep_wf(config):
    """The whole run (``top_workflow_name``): one ``single_subject_<label>_wf`` per subject of ``config.runs``.

    ``config.runs`` holds the validated runs and ``config.problems`` the
    validation problems (dicts with subject, run, file, message); both are
    set by the CLI before the workflow is built. The methods text is
    ``methods_text``'s, not niworkflows' ``visit_desc()``.
    """
    workflow = Workflow(name=top_workflow_name())
    workflow.base_dir = str(config.work_dir)
    subjects = sorted({run.subject for run in config.runs})
    for subject in subjects:
        runs = [r for r in config.runs if r.subject == subject]
        errors = [p["message"] for p in config.problems if p["subject"] == subject]
        workflow.add_nodes([init_single_subject_wf(subject, runs, config, errors)])
    return workflow


__all__ = ["init_qsmprep_wf", "init_single_subject_wf", "methods_text", "subject_of_node", "subject_workflow_name",
           "top_workflow_name", "work_folder_names", "workflow_label"]
