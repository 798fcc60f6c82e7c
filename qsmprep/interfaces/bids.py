"""Writing BIDS derivatives: niworkflows' DerivativesDataSink with qsmprep's BIDS configuration."""

import os
import tempfile
from pathlib import Path

from niworkflows.interfaces.bids import DerivativesDataSink as _DerivativesDataSink

from ..bids.derivatives import load_bids_config

_CONFIG = load_bids_config()

STAGING_FOLDERS = set()
"""Hidden folders a DerivativesDataSink of this process is writing in, for a stopped run to remove
(``qsmprep.cli.run.remove_cut_short``)."""


class DerivativesDataSink(_DerivativesDataSink):
    """DerivativesDataSink that knows the ``Chimap``, ``MEGRE``, ``echo``, ``part`` and ``desc`` entities.

    Writes into the output directory itself (the BIDS-App output folder is
    the derivatives dataset) with the path pattern of
    ``qsmprep/data/bids_config.json``, which ``qsmprep.bids.derivatives``
    uses too, so written and documented names agree. Each file is written
    in a hidden folder inside the output directory and then renamed into
    place, so a run interrupted while it writes leaves no cut-short file.
    """

    out_path_base = ""
    _config_entities = frozenset(e["name"] for e in _CONFIG["entities"])
    _config_entities_dict = _CONFIG["entities"]
    _file_patterns = tuple(_CONFIG["default_path_patterns"])

    def _run_interface(self, runtime):
        final = Path(self.inputs.base_directory)
        final.mkdir(parents=True, exist_ok=True)
        # inside the output directory: one file system, so os.replace is an atomic rename
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=final) as staging:
            STAGING_FOLDERS.add(staging)
            try:
                self.inputs.base_directory = staging
                try:
                    runtime = super()._run_interface(runtime)
                finally:
                    self.inputs.base_directory = str(final)
                # the sidecar first: an image in place always has its sidecar
                if "out_meta" in self._results:
                    self._results["out_meta"] = _move_into(self._results["out_meta"], staging, final)
                self._results["out_file"] = [_move_into(path, staging, final) for path in self._results["out_file"]]
            finally:
                STAGING_FOLDERS.discard(staging)
        return runtime


def _move_into(path, staging, final):
    """Rename ``path``, written under ``staging``, to the same relative place under ``final``; the new path."""
    target = final / Path(path).relative_to(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return str(target)
