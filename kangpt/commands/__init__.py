"""The ``kangpt`` console script: ``kangpt COMMAND ...``, one subcommand per entry of :data:`COMMANDS`.

Every command is a module with ``HELP`` (one line), ``configure(parser)`` (its arguments) and
``run(args) -> exit code``, a thin layer over library calls. Commands depend on the library, never
the reverse: library code raises its own errors (``ConfigError``, ``DataError``,
``ModelFolderError``), and :func:`main` turns those, and a command's :class:`CommandError`, into one
``error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from ..data import DataError
from ..io.loading import ModelFolderError
from ..training.run_config import ConfigError
from . import compare, convert, generate, inspect, prepare, train
from .errors import CommandError

__all__ = ["COMMANDS", "CommandError", "main"]

COMMANDS = {"train": train, "prepare": prepare, "generate": generate, "inspect": inspect, "compare": compare,
            "convert": convert}

# Errors that are the user's input, told as one line (anything else is a bug and keeps its traceback).
USER_ERRORS = (CommandError, ConfigError, DataError, ModelFolderError)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen command and return its exit code."""
    parser = argparse.ArgumentParser(
        prog="kangpt", description="KAN-GPT-2: GPT-2 with Kolmogorov-Arnold blocks."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(subparser)
        subparser.set_defaults(run=module.run)
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and not hasattr(args, "overrides"):  # only train and prepare take --section.key=value overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args) or 0
    except USER_ERRORS as err:
        # One write: print's text and newline are two, which the processes of a launch interleave.
        sys.stderr.write(f"error: {err}\n")
        return 1
    except KeyboardInterrupt as err:  # one that says what it left (a token store's build) is told
        if err.args:
            sys.stderr.write(f"error: {err}\n")
        return 130
