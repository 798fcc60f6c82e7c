"""qsmprep: quantitative susceptibility mapping of the brain as a BIDS-App."""

__version__ = "0.1.0"
