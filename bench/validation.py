"""Checkpoints scored on a larger held-out synthetic set than the trainer's.

    python bench/validation.py RECIPE --model NAME_OR_PATH [--model ...]
                               [--samples 64] [--seed 12345] [--set SECTION.KEY=VALUE ...]

The trainer validates on ``train.val_samples`` samples (8 in the shipped recipes),
too few to choose between checkpoints whose scores differ by a point or two: its
validation NRMSE moves by about 2 points between evaluations 100 steps apart.
This script draws ``--samples`` samples from RECIPE's ``[data]`` section (with the
``--set`` overrides, as ``qsmprep-train`` takes them) on a seed the trainer does
not use (its validation set is drawn from ``train.seed + 1,000,003``), and prints
each model's mean NRMSE and HFEN (%, demeaned in the mask; network alone, as the
trainer scores it) with the standard error of the NRMSE mean, and its NRMSE less the
first model's on the same samples (a paired difference, far less noisy than the
means, which vary by tens of points between samples). Plain Python, CPU.
"""

import argparse

import numpy as np

from qsmprep.deep.data import build_validation_set
from qsmprep.deep.recipes import load_recipe
from qsmprep.deep.registry import load_model
from qsmprep.deep.trainer import validation_scores
from qsmprep.errors import DataError


def per_sample_scores(model, samples):
    """NRMSE and HFEN (%) of each sample with structure in its mask, as two arrays."""
    rows = []
    for sample in samples:
        try:
            score = validation_scores(model, [sample])
        except DataError:  # no chi contrast in the mask: the trainer skips it too
            continue
        rows.append((score["nrmse"], score["hfen"]))
    return np.array(rows).T


def standard_error(values):
    """Standard error of the mean of ``values`` (0 for a constant array)."""
    return values.std(ddof=1) / np.sqrt(values.size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe name or TOML file whose [data] section makes the samples")
    parser.add_argument("--model", action="append", required=True, help="model name or checkpoint path, repeatable")
    parser.add_argument("--samples", type=int, default=64, help="number of held-out samples (default 64)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the held-out set (default 12345)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override, as qsmprep-train --set")
    args = parser.parse_args(argv)

    recipe = load_recipe(args.recipe, args.set)
    samples = build_validation_set(recipe["data"], args.samples, args.seed)
    print(f"{args.samples} samples of {args.recipe} [data], seed {args.seed}\n")
    print("| model | NRMSE % | (standard error) | HFEN % | NRMSE minus the first model's | (standard error) |")
    print("|---|---:|---:|---:|---:|---:|")
    first = None
    for name in args.model:
        model, _ = load_model(name)
        nrmse, hfen = per_sample_scores(model, samples)
        first = nrmse if first is None else first
        print(f"| {name} | {nrmse.mean():.2f} | {standard_error(nrmse):.2f} | {hfen.mean():.2f} "
              f"| {(nrmse - first).mean():+.2f} | {standard_error(nrmse - first):.2f} |")


if __name__ == "__main__":
    main()
