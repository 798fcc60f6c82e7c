"""Console scripts: qsmprep (the BIDS-App), qsmprep-invert, qsmprep-simulate, qsmprep-eval, qsmprep-train."""
