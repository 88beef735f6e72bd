"""``kangpt train`` (and ``python train.py``): train KAN-GPT-2 as a YAML run config says."""

from __future__ import annotations

import argparse
import sys

from ..training.loop import train
from ..training.run_config import describe_keys, parse_args

HELP = "train KAN-GPT-2 as CONFIG.yaml says, with --section.key=value overrides (as python train.py)"


def configure(parser: argparse.ArgumentParser) -> None:
    # Raw: the epilog's key lines stay one per line (the description is broken into lines by hand).
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Train KAN-GPT-2 as CONFIG.yaml says, with overrides such as --train.max_steps=100\n"
        "--data.dataset=corpus/ --model.n_layer=6. Sections: model, data, train (see kangpt/run_config.py).\n"
        "Runs under `accelerate launch` and `torchrun` too."
    )
    parser.epilog = ("config keys and their defaults, which CONFIG and the overrides change:\n\n"
                     + describe_keys())
    parser.add_argument("config", nargs="?", help="run config (default: python train.py takes "
                        "configs/default.yaml, kangpt train every key at its default)")
    parser.add_argument("--default-config", help=argparse.SUPPRESS)  # train.py's configs/default.yaml
    parser.set_defaults(overrides=[])


def run(args: argparse.Namespace) -> int:
    """Train; 0 when done, 128 + the signal's number when stopped by SIGINT or SIGTERM."""
    argv = [args.config, *args.overrides] if args.config else args.overrides
    try:
        return train(parse_args(argv, default_config=args.default_config))
    except KeyboardInterrupt as err:  # before training (which stops on SIGINT itself), or a second Ctrl-C
        sys.stderr.write(f"error: {err or 'interrupted; complete checkpoints already written are kept'}\n")
        return 130
