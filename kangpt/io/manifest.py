"""Manifests: the size and sha256 of every file of a folder, written last, so that a folder whose files
all match its manifest is known to be whole and unchanged (a checkpoint, a token store)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .folders import write_text_atomically

MANIFEST = "manifest.json"  # {"files": {relative path: {"size": n, "sha256": hex}}}


def write_manifest(folder: Path) -> None:
    """Write ``folder/manifest.json``: size and sha256 of every other file in it (call it last)."""
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST]
    files = {path.relative_to(folder).as_posix(): {"size": path.stat().st_size,
                                                   "sha256": sha256_of_file(path)} for path in paths}
    write_text_atomically(folder / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not whole (no manifest, or a file missing or changed), or None."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return f"it has no {MANIFEST}, so it was never completed"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for name, (size, _) in expected.items():  # sizes first: cheap, and what truncation changes
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {size}"
    for name, (_, digest) in expected.items():
        if sha256_of_file(folder / name) != digest:
            return f"{name} differs from its manifest (sha256)"
    return None


def sha256_of_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB pieces."""
    with path.open("rb") as f:
        digest = hashlib.sha256()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
