"""Background field removal: V-SHARP, RESHARP and PDF. See docs/methods/bgremove.md.

Each method maps (total_field, mask, voxel_size_mm, ...) to (local_field,
mask_of_valid_voxels); fields are in any linear unit (the pipeline passes ppm).
``qsmprep.config.library_function`` finds one by the name the pipeline uses.
"""

from .pdf import pdf
from .resharp import resharp
from .smv import smv_kernel
from .vsharp import vsharp

__all__ = ["pdf", "resharp", "smv_kernel", "vsharp"]
