"""Brain mask, total field (Hz) and background removal (local field, ppm) as Nipype interfaces."""

from pathlib import Path

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits, isdefined
from scipy import fft as spfft

from ..config import BGREMOVE_METHODS, MASK_STRATEGIES, UNWRAP_METHODS
from ..errors import DataError
from ..io import load_nifti, save_nifti
from ..physics import call_in_ras_order, ras_voxel_size, voxel_size_from_affine


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude")
    strategy = traits.Enum(*MASK_STRATEGIES, mandatory=True, desc="what is thresholded")
    parameters = traits.Dict(desc="keyword parameters of qsmprep.masking.brain_mask")
    phase_rad = File(exists=True, mandatory=True,
                     desc="4D phase in rad: steep-phase surface voxels are excluded; quality map")
    te_s = traits.List(traits.Float, mandatory=True, desc="echo times in s")


class _MaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="brain mask (uint8, 0/1)")


class BrainMask(SimpleInterface):
    """Brain mask from magnitude (``qsmprep.masking.brain_mask``) without the surface voxels whose
    phase is too steep to unwrap (``qsmprep.phase.steep_phase_voxels``); for strategy 'quality',
    the phase quality map is thresholded too."""

    input_spec = _BrainMaskInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        from ..masking import brain_mask
        from ..phase.quality import phase_quality_map, steep_phase_voxels

        magnitude, affine, header = load_nifti(self.inputs.magnitude, "magnitude image")
        phase = load_nifti(self.inputs.phase_rad, "phase image")[0]
        exclude = steep_phase_voxels(phase, list(self.inputs.te_s))
        quality = phase_quality_map(phase, magnitude, list(self.inputs.te_s)) if self.inputs.strategy == "quality" else None
        params = dict(self.inputs.parameters) if isdefined(self.inputs.parameters) else {}
        # in RAS+ order: with isotropic voxels the holes are then filled in axial slices, however the data are stored
        mask = call_in_ras_order(brain_mask, affine, magnitude, ras_voxel_size(affine), quality=quality,
                                 exclude=exclude, **params)
        out = Path(runtime.cwd) / "brain_mask.nii.gz"
        self._results["out_file"] = str(save_nifti(out, mask, affine, None, dtype=np.uint8))
        return runtime


class _UserMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the user's mask")
    reference = File(exists=True, mandatory=True, desc="an image on the grid the mask must match")


class UserMask(SimpleInterface):
    """A user-supplied mask, checked against the run's grid (``qsmprep.masking.check_mask``) and binarised."""

    input_spec = _UserMaskInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        from ..io import check_same_grid
        from ..masking import check_mask

        mask, affine, _ = load_nifti(self.inputs.in_file, "mask")
        ref, ref_affine, _ = load_nifti(self.inputs.reference, "reference image")
        check_same_grid(self.inputs.reference, (ref.shape, ref_affine), self.inputs.in_file, (mask.shape, affine),
                        labels=True)
        checked = check_mask(mask, ref.shape[:3], source=str(self.inputs.in_file))
        out = Path(runtime.cwd) / "brain_mask.nii.gz"
        self._results["out_file"] = str(save_nifti(out, checked, ref_affine, None, dtype=np.uint8))
        return runtime


class _TotalFieldInputSpec(BaseInterfaceInputSpec):
    phase_rad = File(exists=True, mandatory=True, desc="4D wrapped phase in rad")
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude (echo weights)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    te_s = traits.List(traits.Float, mandatory=True, desc="echo times in s")
    unwrap = traits.Enum(*UNWRAP_METHODS, usedefault=True, desc="spatial unwrapping method")
    num_threads = traits.Int(1, usedefault=True, desc="FFT worker threads (Laplacian unwrapping)")


class _TotalFieldOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="total field in Hz")


class TotalField(SimpleInterface):
    """Unwrap and combine echoes into the total field in Hz (``qsmprep.phase.combine.total_field_hz``)."""

    input_spec = _TotalFieldInputSpec
    output_spec = _TotalFieldOutputSpec

    def _run_interface(self, runtime):
        from ..phase.combine import total_field_hz

        phase, affine, header = load_nifti(self.inputs.phase_rad, "phase image")
        magnitude = load_nifti(self.inputs.magnitude, "magnitude image")[0]
        mask = load_nifti(self.inputs.mask, "mask")[0] > 0
        with spfft.set_workers(self.inputs.num_threads):
            field = total_field_hz(phase, list(self.inputs.te_s), magnitude=magnitude, mask=mask,
                                   voxel_size_mm=voxel_size_from_affine(affine), unwrap=self.inputs.unwrap)
        out = Path(runtime.cwd) / "total_field_hz.nii.gz"
        self._results["out_file"] = str(save_nifti(out, field, affine, None))
        return runtime


def smallest_sphere_mm(method, params, affine):
    """The radius (mm) of the smallest sphere V-SHARP (its ``radii_mm``, or the defaults for ``affine``'s voxels) or
    RESHARP (its ``radius_mm``) erodes the mask by, with ``params`` the method's keyword parameters as given."""
    from ..bgremove.vsharp import default_radii_mm
    from ..config import default_parameters

    if method == "vsharp":
        return min(params.get("radii_mm") or default_radii_mm(voxel_size_from_affine(affine)))
    return params.get("radius_mm", default_parameters("bgremove", method)["radius_mm"])


class _BackgroundRemovalInputSpec(BaseInterfaceInputSpec):
    total_field = File(exists=True, mandatory=True, desc="total field in Hz")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    method = traits.Enum(*BGREMOVE_METHODS, mandatory=True, desc="background removal method")
    parameters = traits.Dict(desc="keyword parameters of the method's library function")
    b0_tesla = traits.Float(mandatory=True, desc="field strength in T (Hz -> ppm)")
    b0_dir = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="B0 direction in voxel coordinates")
    num_threads = traits.Int(1, usedefault=True, desc="FFT worker threads")


class _BackgroundRemovalOutputSpec(TraitedSpec):
    local_field = File(exists=True, desc="local field in ppm")
    mask = File(exists=True, desc="mask where the local field is valid (eroded for SMV methods)")


class BackgroundRemoval(SimpleInterface):
    """Total field (Hz) -> local field (ppm) by V-SHARP, RESHARP or PDF (``qsmprep.bgremove``)."""

    input_spec = _BackgroundRemovalInputSpec
    output_spec = _BackgroundRemovalOutputSpec

    def _run_interface(self, runtime):
        from ..config import library_function
        from ..physics import hz_to_ppm

        field_hz, affine, _ = load_nifti(self.inputs.total_field, "total field")
        mask = load_nifti(self.inputs.mask, "mask")[0] > 0
        if not mask.any():  # nothing to invert: stop before the removal rather than write empty maps
            raise DataError("the brain mask is empty: check the magnitude images, or give a brain mask with --mask.")
        params = dict(self.inputs.parameters) if isdefined(self.inputs.parameters) else {}
        if self.inputs.method == "pdf":
            params["b0_dir"] = tuple(self.inputs.b0_dir)
        remove = library_function("bgremove", self.inputs.method)
        with spfft.set_workers(self.inputs.num_threads):
            local, valid = remove(hz_to_ppm(field_hz, self.inputs.b0_tesla), mask,
                                  voxel_size_from_affine(affine), **params)
        if not valid.any():  # eroded to nothing: stop here rather than write empty maps
            raise DataError(
                f"the brain mask ({int(mask.sum())} voxels) has no voxel left after {self.inputs.method}'s erosion "
                f"(its {smallest_sphere_mm(self.inputs.method, params, affine):g} mm sphere fits nowhere inside it): "
                f"give a smaller {'radii_mm' if self.inputs.method == 'vsharp' else 'radius_mm'} in a --parameters "
                f"file's [bgremove.{self.inputs.method}], a larger --mask, or --bgremove pdf, which does not erode.")
        cwd = Path(runtime.cwd)
        self._results["local_field"] = str(save_nifti(cwd / "local_field_ppm.nii.gz", local, affine))
        self._results["mask"] = str(save_nifti(cwd / "local_field_mask.nii.gz", valid, affine, dtype=np.uint8))
        return runtime
