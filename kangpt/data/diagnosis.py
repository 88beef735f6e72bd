"""Diagnosing broken local corpus files and folders, named in a one-line ``DataError``.

`datasets` reports a broken file as a long traceback that names neither the file nor the line.
Rather than validate every file up front (a full extra read of the corpus, and of a stream that may
never be read to its end), the errors are caught where they surface, in the shard of one file
(:mod:`.documents`), and only then is that file scanned for the culprit; the happy path pays nothing.
A file that cannot be opened (a symbolic-link loop, a link to nothing), a ``.txt`` file that is not
UTF-8, a ``.jsonl`` line that is not a UTF-8 JSON object or an unreadable ``.parquet`` file is named
with the byte offset or line number. Checked before any file is read: dead links are kept as corpus
files (so that reading them refuses them by name), and a kangpt run folder or model folder given as a
corpus is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..messages import first_line
from .errors import DataError

# What reading a broken local file raises: a failed map-style build (wrapping the cause), a UTF-8 error
# (JSON strings are only decoded when the text is first read), a pyarrow parse/schema error or an OSError
# (a file that cannot be opened: a link loop, a link to nothing).
_READ_ERRORS = (DatasetGenerationError, UnicodeDecodeError, pa.ArrowException, OSError)
# The file kangpt writes into every run folder (run_dir.RUN_FILE; not imported: run_dir pulls in the model).
_RUN_FILE = "run.yaml"


def _is_file(path) -> bool:
    """Whether ``path`` is a corpus file: a regular file, or a link that leads nowhere (a loop, a missing
    target), kept so that reading it refuses it by name rather than losing a document without a word."""
    return os.path.isfile(path) or (os.path.lexists(path) and not os.path.exists(path))


def _kangpt_folder(path: str) -> str | None:
    """What ``path`` is when it is a folder kangpt writes (a run folder, a model folder), else ``None``."""
    folder = Path(path)
    if (folder / _RUN_FILE).is_file():
        return f"a kangpt run folder (it holds {_RUN_FILE})"
    weights = [name for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) if (folder / name).is_file()]
    if (folder / CONFIG_NAME).is_file() and weights:
        return f"a model folder (it holds {CONFIG_NAME} and {weights[0]})"
    return None


@contextlib.contextmanager
def _builder_errors_unlogged():
    """Keep the file readers of ``datasets`` (``datasets.packaged_modules``) from logging a file they
    fail on: the error they raise becomes a ``DataError`` that names the file and the line itself, and
    a one-line error stays one line."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _corpus_error(builder: str, files: list[str], err: BaseException) -> DataError:
    """The ``DataError`` for ``err``, raised while reading ``files``: names the first broken file and why."""
    for file in files:
        problem = _open_problem(file) or _FILE_PROBLEMS[builder](file)
        if problem:
            return DataError(f"{_display(file)} {problem}")
    while err.__cause__ is not None:  # DatasetGenerationError wraps the informative error
        err = err.__cause__
    where = _display(files[0]) if len(files) == 1 else f"the {len(files)} corpus files"
    return DataError(f"cannot read {where}: {first_line(err)}")


def _open_problem(path: str) -> str | None:
    """Why ``path`` cannot be opened at all (a link loop, a link to nothing, no permission), or ``None``."""
    try:
        with open(path, "rb"):
            return None
    except OSError as err:
        return f"cannot be read ({err.strerror}); fix it or remove it from the corpus"


def _text_problem(path: str) -> str | None:
    """Why ``path`` is not a UTF-8 text document, or ``None``."""
    data = Path(path).read_bytes()  # the text builder holds a whole document in memory anyway
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return (f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                "convert it to UTF-8 or remove it from the corpus")
    return None


def _json_problem(path: str) -> str | None:
    """Why ``path`` is not a JSON-lines file of objects (naming the first bad line), or ``None``."""
    offset = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            problem = _json_line_problem(line, offset)
            if problem:
                # `datasets` also reads a file holding one JSON array of objects: that is no problem.
                return None if _is_json_array(path) else f"line {number} {problem}"
            offset += len(line)
    return None


def _json_line_problem(line: bytes, offset: int) -> str | None:
    """Why one JSON line (starting at byte ``offset`` of its file) is no JSON object, or ``None``."""
    try:
        row = json.loads(line.decode("utf-8")) if line.strip() else {}  # blank lines are skipped
    except UnicodeDecodeError as err:
        return (f"is not UTF-8 (byte 0x{line[err.start]:02x} at offset {offset + err.start}); "
                "convert the file to UTF-8 or remove it from the corpus")
    except json.JSONDecodeError as err:
        return f"is not valid JSON ({err.msg} at column {err.colno}); fix or remove that line"
    if not isinstance(row, dict):
        return "is not a JSON object; write one object per line, such as {\"text\": \"...\"}"
    return None


def _is_json_array(path: str) -> bool:
    """Whether the whole file ``path`` is one JSON array of objects."""
    try:
        document = json.loads(Path(path).read_bytes())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return isinstance(document, list) and all(isinstance(row, dict) for row in document)


def _parquet_problem(path: str) -> str | None:
    """Why ``path`` is not a readable Parquet file (judged by its footer), or ``None``."""
    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError) as err:
        return f"is not a readable Parquet file ({first_line(err)}); rewrite it or remove it from the corpus"
    return None


_FILE_PROBLEMS = {"text": _text_problem, "json": _json_problem, "parquet": _parquet_problem}


def _display(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, as a user would write it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
