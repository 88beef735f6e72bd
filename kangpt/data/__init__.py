"""Text corpora, tokenizers and packed token blocks for causal language-model training.

The pipeline is::

    train_docs, val_docs = load_documents("stdlib")           # or local files, or a hub dataset
    splits = load_splits("pydoc-topics", test_fraction=0.1)  # train / validation / test
    tokenizer = load_tokenizer("bpe", train_docs, vocab_size=4096)
    train = pack_documents(train_docs, tokenizer, block_size=256)   # column "input_ids"
    val = pack_documents(val_docs, tokenizer, block_size=256)
    baseline = unigram_entropy(train, val, len(tokenizer))   # nats/token the model must beat

Documents are datasets with one ``"text"`` column. Packing tokenizes every document without
special tokens, appends the EOS token, concatenates everything in order and cuts the stream into
blocks of exactly ``block_size`` tokens (dropping the remainder). Labels are not shifted: Hugging
Face causal-LM models shift them internally, so pass ``labels=input_ids``.

Two corpora exist on every machine, so the whole pipeline runs offline: ``"stdlib"``, the Python
standard library's own source code (less its generated data tables, the default), and
``"pydoc-topics"``, English prose: the documentation topics CPython ships for ``help()``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetGenerationError
from datasets.table import InMemoryTable
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..messages import first_line

__all__ = [
    "DataError",
    "load_documents",
    "load_splits",
    "pydoc_topics_documents",
    "corpus_files",
    "is_local_source",
    "load_tokenizer",
    "pack_documents",
    "stdlib_documents",
    "stream_blocks",
    "unigram_entropy",
]

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"
# Local file suffix -> `datasets` packaged builder.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that are not library source.
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
# Generated data rather than code (see stdlib_documents): a file whose first lines carry this mark ...
_GENERATED_MARK = re.compile(r"\b(?:auto-?generated|automatically generated|do not edit)\b", re.IGNORECASE)
_GENERATED_MARK_LINES = 5
# ... or a table: at least _TABLE_MIN_LINES lines of code, and at least _TABLE_FRACTION of them table
# entries, lines of nothing but string and number literals (masked as "0") and _TABLE_PUNCTUATION.
_TABLE_MIN_LINES, _TABLE_FRACTION = 50, 0.8
_STRING_LITERAL = re.compile(r"""(?<!\w)[rRbBuU]{0,2}(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")""")
_NUMBER_LITERAL = re.compile(r"\b(?:0[xob][0-9a-f_]+|\d[\d_]*(?:\.\d*)?(?:e[-+]?\d+)?j?)\b", re.IGNORECASE)
_TABLE_PUNCTUATION = " \t0,:()[]{}+-"
# The corpora built into kangpt: name -> function returning the documents.
BUILTIN_CORPORA = ("stdlib", "pydoc-topics")
# Everything that determines the trained BPE besides its texts and vocabulary size (part of the cache key).
_BPE_SETTINGS = {"format": 1, "model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
                 "special_tokens": [EOT], "min_frequency": 2, "padding_side": "left"}
# A byte-level BPE holds the 256 bytes and EOT before its first merge. One rule, which run_config also
# checks when a run config is read, before any data is loaded.
MIN_BPE_VOCAB_SIZE = 257
BPE_VOCAB_SIZE_RULE = f"must be at least {MIN_BPE_VOCAB_SIZE} (256 bytes + {EOT})"
_BATCH_DOCS = 1000  # documents per tokenization batch
# What reading a broken local file raises: a failed map-style build (wrapping the cause), a UTF-8 error
# (JSON strings are only decoded when the text is first read), a pyarrow parse/schema error or an OSError
# (a file that cannot be opened: a link loop, a link to nothing).
_READ_ERRORS = (DatasetGenerationError, UnicodeDecodeError, pa.ArrowException, OSError)
# The file kangpt writes into every run folder (run_dir.RUN_FILE; not imported: run_dir pulls in the model).
_RUN_FILE = "run.yaml"


class DataError(ValueError):
    """Bad input to the data pipeline (missing file, unknown field, empty corpus, bad argument)."""


# ---------------------------------------------------------------------------------------------
# Documents


def stdlib_documents() -> list[str]:
    """Return the running interpreter's standard-library ``.py`` sources, one string per file.

    Files are sorted by path relative to ``sysconfig.get_paths()["stdlib"]``. Left out are
    site-packages, test suites (any ``test``/``tests``/``idle_test`` folder), empty files, files that
    are not valid UTF-8, exact duplicates of an earlier file (so no text is in both training and
    validation), and generated data, which is no code a reader would write and which a small model
    learns to reproduce (codec tables) instead of Python:

    * files whose first 5 lines say "auto-generated", "automatically generated" or "do not edit", as
      CPython's generated modules do (in 3.11: ``pydoc_data/topics.py``, ``re/_casefix.py``,
      ``stringprep.py``, ``keyword.py`` and ``token.py``);
    * tables: files with at least 50 lines of code of which at least 80% are table entries, lines
      holding nothing but string and number literals, commas, colons, brackets and signs (comments
      aside; the text lines of a multi-line string count as code). In 3.11 these are the charmap
      codecs in ``encodings/`` generated by gencodec, ``encodings/aliases.py``,
      ``html/entities.py``, ``_compat_pickle.py``, ``_sysconfigdata_*.py`` and ``pydoc_data/topics.py``.

    Codec code (``encodings/idna.py``, ``punycode.py``, ``utf_8.py``, ...) and modules whose tables sit
    among real code (``locale.py``, ``opcode.py``) stay. The rule reads only the files' text, so the
    result is deterministic for a given Python installation.
    """
    return list(_stdlib_documents())


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP]
        paths += [Path(folder, f) for f in files if f.endswith(".py")]
    docs: dict[str, None] = {}  # insertion-ordered set
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and not _is_generated_data(text):
            docs.setdefault(text)
    return tuple(docs)


def pydoc_topics_documents() -> list[str]:
    """Return English prose that ships with every CPython: the documentation topics of ``help()``.

    ``pydoc_data.topics`` holds the Python Language Reference sections that ``help("if")`` shows
    (about 460,000 characters in 3.11). Each topic is cut into paragraphs at blank lines, and every
    paragraph is one document (in topic order), so a held-out split samples the whole text instead
    of a few whole topics. Headings and the indented grammar and code blocks stay, as paragraphs.
    """
    from pydoc_data.topics import topics

    return [p.strip("\n") for text in topics.values() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _is_generated_data(source: str) -> bool:
    """Whether Python ``source`` is generated data, not code, by the rule of :func:`stdlib_documents`."""
    if _GENERATED_MARK.search("\n".join(source.splitlines()[:_GENERATED_MARK_LINES])):
        return True
    table, code = _count_table_lines(source)
    return table >= _TABLE_MIN_LINES and table >= _TABLE_FRACTION * (table + code)


def _count_table_lines(source: str) -> tuple[int, int]:
    """Count ``(table entries, other lines of code)`` in ``source``; blank and comment lines are neither.

    A table entry is a line such as ``    0x00e9: 'LATIN SMALL LETTER E WITH ACUTE',  # comment``.
    Regular expressions over the whole text rather than ``tokenize`` (pure Python before 3.12),
    since the rule runs over the whole standard library each time the corpus is built.
    """
    # Literals first: a "#" inside a string is then no longer taken for the start of a comment.
    masked = _NUMBER_LITERAL.sub("0", _STRING_LITERAL.sub("0", source))
    table = code = 0
    for line in masked.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and "0" in line and not line.strip(_TABLE_PUNCTUATION):
            table += 1
        elif line:
            code += 1
    return table, code


def load_documents(
    dataset: str = "stdlib",
    *,
    name: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    streaming: bool = False,
    max_documents: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset]:
    """Load a corpus and return ``(train, validation)`` datasets with a single ``"text"`` column.

    :func:`load_splits` without a test split; see it for every argument.
    """
    splits = load_splits(dataset, name=name, text_field=text_field, val_fraction=val_fraction,
                         streaming=streaming, max_documents=max_documents, rank=rank, world_size=world_size)
    return splits["train"], splits["validation"]


def load_splits(
    dataset: str = "stdlib",
    *,
    name: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    test_fraction: float = 0.0,
    validation_dataset: str | None = None,
    test_dataset: str | None = None,
    streaming: bool = False,
    max_documents: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Dataset | IterableDataset]:
    """Load a corpus: ``{"train": ..., "validation": ...}``, plus ``"test"`` when one is asked for.

    Every split is a dataset with a single ``"text"`` column. ``dataset`` is ``"stdlib"`` (see
    :func:`stdlib_documents`; write ``./stdlib`` for a local folder of that name), ``"pydoc-topics"``
    (English prose, see :func:`pydoc_topics_documents`); a local file, folder (searched
    recursively) or glob of ``.txt`` files (one document per file, universal newlines),
    ``.jsonl``/``.json`` files (JSON lines, one document per line) or ``.parquet`` files (one document
    per row), the text taken from ``text_field``; or a Hugging Face hub dataset name with optional
    config ``name``. Documents whose text is missing, null, not a string or blank are dropped (for
    map-style datasets with a logged warning giving their count) and at most ``max_documents`` are
    read from each split of the source. A ``text_field`` other than ``"text"`` is refused where no
    source has fields (only ``.txt`` files or a built-in corpus), and so is a kangpt run folder or a
    model folder given as local files, before any of its files is read.

    Broken local files are refused, not skipped, since skipping would silently lose user data: a
    file that cannot be opened (a symbolic-link loop, a link to nothing), a ``.txt`` file that is not
    UTF-8 (binary, or another encoding such as latin-1), a ``.jsonl`` line that is not UTF-8, not JSON
    or not an object, or an unreadable ``.parquet`` file raises a ``DataError`` naming the file and the
    byte offset or line number, to be fixed or removed from the corpus. With ``streaming=True`` such an
    error may only surface when the stream reaches that file.

    Validation: the local files ``validation_dataset`` when given, else the source's own
    ``"validation"`` split, else (when no test split is asked for) its ``"test"`` split; otherwise
    documents ``0, k, 2k, ...`` with ``k = round(1 / val_fraction)`` are held out, so the split is
    deterministic, in corpus order and spread over the whole corpus. A test split is asked for by
    ``test_dataset`` (local files) or ``test_fraction > 0``: it is those files, else the source's own
    ``"test"`` split, else documents ``r, r + k', r + 2k', ...`` (``k' = round(1 / test_fraction)``,
    ``r = k' // 2``) held out of training, leaving out any that validation holds.

    With ``streaming=True`` the results are ``IterableDataset`` streams and are sharded across
    ``world_size`` ranks with ``datasets.distributed.split_dataset_by_node`` (validation too, so
    evaluation losses must be averaged across ranks). Map-style results are not sharded: the
    distributed sampler of the training loop does that.
    """
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    if not 0 <= test_fraction <= 0.5:
        raise DataError(f"test_fraction must be in [0, 0.5], got {test_fraction!r}")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be a positive integer or None, got {max_documents!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    want_test = test_dataset is not None or test_fraction > 0
    # Every source is resolved, and refused if bad, before any is read.
    local = _local_source(dataset, name)
    own_files = {split: (spec, _own_split_files(spec)) for split, spec in
                 (("validation", validation_dataset), ("test", test_dataset)) if spec is not None}
    _check_text_field(text_field, dataset, [local, *(files for _, files in own_files.values())])
    splits = _load_source(dataset, name, local, text_field, streaming, max_documents)
    given = {split: _load_source(spec, None, files, text_field, streaming, max_documents)["train"]
             for split, (spec, files) in own_files.items()}
    own = {"validation": given.get("validation", splits.get("validation"))}
    if "test" in given:
        own["test"] = given["test"]
    elif want_test or own["validation"] is None:
        own["test"] = splits.get("test")
    if not want_test and own["validation"] is None:  # the source's test split serves as validation
        own["validation"], own["test"] = own["test"], None
    result = {"train": splits["train"]}
    held = {split: k for split, k in (("validation", round(1 / val_fraction)),
                                      ("test", round(1 / test_fraction) if test_fraction else 0))
            if own.get(split) is None and k and (split == "validation" or want_test)}
    result.update(_hold_out(splits["train"], held, dataset) if held else {})
    result.update({split: ds for split, ds in own.items() if ds is not None})
    if streaming:
        result = {split: split_dataset_by_node(docs, rank=rank, world_size=world_size)
                  for split, docs in result.items()}
    return result


def _check_text_field(text_field: str, dataset: str, local: list[tuple[str, list[str]] | None]) -> None:
    """Refuse a ``text_field`` that no source reads; ``local`` holds the :func:`_local_source` of ``dataset``
    and of the local split files.

    ``.txt`` files and the built-in corpora hold plain documents, with no fields to choose from; a
    setting ignored without a word would hide a mistaken corpus or field. The default is never refused.
    """
    hub = local[0] is None and dataset not in BUILTIN_CORPORA
    if text_field == "text" or hub or any(files is not None and files[0] != "text" for files in local):
        return
    what = (f"the built-in corpus {dataset!r}" if dataset in BUILTIN_CORPORA
            else f".txt files, one document per file ({dataset!r})")
    records = "/".join(suffix for suffix, builder in _BUILDERS.items() if builder != "text")
    raise DataError(f"text_field={text_field!r} does not apply to {what}; it names the text column of "
                    f"{records} records and hub datasets")


def _own_split_files(files: str) -> tuple[str, list[str]]:
    """``(builder, files)`` of the local ``files`` (a file, folder or glob) that make one whole split."""
    local = _local_source(files, None)
    if local is None:
        raise DataError(f"{files!r} is not a local file, folder or glob")
    return local


def _load_source(dataset: str, name: str | None, local: tuple[str, list[str]] | None, text_field: str,
                 streaming: bool, max_documents: int | None) -> dict:
    """Every split of one source (``local`` is its :func:`_local_source`), cleaned (one ``"text"`` column)."""
    try:
        with _builder_errors_unlogged():
            splits, field = _load_splits(dataset, name, text_field, streaming, local)
            if "train" not in splits:
                raise DataError(f"dataset {dataset!r} has no 'train' split (splits: {sorted(splits)})")
            return {split: _clean(ds, field, max_documents, dataset if split == "train" else
                                  f"{dataset}[{split}]")
                    for split, ds in splits.items() if split in ("train", "validation", "test")}
    except _READ_ERRORS as err:
        if local is None:  # hub datasets are not ours to scan
            raise
        raise _corpus_error(*local, err) from err


def is_local_source(source: str) -> bool:
    """Whether ``source`` names something on this machine (a file, folder or glob), not a built-in
    corpus or a name on the hub."""
    return source not in BUILTIN_CORPORA and (
        os.path.exists(os.path.expanduser(source)) or any(c in source for c in "*?[")
        or Path(source).suffix.lower() in _BUILDERS or source.startswith((".", "/", "~")))


def _local_source(dataset: str, name: str | None) -> tuple[str, list[str]] | None:
    """Return ``(builder, files)`` when ``dataset`` names local files, ``None`` for a built-in corpus or
    the hub."""
    is_local = is_local_source(dataset)
    if name is not None and (dataset in BUILTIN_CORPORA or is_local):
        raise DataError(f"name={name!r} only applies to hub datasets, not to {dataset!r}")
    return _local_files(dataset) if is_local else None


def _load_splits(dataset: str, name: str | None, text_field: str, streaming: bool,
                 local: tuple[str, list[str]] | None) -> tuple[dict, str]:
    """Load every split of the source with its original columns; return them and the text column name."""
    if dataset in BUILTIN_CORPORA:
        docs = stdlib_documents() if dataset == "stdlib" else pydoc_topics_documents()
        ds = Dataset.from_dict({"text": docs})
        return {"train": ds.to_iterable_dataset() if streaming else ds}, "text"
    if local is not None:
        builder, files = local
        args, kwargs = (builder,), {"data_files": files}
        if builder == "text":  # text files have one "text" column whatever text_field says
            kwargs["sample_by"], text_field = "document", "text"
    else:  # anything that does not look like a local path is a hub dataset name
        args, kwargs = (dataset, name), {}
    try:
        splits = dict(datasets.load_dataset(*args, streaming=streaming, **kwargs))
    except OSError as err:  # includes FileNotFoundError (unknown dataset) and ConnectionError (offline)
        if local is not None:  # a local file that cannot be opened: _load_source finds and names it
            raise
        raise DataError(f"cannot load dataset {dataset!r}: {first_line(err)}") from err
    if streaming and local is not None:
        splits = {split: _guard_stream(ds, *local) for split, ds in splits.items()}
    return splits, text_field


def corpus_files(dataset: str | None) -> dict[str, int] | None:
    """The files of a local corpus and their sizes in bytes, named relative to the folder they share;
    None for a built-in corpus or a hub dataset (what a run records to tell a changed corpus)."""
    if dataset is None:
        return None
    local = _local_source(dataset, None)
    if local is None:
        return None
    files = local[1]
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    return {os.path.relpath(f, root): os.path.getsize(f) for f in files}


def _local_files(spec: str) -> tuple[str, list[str]]:
    """Resolve a local file, folder or glob to ``(builder name, sorted absolute file paths)``."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        what = _kangpt_folder(path)
        if what:  # its metrics.jsonl and manifests would be read as documents, and blamed for being none
            raise DataError(f"{spec!r} is {what}, not a corpus of {'/'.join(_BUILDERS)} files")
        files = [p for p in sorted(Path(path).rglob("*")) if _is_file(p) and p.suffix.lower() in _BUILDERS
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise DataError(f"folder {spec!r} contains no {'/'.join(_BUILDERS)} files")
    elif any(c in spec for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if _is_file(p)]
        if not files:
            raise DataError(f"glob {spec!r} matches no files")
    elif _is_file(path):
        files = [Path(path)]
    else:
        raise DataError(f"no such file or directory: {spec!r}")
    suffixes = sorted({p.suffix.lower() for p in files})
    unsupported = [s for s in suffixes if s not in _BUILDERS]
    if unsupported:
        raise DataError(f"unsupported file extension {unsupported[0] or '(none)'!r} in {spec!r}; "
                        f"use {', '.join(_BUILDERS)}")
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"{spec!r} mixes file types {suffixes}; use one type per corpus")
    return builders.pop(), [str(p.absolute()) for p in files]


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


def _clean(ds, field: str, max_documents: int | None, source: str):
    """Keep only the text field (renamed ``"text"``), drop documents without text, cap the document count."""
    columns = ds.column_names
    if columns is None:  # a stream whose features are unknown until read
        first = next(iter(ds), None)
        columns = list(first) if first else []
    if field not in columns:
        raise DataError(f"text field {field!r} not found in {source!r} (columns: {columns})")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    rows = len(ds) if isinstance(ds, Dataset) else None  # a stream's length is unknown until read
    ds = ds.filter(_is_document, input_columns="text")
    if isinstance(ds, Dataset):
        if len(ds) == 0:
            raise DataError(f"no non-empty documents in {source!r} (field {field!r})")
        if len(ds) < rows:  # said once: dropping a user's rows silently could hide a wrong text_field
            logger.warning("dropped %d of %d documents of %r with no text in field %r (missing, null, "
                           "not a string or blank)", rows - len(ds), rows, source, field)
        if max_documents is not None:
            ds = ds.select(range(min(max_documents, len(ds))))
    elif max_documents is not None:
        ds = ds.take(max_documents)
    return ds


def _is_document(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _hold_out(ds, strides: dict[str, int], source: str) -> dict:
    """Split documents off ``ds``: ``{"train": rest, split: held-out, ...}`` for ``split`` in ``strides``.

    Validation holds documents ``0, k, 2k, ...`` (``k = strides["validation"]``), test documents
    ``r, r + k', ...`` (``k' = strides["test"]``, ``r = k' // 2``) that validation does not hold.

    A stream is made one shard first: ``split_dataset_by_node`` hands whole shards (files) to the
    processes, each of which would count its documents from 0, holding out other documents than one
    process does and training on held-out ones. From one shard, every process reads the whole stream,
    counts the corpus's documents and keeps its share of them.
    """
    names = ["train", *strides]
    if isinstance(ds, IterableDataset):
        ds = IterableDataset.from_generator(_rows, features=ds.features, gen_kwargs={"shards": [ds]})
        return {split: ds.filter(_in_split, with_indices=True, fn_kwargs={"strides": strides, "split": split})
                for split in names}
    if len(ds) < len(names):
        raise DataError(f"{source!r} has {len(ds)} document(s); at least {len(names)} are needed to hold "
                        f"out {' and '.join(strides)}")
    index = {split: [] for split in names}
    for i in range(len(ds)):
        index[_split_of(i, strides)].append(i)
    empty = [split for split, rows in index.items() if not rows]
    if empty:
        raise DataError(f"{source!r} has {len(ds)} document(s): no {empty[0]} document is left; "
                        "use more documents or larger fractions")
    return {split: ds.select(rows) for split, rows in index.items()}


def _split_of(index: int, strides: dict[str, int]) -> str:
    """The split document ``index`` belongs to under :func:`_hold_out`'s rule."""
    if "validation" in strides and index % strides["validation"] == 0:
        return "validation"
    if "test" in strides and index % strides["test"] == strides["test"] // 2:
        return "test"
    return "train"


def _in_split(_row, index: int, strides: dict[str, int], split: str) -> bool:
    return _split_of(index, strides) == split


def _rows(shards: list) -> Iterator[dict]:
    for shard in shards:
        yield from shard


# ---------------------------------------------------------------------------------------------
# Broken local files
#
# `datasets` reports a broken file as a long traceback that names neither the file nor the line.
# Rather than validate every file up front (a full extra read of the corpus, and of a stream that may
# never be read to its end), the errors are caught where they surface and only then are the files
# scanned for the culprit; the happy path pays nothing.


def _guard_stream(ds: IterableDataset, builder: str, files: list[str]) -> IterableDataset:
    """Wrap a local stream so that a broken file, met lazily while iterating, raises a ``DataError``.

    The wrapper keeps one shard per file, so ``split_dataset_by_node`` still hands out whole files,
    and each shard knows its file, so an error names it without scanning the others.
    """
    if ds.num_shards == len(files):
        shards = [ds.shard(num_shards=len(files), index=i) for i in range(len(files))]
        names = [[file] for file in files]
    else:  # the builder shards some other way: one shard, whose error scans all files
        shards, names = [ds], [files]
    return IterableDataset.from_generator(_read_guarded, features=ds.features,
                                          gen_kwargs={"shards": shards, "files": names, "builder": builder})


def _read_guarded(shards: list, files: list[list[str]], builder: str) -> Iterator[dict]:
    """Yield the rows of ``shards``, turning a read error into the ``DataError`` of its shard's files."""
    for shard, shard_files in zip(shards, files, strict=True):
        try:
            with _builder_errors_unlogged():
                yield from shard
        except _READ_ERRORS as err:
            raise _corpus_error(builder, shard_files, err) from err


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


# ---------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(
    spec: str, train_texts=None, *, vocab_size: int = 4096, cache_dir: str | None = None
) -> PreTrainedTokenizerFast:
    """Return a ``PreTrainedTokenizerFast`` with ``pad_token`` set (to EOS when it had none).

    ``spec == "bpe"`` trains a GPT-2-style byte-level BPE with ``vocab_size`` entries (fewer, with a
    logged warning, if the texts run out of merges) on ``train_texts`` (strings, or a dataset with a
    ``"text"`` column), whose only special token ``<|endoftext|>`` is BOS, EOS, UNK and PAD. The
    trained tokenizer is cached under ``cache_dir`` (default ``$KANGPT_CACHE`` or ``~/.cache/kangpt``)
    keyed by a hash of the texts, ``vocab_size`` and the tokenizer settings, so a second call with the
    same inputs loads it instead of retraining; an entry that fails to load is retrained and replaced,
    with a logged warning naming the damaged file. Any other ``spec`` goes to
    ``AutoTokenizer.from_pretrained`` (a local directory or a hub name such as ``"gpt2"``).
    """
    if spec != "bpe":
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except OSError as err:
            raise DataError(f"cannot load tokenizer {spec!r}: {first_line(err)}") from err
        if tokenizer.eos_token is None:
            raise DataError(f"tokenizer {spec!r} has no EOS token, which packing needs")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise DataError(f"vocab_size {BPE_VOCAB_SIZE_RULE}, got {vocab_size!r}")
    if train_texts is None:
        raise DataError("spec 'bpe' needs train_texts to train on")
    texts = list(_iter_texts(train_texts))
    if not any(texts):
        raise DataError("cannot train a BPE tokenizer: train_texts contains no text")
    root = Path(cache_dir or os.environ.get("KANGPT_CACHE") or Path.home() / ".cache" / "kangpt")
    path = root / "tokenizers" / f"bpe-{vocab_size}-{_bpe_key(texts, vocab_size)}"
    tokenizer = _cached_bpe(path)
    if tokenizer is None:
        _save_atomically(_train_bpe(texts, vocab_size), path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if len(tokenizer) < vocab_size:  # checked after loading, so a cached short BPE is reported too
        logger.warning("the trained BPE has %d tokens, fewer than vocab_size=%d: its %d training texts "
                       "ran out of merges (no pair of tokens within a word occurs %d or more times); "
                       "train it on more text or lower vocab_size",
                       len(tokenizer), vocab_size, len(texts), _BPE_SETTINGS["min_frequency"])
    return tokenizer


def _cached_bpe(path: Path) -> PreTrainedTokenizerFast | None:
    """The tokenizer cached at ``path``; ``None`` when there is none, or when it is damaged (said in a
    warning), since a cache entry is rebuilt, not repaired by hand."""
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed tokenizer.json
        file, cause = _damaged_file(path, err)
        logger.warning("the cached tokenizer file %s is damaged (%s); retraining the BPE and replacing it",
                       file, cause)
        return None


def _damaged_file(path: Path, err: Exception) -> tuple[Path, str]:
    """The file of the cache entry ``path`` that is not JSON, with why; else the entry itself and ``err``."""
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_bytes())
        except ValueError as bad:  # JSONDecodeError and UnicodeDecodeError
            return file, str(bad)
    return path, first_line(err)


def _iter_texts(texts) -> Iterator[str]:
    """Yield the strings of a ``Dataset``/``IterableDataset`` ``"text"`` column or of an iterable."""
    if isinstance(texts, str):
        raise DataError("expected an iterable of documents, got a single string")
    if isinstance(texts, Dataset):
        for batch in _text_column(texts).iter(batch_size=_BATCH_DOCS):
            yield from batch["text"]
        return
    for item in texts:
        if isinstance(item, dict):
            if "text" not in item:
                raise DataError(f"document rows need a 'text' field, got fields {sorted(item)}")
            item = item["text"]
        if not isinstance(item, str):
            raise DataError(f"documents must be strings, got {type(item).__name__}")
        yield item


def _text_column(ds: Dataset) -> Dataset:
    if "text" not in ds.column_names:
        raise DataError(f"dataset needs a 'text' column, got columns {ds.column_names}")
    return ds.select_columns(["text"])


def _bpe_key(texts: list[str], vocab_size: int) -> str:
    digest = hashlib.sha256(json.dumps([_BPE_SETTINGS, vocab_size], sort_keys=True).encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:20]


def _train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for ``transformers``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=_BPE_SETTINGS["add_prefix_space"])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=_BPE_SETTINGS["min_frequency"],
        special_tokens=_BPE_SETTINGS["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=EOT, clean_up_tokenization_spaces=False,
                                   padding_side="left")  # batched generation pads on the left


def _save_atomically(tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then rename it to ``path``.

    Over an existing (damaged) entry, whose folder a rename cannot replace, each file is moved in with
    ``os.replace``, atomic each, ``tokenizer.json`` last: it marks a whole entry (:func:`_cached_bpe`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if path.is_dir():
            for file in sorted(Path(tmp).iterdir(), key=lambda file: file.name == "tokenizer.json"):
                os.replace(file, path / file.name)
        else:
            os.rename(tmp, path)
    except OSError:
        if not (path / "tokenizer.json").is_file():  # not just a concurrent writer that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Packing


def pack_documents(docs, tokenizer, block_size: int, *, num_proc: int | None = None) -> Dataset:
    """Tokenize ``docs`` and pack them into a ``Dataset`` of ``block_size``-token ``"input_ids"`` rows.

    Each document is tokenized without special tokens (a literal ``<|endoftext|>`` in the text is
    tokenized as ordinary text) and followed by the tokenizer's EOS token; the documents are
    concatenated in order and cut into non-overlapping blocks, dropping the final partial block.
    ``docs`` is a dataset with a ``"text"`` column or an iterable of strings. Tokenizing is a batched
    ``Dataset.map`` (cached by fingerprint for datasets backed by files, e.g. local or hub corpora);
    the blocks are built in memory with Arrow. ``input_ids`` are int64, usable as ``labels`` too.
    """
    _check_block_size(block_size)
    eos_id = _eos_id(tokenizer)
    if isinstance(docs, IterableDataset):
        raise DataError("pack_documents needs a map-style dataset; use stream_blocks for an IterableDataset")
    if not isinstance(docs, Dataset):
        docs = Dataset.from_dict({"text": list(_iter_texts(docs))})
    tokenized = _text_column(docs).map(
        _tokenize_batch, batched=True, batch_size=_BATCH_DOCS, input_columns="text", remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id}, num_proc=num_proc, desc="Tokenizing",
    )
    tokens = pc.list_flatten(tokenized.data.column("input_ids")).combine_chunks()
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        raise DataError(f"only {len(tokens)} tokens (with EOS), fewer than one block of {block_size}")
    values = tokens.slice(0, n_blocks * block_size).cast(pa.int64())
    blocks = pa.FixedSizeListArray.from_arrays(values, block_size)
    return Dataset(InMemoryTable(pa.table({"input_ids": blocks})))


def _tokenize_batch(texts: list[str], tokenizer, eos_id: int) -> dict:
    # split_special_tokens: a literal "<|endoftext|>" inside a document is text, not a document boundary.
    # verbose=False: documents longer than the tokenizer's model_max_length are expected (they are cut
    # into blocks), so transformers' warning that the model cannot take them does not apply.
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                    return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": [doc + [eos_id] for doc in ids]}


def stream_blocks(docs, tokenizer, block_size: int) -> IterableDataset:
    """Pack a stream of documents like :func:`pack_documents`, lazily.

    ``docs`` is an ``IterableDataset`` (or any iterable) of ``{"text": ...}`` rows or strings. The
    result is an ``IterableDataset`` yielding ``{"input_ids": [block_size int64 ids]}``; it is a
    single shard, so iterate it in the main process or one DataLoader worker.
    """
    _check_block_size(block_size)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"), length=block_size)})
    # One shard holding the whole stream: `datasets` would treat a list argument as a list of shards.
    kwargs = {"shards": [docs], "tokenizer": tokenizer, "eos_id": _eos_id(tokenizer),
              "block_size": block_size}
    return IterableDataset.from_generator(_generate_blocks, features=features, gen_kwargs=kwargs)


def _generate_blocks(shards: list, tokenizer, eos_id: int, block_size: int) -> Iterator[dict]:
    buffer: list[int] = []
    texts = itertools.chain.from_iterable(_iter_texts(docs) for docs in shards)
    for batch in _batched(texts, _BATCH_DOCS):
        for ids in _tokenize_batch(batch, tokenizer, eos_id)["input_ids"]:
            buffer += ids
        end = len(buffer) - len(buffer) % block_size
        for start in range(0, end, block_size):
            yield {"input_ids": buffer[start:start + block_size]}
        del buffer[:end]


def _batched(items: Iterable, n: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def _check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no EOS token")
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# Baseline


def unigram_entropy(dataset_blocks_train, dataset_blocks_val, vocab_size: int) -> float:
    """Cross-entropy in nats/token of the validation tokens under the training unigram distribution.

    The unigram probabilities are add-one smoothed over ``vocab_size`` entries
    (``p(t) = (count(t) + 1) / (N + vocab_size)``), so every token has finite loss. A language model
    that learned anything must get a validation loss below this. Arguments are packed datasets (or
    iterables of ``{"input_ids": ...}`` rows or of id sequences); use ``len(tokenizer)`` as
    ``vocab_size``.
    """
    if vocab_size < 1:
        raise DataError(f"vocab_size must be positive, got {vocab_size!r}")
    train = _token_counts(dataset_blocks_train, vocab_size, "train")
    val = _token_counts(dataset_blocks_val, vocab_size, "validation")
    log_p = np.log(train + 1.0) - np.log(train.sum() + vocab_size)
    return float(-(val * log_p).sum() / val.sum())


def _token_counts(blocks, vocab_size: int, which: str) -> np.ndarray:
    if isinstance(blocks, Dataset):
        tables = blocks.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=_BATCH_DOCS)
        chunks: Iterable = (pc.list_flatten(table["input_ids"]).to_numpy() for table in tables)
    else:
        chunks = (np.asarray(row["input_ids"] if isinstance(row, dict) else row).ravel() for row in blocks)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in chunks:
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise DataError(f"{which} token id {int(bad)} is outside the vocabulary of size {vocab_size}")
        counts += np.bincount(ids.astype(np.int64), minlength=vocab_size)
    if counts.sum() == 0:
        raise DataError(f"no {which} tokens")
    return counts
