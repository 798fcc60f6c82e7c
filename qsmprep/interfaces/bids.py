"""Writing BIDS derivatives: niworkflows' DerivativesDataSink with qsmprep's BIDS configuration."""

from niworkflows.interfaces.bids import DerivativesDataSink as _DerivativesDataSink

from ..bids.derivatives import load_bids_config

_CONFIG = load_bids_config()


class DerivativesDataSink(_DerivativesDataSink):
    """DerivativesDataSink that knows the ``Chimap``, ``MEGRE``, ``echo``, ``part`` and ``desc`` entities.

    Writes into the output directory itself (the BIDS-App output folder is
    the derivatives dataset) with the path pattern of
    ``qsmprep/data/bids_config.json``, which ``qsmprep.bids.derivatives``
    uses too, so written and documented names agree.
    """

    out_path_base = ""
    _config_entities = frozenset(e["name"] for e in _CONFIG["entities"])
    _config_entities_dict = _CONFIG["entities"]
    _file_patterns = tuple(_CONFIG["default_path_patterns"])
