"""Simulation: numerical head phantom, multi-echo GRE forward model, BIDS writer."""

from .bids_writer import write_bids_dataset
from .gre import SimulatedGRE, acquire, phase_to_vendor_units, simulate_gre, slab_affine
from .phantom import BRAIN_LABELS, CHI_PPM, DEEP_GREY_LABELS, LABELS, HeadPhantom, head_phantom

__all__ = [
    "BRAIN_LABELS",
    "CHI_PPM",
    "DEEP_GREY_LABELS",
    "LABELS",
    "HeadPhantom",
    "SimulatedGRE",
    "acquire",
    "head_phantom",
    "phase_to_vendor_units",
    "simulate_gre",
    "slab_affine",
    "write_bids_dataset",
]
