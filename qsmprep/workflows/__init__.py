"""Nipype workflows: ``init_qsmprep_wf`` -> ``init_single_subject_wf`` -> ``init_qsm_wf`` (per run)."""
