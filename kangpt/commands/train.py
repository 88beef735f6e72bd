"""``kangpt train`` (and ``python train.py``): train KAN-GPT-2 as a YAML run config says."""

from __future__ import annotations

import argparse
import sys

from ..run_config import parse_args
from ..training import train

HELP = "train KAN-GPT-2 as CONFIG.yaml says, with --section.key=value overrides (as python train.py)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train KAN-GPT-2 as CONFIG.yaml says, with overrides such as --train.max_steps=100 "
        "--data.dataset=corpus/ --model.n_layer=6. Sections: model, data, train (see kangpt/run_config.py). "
        "Runs under `accelerate launch` and `torchrun` too."
    )
    parser.add_argument("config", nargs="?", help="run config (default: python train.py takes "
                        "configs/default.yaml, kangpt train every key at its default)")
    parser.add_argument("--default-config", help=argparse.SUPPRESS)  # train.py's configs/default.yaml
    parser.set_defaults(overrides=[])


def run(args: argparse.Namespace) -> int:
    """Train; 0 when done, 128 + the signal's number when stopped by SIGINT or SIGTERM."""
    argv = [args.config, *args.overrides] if args.config else args.overrides
    try:
        return train(parse_args(argv, default_config=args.default_config))
    except KeyboardInterrupt:
        print("error: interrupted; complete checkpoints already written are kept", file=sys.stderr)
        return 130
