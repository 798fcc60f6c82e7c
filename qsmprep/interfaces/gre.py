"""Read GRE echoes: magnitude echoes into one 4D image, phase echoes into one 4D image in radians."""

from pathlib import Path

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from ..io import load_nifti, save_nifti


def load_echoes(files, what, convert=None):
    """Stack the echo images ``files`` (one 3D file per echo, or one 4D file) as (i, j, k, E), each file's data
    passed through ``convert(data, path)`` first if given (e.g. phase to radians); the first file's affine and
    header come with it."""
    volumes, affine, header = [], None, None
    for path in files:
        data, affine_i, header_i = load_nifti(path, what)
        if affine is None:
            affine, header = affine_i, header_i
        if convert is not None:
            data = convert(data, path)
        volumes.append(data if data.ndim == 4 else data[..., None])
    return np.concatenate(volumes, axis=-1), affine, header


class _StackEchoesInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, minlen=1, desc="magnitude echoes, ordered by echo time")


class _StackEchoesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="4D magnitude (i, j, k, echo)")


class StackEchoes(SimpleInterface):
    """Magnitude echo files -> one 4D float32 image (echoes along the 4th axis)."""

    input_spec = _StackEchoesInputSpec
    output_spec = _StackEchoesOutputSpec

    def _run_interface(self, runtime):
        data, affine, header = load_echoes(self.inputs.in_files, "magnitude image")
        out = Path(runtime.cwd) / "magnitude.nii.gz"
        self._results["out_file"] = str(save_nifti(out, data, affine, header))
        return runtime


class _PhaseToRadInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, minlen=1, desc="phase echoes, ordered by echo time")
    units = traits.Enum("rad", "arbitrary", mandatory=True, desc="BIDS Units of the phase images")
    invert = traits.Bool(False, usedefault=True, desc="negate the phase (data of the opposite polarity, "
                         "``qsmprep.phase.scaling.invert_phase``)")


class _PhaseToRadOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="4D wrapped phase in rad, [-pi, pi)")


class PhaseToRad(SimpleInterface):
    """Phase echo files -> one 4D image in radians (``qsmprep.phase.scaling.phase_to_rad``), negated with
    ``invert`` (``invert_phase``)."""

    input_spec = _PhaseToRadInputSpec
    output_spec = _PhaseToRadOutputSpec

    def _run_interface(self, runtime):
        from ..phase.scaling import invert_phase, phase_to_rad

        def to_rad(data, path):
            rad = phase_to_rad(data, self.inputs.units, source=str(path))
            return invert_phase(rad) if self.inputs.invert else rad

        data, affine, header = load_echoes(self.inputs.in_files, "phase image", to_rad)
        out = Path(runtime.cwd) / "phase_rad.nii.gz"
        self._results["out_file"] = str(save_nifti(out, data, affine, header))
        return runtime
