"""Thin Nipype interfaces around the qsmprep library: file I/O at the edges, one library call inside."""
