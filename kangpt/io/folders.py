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
def atomic_folder(path: Path, *, shared: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder to write ``path`` in; when the block ends it replaces ``path``
    (an older ``path`` is moved aside, then deleted); when the block raises it is deleted, and
    ``path`` stays as it was.

    The temporary folder is ``.tmp-<name>``, where a writer that died left its part (deleted first).
    With ``shared``, other processes may write the same ``path`` at once (a cache): each gets a
    temporary folder of its own, and when another one's folder took the name first, it stays.
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
        publish(tmp, path, shared=shared)
    except BaseException:
        remove(tmp)
        raise


def temporary_name(path: Path) -> Path:
    """The name under which ``path`` is written before it is renamed: ``.tmp-<name>``, never taken for it."""
    return path.with_name(f".tmp-{path.name}")


def publish(tmp: Path, path: Path, *, shared: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an older ``path`` is moved aside, then deleted.

    Modes are first made what a plain ``open``/``mkdir`` gives under the umask (see :func:`_normalise_modes`).
    With ``shared`` (see :func:`atomic_folder`), a ``path`` another writer renamed into place in the
    meantime is kept and ``tmp`` deleted.
    """
    _normalise_modes(tmp)
    old = tmp.with_name(".old-" + tmp.name.removeprefix(".tmp-"))
    remove(old)
    try:
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
    except OSError:
        if not (shared and path.is_dir()):
            raise
        remove(tmp)
    remove(old)


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
