"""The per-subject HTML report as a Nipype interface (``qsmprep.reports.write_subject_report``)."""

from nipype.interfaces.base import BaseInterfaceInputSpec, Directory, File, SimpleInterface, TraitedSpec, traits


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="the derivatives dataset")
    subject = traits.Str(mandatory=True, desc="subject label without 'sub-'")
    runs = traits.List(traits.Dict, mandatory=True,
                       desc="this invocation's runs, each: name, mask, magnitude, total_field, local_field, chimaps")
    methods_text = traits.Str("", usedefault=True, desc="boilerplate methods text")
    command = traits.Str("", usedefault=True, desc="the command line")
    log_dir = traits.Str("", usedefault=True, desc="this invocation's log folder, linked from the report")
    errors = traits.List(traits.Str, desc="problems met for this subject")
    written = traits.List(File(exists=True), desc="the derivatives files (a dependency: the report waits for them)")


class _SubjectReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the HTML report")


class SubjectReport(SimpleInterface):
    """Write ``OUTPUT_DIR/sub-<label>.html`` from a subject's derivatives: this invocation's runs and those in
    ``output_dir`` when it is written."""

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from ..reports import write_subject_report

        path = write_subject_report(
            self.inputs.output_dir, self.inputs.subject, list(self.inputs.runs),
            methods_text=self.inputs.methods_text, command=self.inputs.command or None,
            errors=list(self.inputs.errors) if self.inputs.errors else (), log_dir=self.inputs.log_dir or None,
        )
        self._results["out_report"] = str(path)
        return runtime
