"""qsmprep-train: train a deep dipole-inversion network from a recipe.

    qsmprep-train RECIPE --out DIR [--device auto|cpu|cuda] [--max-steps N]
                  [--max-minutes M] [--resume] [--target-domain DIR]
                  [--set SECTION.KEY=VALUE ...]
    qsmprep-train --list

RECIPE is a TOML file or the name of a shipped recipe (``--list`` shows them).
Writes checkpoint.safetensors (+ .json), best.safetensors, optimizer.safetensors,
losses.csv, validation.csv and losses.png to DIR; without --resume, a DIR holding any of
them is refused (exit 64).  Ctrl-C (SIGINT) or SIGTERM stops it with one line naming the
last checkpoint saved, exit 130 or 143.
"""

import argparse
import signal
import sys
from pathlib import Path

from qsmprep.cli.common import Stopped, finite_float, stopped_by_signals
from qsmprep.errors import UsageError


def build_parser():
    parser = argparse.ArgumentParser(
        prog="qsmprep-train",
        description="Train a deep QSM dipole-inversion network from a recipe (TOML file or shipped name).",
    )
    parser.add_argument("recipe", nargs="?", help="recipe TOML file or shipped recipe name (see --list)")
    parser.add_argument("--out", help="output directory for checkpoints and loss curves")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (CUDA when available)")
    parser.add_argument("--max-steps", type=int, help="stop at this step, at most the recipe's train.steps (default: those)")
    parser.add_argument("--max-minutes", type=finite_float, help="stop, after saving, once this much time has passed")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument(
        "--target-domain", metavar="DIR",
        help="QSMInvNet+ only: folder of <name>_field.nii[.gz] + <name>_mask.nii[.gz] local-field pairs (ppm) "
        "used as the unlabelled target domain instead of simulated data",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
        help="override one recipe entry, value in TOML syntax (e.g. --set train.batch_size=2 "
        "--set optim.lr=3e-4); may be repeated; recorded in the checkpoint's recipe",
    )
    parser.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    return parser


def stopped_message(signum, out):
    """The line for a run stopped by ``signum``: the checkpoint ``out`` holds, and how to go on."""
    from qsmprep.deep import read_metadata
    from qsmprep.errors import QSMPrepError

    name = signal.Signals(signum).name
    try:
        step = read_metadata(out / "checkpoint.safetensors")["step"]
    except QSMPrepError:  # none saved yet: the trainer removed what the run wrote
        return (f"stopped by {name} before the first checkpoint (saved every train.val_every steps), so nothing was "
                "kept: run the same command again to start afresh.")
    return (f"stopped by {name}; the last checkpoint in {out} is of step {step}: run the same command with --resume "
            "to continue from it.")


def run(args):
    """Execute parsed arguments; returns the exit code."""
    from qsmprep.deep.recipes import list_recipes

    if args.list:
        for name, description in list_recipes():
            sys.stdout.write(f"{name:10s} {description}\n")
        return 0
    if not args.recipe or not args.out:
        raise UsageError("give a RECIPE and --out DIR (or --list to see the shipped recipes).")
    try:
        with stopped_by_signals():
            result = train_from_args(args)
    except Stopped as exc:
        sys.stderr.write(f"qsmprep-train: {stopped_message(exc.signum, Path(args.out))}\n")
        return 128 + exc.signum
    metrics = result["validation"]
    sys.stdout.write(
        f"step {result['step']}: validation NRMSE {metrics.get('nrmse', float('nan')):.1f}%, "
        f"HFEN {metrics.get('hfen', float('nan')):.1f}%; checkpoint {result['checkpoint']}\n"
    )
    return 0


def train_from_args(args):
    """Check the options, load the recipe and train; returns ``qsmprep.deep.trainer.train``'s result."""
    from qsmprep.deep.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.target_domain:
        if "domain" not in recipe:
            raise UsageError(f"--target-domain needs a recipe with a [domain] section (qsminvnet); {args.recipe} has none.")
        recipe["domain"]["source"] = args.target_domain
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}.")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise UsageError(f"--max-minutes must be a positive number of minutes, got {args.max_minutes}.")
    from qsmprep.cli.common import check_output_folder, torch_on_all_cores
    from qsmprep.deep.trainer import train

    check_output_folder("--out", Path(args.out))  # a file or read-only location fails now, not after training steps

    torch_on_all_cores()

    return train(
        recipe, args.out, device=args.device, max_steps=args.max_steps, max_minutes=args.max_minutes, resume=args.resume
    )


def main(argv=None):
    from qsmprep.cli.common import run_cli

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
