"""Derivatives of one run: DerivativesDataSink nodes and their JSON sidecars.

Names (docs/outputs.md) come from ``qsmprep/data/bids_config.json`` through
``qsmprep.interfaces.bids.DerivativesDataSink``; sidecar contents from
``output_metadata`` below.
"""

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..bgremove.vsharp import default_radii_mm
from ..bids.derivatives import OUTPUTS, bids_uri
from ..bids.validation import acquisition_type
from ..config import ALGORITHM_NAMES, B0_RESAMPLE_TILT_DEG
from ..deep import model_provenance
from ..interfaces.bids import DerivativesDataSink
from ..io import json_safe
from ..physics import voxel_size_from_affine

REFERENCING = "mean of the susceptibility within the brain mask (desc-brain_mask) set to 0"


def output_metadata(run, config, output, method, resampled, b0_dir):
    """JSON sidecar contents of one output of ``run`` (see docs/outputs.md for every field).

    ``output`` is a key of ``qsmprep.bids.derivatives.OUTPUTS`` ("mask", "total_field", "local_field" or
    "chimap"); for a Chimap, ``method`` names its inversion, ``resampled`` says whether it was inverted on a
    B0-aligned grid and ``b0_dir`` is the B0 direction in voxel coordinates it was inverted with (the other outputs
    ignore all three)."""
    common = {
        "Sources": [bids_uri(path, config.bids_dir) for path in run.files],
        "MagneticFieldStrength": run.b0_tesla,
        "MagneticFieldStrengthSource": run.b0_source,
        "EchoTime": list(run.echo_times_s),
        "PhaseInverted": config.invert_phase,
    }
    stated_type = acquisition_type(run)[0]
    if stated_type:  # shown in the report, where a 2D run's maps are to be checked for steps between slices
        common["MRAcquisitionType"] = stated_type
    units = OUTPUTS[output]["units"]
    if units:
        common["Units"] = units
    bgremove = {"Method": config.bgremove, **config.parameters["bgremove"][config.bgremove]}
    if config.bgremove == "vsharp" and bgremove.get("radii_mm") is None:  # the default depends on the voxel size
        bgremove["radii_mm"] = [round(float(r), 4) for r in default_radii_mm(voxel_size_from_affine(np.asarray(run.affine)))]
    mask = ({"Method": "user", "File": str(run.mask)} if config.mask_strategy == "user"
            else {"Method": config.mask_strategy, **config.parameters["mask"][config.mask_strategy]})
    if output == "mask":
        return {**common, "Type": "Brain", "MaskGeneration": mask, "BackgroundFieldRemoval": bgremove,
                "Description": "brain mask after the erosion of background field removal: where the local "
                               "field and Chimap are defined"}
    if output == "total_field":
        return {**common, "UnwrappingMethod": config.unwrap, "SkullStripped": True,
                "Description": "total field (Hz) from unwrapped, echo-combined phase, in the brain mask before "
                               "background field removal's erosion; 0 outside it"}
    if output == "local_field":
        return {**common, "BackgroundFieldRemoval": bgremove, "SkullStripped": True,
                "Description": "local (tissue) field in ppm of B0 after background field removal; 0 outside "
                               "the brain mask (desc-brain_mask)"}
    metadata = {
        **common,
        "EstimationAlgorithm": ALGORITHM_NAMES[method],
        "EstimationParameters": {
            "InversionMethod": method,
            **config.parameters.get("inversion", {}).get(method, {}),
            "UnwrappingMethod": config.unwrap,
            "BackgroundFieldRemoval": bgremove,
            "MaskGeneration": mask,
        },
        "B0Direction": [round(v, 6) for v in b0_dir],
        "ResampledToB0AlignedGrid": bool(resampled),
        "ReferenceRegion": REFERENCING,
        "SkullStripped": True,
        "Description": f"magnetic susceptibility (ppm) by {ALGORITHM_NAMES[method]}; 0 outside the brain mask",
    }
    if resampled:
        metadata["ResampleThresholdDegrees"] = B0_RESAMPLE_TILT_DEG
    if method == "deep":
        from .qsm import deep_model_options, deep_network_frame  # qsm builds these sinks: imported when used

        metadata["DeepModel"] = model_provenance(deep_model_options(config)[0])
        aligned, target_vs = deep_network_frame(run, config) or (None, None)
        metadata["ResampledToModelFrame"] = aligned
        metadata["ModelFrameVoxelSizeMm"] = [float(v) for v in target_vs] if target_vs else None
    return metadata


def with_run_details(metadata, device=None, parameters=None):
    """A Chimap's sidecar fields ``metadata`` with what its inversion node found as it ran (``DipoleInversion``'s
    outputs): deep's ``DeepInferenceDevice``, ``device``, added, and ``EstimationParameters`` updated with
    ``parameters`` (the high-pass radius used). Empty or None ones change nothing, as in a result an earlier qsmprep
    cached in the work folder, which has neither."""
    metadata = {**metadata, **({"DeepInferenceDevice": device} if device else {})}
    if parameters:
        metadata["EstimationParameters"] = {**metadata["EstimationParameters"], **parameters}
    return metadata


def init_qsm_derivatives_wf(run, config, resampled_methods=(), b0_dir=(0.0, 0.0, 1.0), name="qsm_derivatives_wf"):
    """Write one run's mask, total field, local field and Chimap(s) into the derivatives dataset.

    Inputs (inputnode): mask, total_field, local_field, chimaps (list in
    ``config.inversion`` order), inference_device (deep only: where its network ran, known once it has run,
    ``qsmprep.inversion.deep.inference_device``), parameters_<method> (each inversion node's ``fitted_parameters``:
    the high-pass radius used); ``resampled_methods`` are those inverted on a B0-aligned grid
    (their sidecars say so). Outputs (outputnode): written (the NIfTI
    paths written). Nodes: all_outputs (waits for every input), select_<output>,
    ds_mask, ds_total_field, ds_local_field, ds_chimap_<method>, chimap_<method>_metadata (each Chimap sidecar's
    fields with its details, ``with_run_details``) and merge_written (the sinks' files, in one list).
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["mask", "total_field", "local_field", "chimaps", "inference_device",
                *(f"parameters_{method}" for method in config.inversion)]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["written"]), name="outputnode")
    sinks = []

    def sink(output, method=None):
        spec = OUTPUTS[output]
        metadata = json_safe(output_metadata(run, config, output, method, method in resampled_methods, b0_dir))
        node = pe.Node(
            DerivativesDataSink(
                base_directory=config.output_dir, source_file=run.magnitude[0], dismiss_entities=("echo", "part"),
                desc=spec["desc"].format(method=method), suffix=spec["suffix"], compress=True),
            name=f"ds_{output}" + (f"_{method}" if method else ""), run_without_submitting=True, mem_gb=0.1)
        if method:  # known once the inversion has run: deep's device ("auto" is settled there), the radius used
            add_details = pe.Node(niu.Function(function=with_run_details,
                                               input_names=["metadata", "device", "parameters"],
                                               output_names=["metadata"]),
                                  name=f"chimap_{method}_metadata", run_without_submitting=True)
            add_details.inputs.metadata = metadata
            if method == "deep":
                workflow.connect(inputnode, "inference_device", add_details, "device")
            else:
                add_details.inputs.device = {}
            workflow.connect([(inputnode, add_details, [(f"parameters_{method}", "parameters")]),
                              (add_details, node, [("metadata", "meta_dict")])])
        else:
            node.inputs.meta_dict = metadata
        sinks.append(node)
        return node

    # Nipype wires an identity inputnode's sources straight to the sinks, so each file would be written as soon as
    # its step finished; a Merge waits for all of them, so a run that fails at any step writes none (no partial run).
    all_outputs = pe.Node(niu.Merge(4), name="all_outputs", run_without_submitting=True)
    workflow.connect([(inputnode, all_outputs, [("mask", "in1"), ("total_field", "in2"), ("local_field", "in3"),
                                                ("chimaps", "in4")])])  # [mask, total, local, chimap per method]
    for index, (output, method) in enumerate([("mask", None), ("total_field", None), ("local_field", None)]
                                             + [("chimap", method) for method in config.inversion]):
        select = pe.Node(niu.Select(index=index), name=f"select_{output}" + (f"_{method}" if method else ""),
                         run_without_submitting=True)
        workflow.connect([(all_outputs, select, [("out", "inlist")]),
                          (select, sink(output, method), [("out", "in_file")])])
    written = pe.Node(niu.Merge(len(sinks)), name="merge_written", run_without_submitting=True)
    for index, node in enumerate(sinks, start=1):
        workflow.connect(node, "out_file", written, f"in{index}")
    workflow.connect(written, "out", outputnode, "written")
    return workflow
