"""Referencing a susceptibility map: the dipole kernel vanishes at k = 0, so chi's mean is not measured."""

import numpy as np


def reference_to_mask(chi_ppm, mask):
    """Susceptibility relative to its mean over ``mask``, the pipeline's documented reference
    (docs/methods/pipeline.md, Referencing). The whole-brain mean is one of the references the ISMRM
    consensus accepts, provided it is stated (QSM Consensus Organization Committee, Magn Reson Med 2024,
    doi:10.1002/mrm.30006).

    Parameters
    ----------
    chi_ppm : array (i, j, k)
        Susceptibility in ppm.
    mask : array (i, j, k)
        Reference region (non-zero = inside), also the region kept.

    Returns
    -------
    (referenced, mean_ppm): float32 array, chi - mean inside the mask and 0 outside, and the mean that was
    subtracted (float64 sum; 0 for an empty mask).
    """
    inside = np.asarray(mask) > 0
    chi = np.asarray(chi_ppm)
    mean_ppm = float(chi[inside].astype(np.float64).mean()) if inside.any() else 0.0
    return np.where(inside, chi - mean_ppm, 0.0).astype(np.float32, copy=False), mean_ppm
