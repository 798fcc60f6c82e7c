"""Background field removal: V-SHARP, RESHARP and PDF. See docs/methods/bgremove.md.

Each method maps (total_field, mask, voxel_size_mm, ...) to (local_field,
mask_of_valid_voxels); fields are in any linear unit (the pipeline passes ppm).
"""

from .pdf import pdf
from .resharp import resharp
from .smv import smv_kernel
from .vsharp import vsharp

BGREMOVE_METHODS = {"vsharp": vsharp, "resharp": resharp, "pdf": pdf}
"""Background-removal functions by the name the pipeline and CLIs use."""

__all__ = ["BGREMOVE_METHODS", "pdf", "resharp", "smv_kernel", "vsharp"]
