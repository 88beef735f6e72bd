"""Folders written whole or not at all: a model folder, a checkpoint, a report, a cached tokenizer.

Everything is written under a temporary name beside the folder (``.tmp-<name>``) and renamed into
place when complete, so a reader finds the old folder or the new one, never a part; :func:`atomic_folder`
does it for one writer. A checkpoint that several processes write together uses the same steps
(:func:`temporary_name`, :func:`publish`) between barriers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(path: Path, *, shared: bool = False, last: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder to write ``path`` in; when the block ends it replaces ``path``
    (an older ``path`` is moved aside, then deleted); when the block raises it is deleted, and
    ``path`` stays as it was.

    The temporary folder is ``.tmp-<name>``, where a writer that died left its part (deleted first).
    With ``shared``, other processes may write and read the same (flat) ``path`` at once, a cache:
    each writer gets a temporary folder of its own, and over an existing ``path`` its files are
    moved in one by one (``last``, the file that marks a whole entry, at the end), so that a reader
    never finds ``path`` missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    else:
        tmp = temporary_name(path)
        remove(tmp)
        tmp.mkdir()
    try:
        yield tmp
        if shared:
            _move_in(tmp, path, last)
        else:
            publish(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def temporary_name(path: Path) -> Path:
    """The name under which ``path`` is written before it is renamed: ``.tmp-<name>``, never taken for it."""
    return path.with_name(f".tmp-{path.name}")


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an older ``path`` is moved aside, then deleted.

    Modes are first made what a plain ``open``/``mkdir`` gives under the umask (see :func:`_normalise_modes`).
    """
    _normalise_modes(tmp)
    old = path.with_name(f".old-{path.name}")
    remove(old)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    remove(old)


def _move_in(tmp: Path, path: Path, last: str | None) -> None:
    """Rename ``tmp`` to ``path``, or, where ``path`` exists (another writer's, or a damaged entry),
    replace its files by ``tmp``'s one by one, each atomically, ``last`` at the end."""
    _normalise_modes(tmp)
    try:
        os.rename(tmp, path)
        return
    except OSError:
        if not path.is_dir():
            raise
    for file in sorted(tmp.iterdir(), key=lambda file: file.name == last):
        os.replace(file, path / file.name)
    remove(tmp)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = temporary_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _normalise_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it mode 0666 (files) or 0777 (folders) less the umask.

    safetensors writes its files 0600, so ``model.safetensors`` would be the one file of a shared
    model folder that the group and others cannot read.
    """
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """The process's umask, from /proc where it is there: setting it to read it races with other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
