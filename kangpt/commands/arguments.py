"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def positive_int(text: str) -> int:
    """``type=`` of an argument that must be a positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def default_device(device: str | None) -> str:
    """``--device``, or cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def holds_something(path: Path) -> bool:
    """Whether ``path`` is a file or a folder with something in it: what only ``--overwrite`` replaces."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))
