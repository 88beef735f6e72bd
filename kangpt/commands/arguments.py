"""Argument helpers shared by the commands.

The checks run inside a command's ``run`` and raise :class:`CommandError`, so a bad value is told as
one ``error: ...`` line with exit code 1. (An argparse ``type=`` that raises makes argparse print its
usage and exit with code 2 instead.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import CommandError

_AT_LEAST = {0: "a non-negative integer", 1: "a positive integer"}


def option(name: str) -> str:
    """The command-line spelling of argument ``name``: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


def check_ints(args, minimum: int, *names: str) -> None:
    """Refuse (CommandError) the first of the integer arguments ``names`` below ``minimum``; one left
    unset (None) passes."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            kind = _AT_LEAST.get(minimum, f"an integer >= {minimum}")
            raise CommandError(f"{option(name)} must be {kind}, got {value}")


def check_float(args, name: str, ok: Callable[[float], bool] = lambda value: True,
                what: str = "a finite number") -> None:
    """Refuse (CommandError) float argument ``name`` when it is nan or infinite or ``ok`` rejects it;
    the message says it must be ``what``. (argparse's ``float`` reads 'nan' and 'inf' as numbers.)"""
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and ok(value)):
        raise CommandError(f"{option(name)} must be {what}, got {value}")


def default_device(device: str | None) -> str:
    """``--device``, or cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def usable_device(device: str | None) -> str:
    """:func:`default_device`, refused (CommandError) unless this torch can use it here: a CPU-only
    torch fails on ``cuda`` deep inside loading, with an ``AssertionError``."""
    device = default_device(device)
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        example = "e.g. cpu, cuda, cuda:1, mps"
        raise CommandError(f"--device {device!r} is not a torch device ({example})") from err
    if parsed.type == "cpu":
        return device
    count = _device_count(parsed.type)
    if count == 0 or (parsed.index or 0) >= count:
        found = f"{count} {parsed.type} device{'' if count == 1 else 's'}"
        raise CommandError(f"--device {device!r} is not available: torch finds {found} here")
    return device


def _device_count(kind: str) -> int:
    """How many ``kind`` devices (cuda, xpu, mps, ...) this torch can use; 0 for a kind with no
    backend module (meta, xla without its package)."""
    backend = getattr(torch, kind, None)
    if not callable(getattr(backend, "is_available", None)):
        backend = getattr(torch.backends, kind, None)  # mps answers there in older torch
    if not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        return 0
    count = getattr(backend, "device_count", None)
    return count() if callable(count) else 1


def holds_something(path: Path) -> bool:
    """Whether ``path`` is a file or a folder with something in it: what only ``--overwrite`` replaces."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def blocking_file(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a folder: what makes
    ``path.mkdir(parents=True)`` fail; None when the folder can be made."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_not_within(source: str, out: str) -> None:
    """Refuse (CommandError) an output folder ``out`` that is, contains or lies inside the local
    folder ``source``: writing it would replace or mix with the input. (A hub name passes.)"""
    src, dst = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.exists():
        return
    if dst == src:
        raise CommandError(f"the output {out!r} is the input {source!r}; write to another folder")
    if dst in src.parents:
        raise CommandError(f"the output {out!r} contains the input {source!r}; write to another folder")
    if src in dst.parents:
        raise CommandError(f"the output {out!r} lies inside the input {source!r}; write to another folder")
