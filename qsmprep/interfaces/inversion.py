"""Dipole inversion, referencing, and B0-aligned resampling as Nipype interfaces."""

import logging
from pathlib import Path

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits
from scipy import fft as spfft

from ..config import HIGH_PASS_PARAMETERS, INVERSION_METHODS, inversion_high_pass_mm
from ..inversion.reference import reference_to_mask
from ..io import load_nifti, save_nifti
from ..physics import invert_in_ras_order, voxel_size_from_affine

log = logging.getLogger(__name__)


class _DipoleInversionInputSpec(BaseInterfaceInputSpec):
    local_field = File(exists=True, mandatory=True, desc="local field in ppm")
    mask = File(exists=True, mandatory=True, desc="mask where the local field is valid")
    method = traits.Enum(*INVERSION_METHODS, mandatory=True, desc="inversion method")
    parameters = traits.Dict(desc="keyword parameters of the method's library function")
    b0_dir = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="B0 direction in voxel coordinates")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, desc="torch device (deep inversion only)")
    model_file = File(exists=True, desc="deep: the model checkpoint, overriding parameters['model']; a file input "
                      "so that a changed checkpoint (retrained, or a new qsmprep's weights) re-runs the node")
    num_threads = traits.Int(1, usedefault=True, desc="FFT (and torch) worker threads")


class _DipoleInversionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="susceptibility in ppm (not yet referenced)")
    inference_device = traits.Dict(desc="deep only: where the network ran (``qsmprep.inversion.deep.inference_device``)")
    fitted_parameters = traits.Dict(desc="parameters set as the node ran: the high-pass radius used (``fitted_high_pass``)")


class DipoleInversion(SimpleInterface):
    """Local field (ppm) -> susceptibility (ppm) by TKD, closed-form L2, iLSQR or the deep network.

    Calls the library function named in ``qsmprep.config.LIBRARY_FUNCTIONS``
    (``qsmprep.inversion.<method>``; ``deep`` is ``qsmprep.inversion.deep.deep_invert``), with a high-pass radius
    that fits the mask (``fitted_high_pass``).
    """

    input_spec = _DipoleInversionInputSpec
    output_spec = _DipoleInversionOutputSpec

    def _run_interface(self, runtime):
        from ..config import library_function

        field, affine, _ = load_nifti(self.inputs.local_field, "local field")
        mask = load_nifti(self.inputs.mask, "mask")[0] > 0
        params = dict(self.inputs.parameters) if isdefined(self.inputs.parameters) else {}
        with spfft.set_workers(self.inputs.num_threads):
            self._results["fitted_parameters"] = fitted_high_pass(self.inputs.method, params, mask,
                                                                   voxel_size_from_affine(affine))
        if self.inputs.method == "deep":
            import torch

            from ..inversion.deep import inference_device
            from ..physics import resolve_device

            torch.set_num_threads(self.inputs.num_threads)
            device = resolve_device(self.inputs.device)  # "auto" is settled here, on the machine that runs the node
            params["device"] = device
            self._results["inference_device"] = inference_device(device)
            if isdefined(self.inputs.model_file):
                params["model"] = self.inputs.model_file
        invert = library_function("inversion", self.inputs.method)
        with spfft.set_workers(self.inputs.num_threads):
            chi = invert_in_ras_order(invert, field, mask, affine, tuple(self.inputs.b0_dir), **params)
        out = Path(runtime.cwd) / f"chi_{self.inputs.method}_ppm.nii.gz"
        self._results["out_file"] = str(save_nifti(out, chi, affine))
        return runtime


def fitted_high_pass(method, params, mask, voxel_size_mm):
    """Set ``params``' high-pass radius (``HIGH_PASS_PARAMETERS``; in place) to the largest, at most the one given,
    whose sphere fits in ``mask`` (``largest_fitting_radius``), warning when it is smaller; return {parameter:
    radius}, for the Chimap sidecar's EstimationParameters, or {} where ``method`` has no high-pass on (deep with
    ``refine_iters`` 0 has none)."""
    from ..bgremove.smv import largest_fitting_radius

    radius = inversion_high_pass_mm(method, params)
    if not radius:
        return {}
    key = HIGH_PASS_PARAMETERS[method]
    fitted = largest_fitting_radius(mask, voxel_size_mm, radius)
    if fitted < radius:
        log.warning("%s: the %g mm high-pass sphere fits nowhere inside the brain mask (a thin slab?): %s", method,
                    radius, f"using {fitted:g} mm, the largest that fits" if fitted else
                    "comparing the fields without a high-pass (no sphere of two voxels fits either)")
    params[key] = fitted
    return {key: fitted}


class _ReferenceToMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="susceptibility in ppm")
    mask = File(exists=True, mandatory=True, desc="reference region (the brain mask)")


class _ReferenceToMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="susceptibility in ppm relative to the mean in the mask; 0 outside")
    mean_ppm = traits.Float(desc="the mean that was subtracted, in ppm")


class ReferenceToMask(SimpleInterface):
    """Reference susceptibility to its mean in the mask (``qsmprep.inversion.reference_to_mask``)."""

    input_spec = _ReferenceToMaskInputSpec
    output_spec = _ReferenceToMaskOutputSpec

    def _run_interface(self, runtime):
        chi, affine, _ = load_nifti(self.inputs.in_file, "susceptibility map")
        referenced, mean = reference_to_mask(chi, load_nifti(self.inputs.mask, "mask")[0] > 0)
        out = Path(runtime.cwd) / "chi_referenced_ppm.nii.gz"
        self._results["out_file"] = str(save_nifti(out, referenced, affine))
        self._results["mean_ppm"] = mean
        return runtime


class _ToB0AlignedInputSpec(BaseInterfaceInputSpec):
    local_field = File(exists=True, mandatory=True, desc="local field in ppm, native grid")
    mask = File(exists=True, mandatory=True, desc="mask, native grid")


class _ToB0AlignedOutputSpec(TraitedSpec):
    local_field = File(exists=True, desc="local field on the B0-aligned grid")
    mask = File(exists=True, desc="mask on the B0-aligned grid (linear weight > 0.5)")


class ToB0Aligned(SimpleInterface):
    """Resample local field and mask onto a grid whose third axis is B0 (``qsmprep.physics.resample``)."""

    input_spec = _ToB0AlignedInputSpec
    output_spec = _ToB0AlignedOutputSpec

    def _run_interface(self, runtime):
        from ..physics.resample import field_and_mask_to_b0_aligned

        field, affine, _ = load_nifti(self.inputs.local_field, "local field")
        mask = load_nifti(self.inputs.mask, "mask")[0]
        field_aligned, inside, aligned_affine = field_and_mask_to_b0_aligned(field, mask, affine)
        cwd = Path(runtime.cwd)
        self._results["local_field"] = str(save_nifti(cwd / "local_field_b0.nii.gz", field_aligned, aligned_affine))
        self._results["mask"] = str(save_nifti(cwd / "mask_b0.nii.gz", inside, aligned_affine, dtype=np.uint8))
        return runtime


class _FromB0AlignedInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="an image on the B0-aligned grid")
    reference = File(exists=True, mandatory=True, desc="an image on the native grid")


class _FromB0AlignedOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image on the native grid")


class FromB0Aligned(SimpleInterface):
    """Resample an image from the B0-aligned grid back onto the native grid (linear)."""

    input_spec = _FromB0AlignedInputSpec
    output_spec = _FromB0AlignedOutputSpec

    def _run_interface(self, runtime):
        from ..physics.resample import from_b0_aligned

        data, aligned_affine, _ = load_nifti(self.inputs.in_file, "B0-aligned image")
        ref, native_affine, _ = load_nifti(self.inputs.reference, "native reference image")
        native = from_b0_aligned(data, aligned_affine, ref.shape[:3], native_affine)
        out = Path(runtime.cwd) / "native.nii.gz"
        self._results["out_file"] = str(save_nifti(out, native, native_affine))
        return runtime
