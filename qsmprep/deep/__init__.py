"""Deep dipole inversion: training data, augmentation, losses, models, training.

Submodules are imported explicitly (``from qsmprep.deep import losses``) so
that importing this package stays cheap and does not pull in PyTorch.
"""
