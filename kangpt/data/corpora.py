"""Corpora: the built-in ones, hub datasets and local files, loaded as documents split for training.

Documents are datasets with one ``"text"`` column (:func:`load_documents`, :func:`load_splits`), or,
unmaterialised, :class:`~kangpt.data.documents.Documents` (:func:`document_splits`, what the token store
reads). Two corpora exist on every machine, so the whole pipeline runs offline (:mod:`.builtin`). Others
are Hugging Face hub datasets and local ``.txt``/``.jsonl``/``.json``/``.parquet`` files, folders or
globs; documents with no text are dropped. A broken local file is diagnosed by :mod:`.diagnosis`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node

from ..messages import first_line
from .builtin import BUILTIN_CORPORA
from .diagnosis import _is_file, _kangpt_folder
from .documents import BuiltinShard, Documents, datasets_of, hub_shards, local_shards, sources_of
from .errors import DataError

# Local file suffix -> `datasets` packaged builder.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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
    config ``name``. Documents whose text is missing, null, not a string or blank are dropped (with a
    logged warning giving their count when a whole source is read: map-style datasets, the token
    store) and at most ``max_documents`` are
    read from each split of the source. A ``text_field`` other than ``"text"`` is refused where no
    source has fields (only ``.txt`` files or a built-in corpus), and so is a kangpt run folder or a
    model folder given as local files, before any of its files is read.

    Broken local files are refused, not skipped, since skipping would silently lose user data: a
    file that cannot be opened (a symbolic-link loop, a link to nothing), a ``.txt`` file that is not
    UTF-8 (binary, or another encoding such as latin-1), a ``.jsonl`` line that is not UTF-8, not JSON
    or not an object, or an unreadable ``.parquet`` file raises a ``DataError`` naming the file and the
    byte offset or line number, to be fixed or removed from the corpus. With ``streaming=True`` such an
    error may only surface when the stream reaches that file.

    A split is read shard by shard (:mod:`kangpt.data.documents`): a built-in corpus is one shard, local
    files one per file, a hub dataset (always read as a stream) one per data file.

    Validation: the local files ``validation_dataset`` when given, else the source's own
    ``"validation"`` split, else (when no test split is asked for) its ``"test"`` split; otherwise
    documents are held out: in shard ``s``, its ``j``-th document when ``(s + j) % k == 0`` with
    ``k = round(1 / val_fraction)`` (documents ``0, k, 2k, ...`` of a one-shard corpus, every k-th file
    of one-document files), so the split is deterministic, in corpus order and spread over the whole
    corpus. A test split is asked for by ``test_dataset`` (local files) or ``test_fraction > 0``: it is
    those files, else the source's own ``"test"`` split, else documents held out of training by the same
    rule with ``k' = round(1 / test_fraction)`` and ``(s + j) % k' == k' // 2`` (``k' // 2, k' // 2 + k',
    ...`` of one shard), leaving out any that validation holds.

    With ``streaming=True`` the results are ``IterableDataset`` streams, one shard per shard of the source
    (resumable with ``state_dict``), split across ``world_size`` ranks by :func:`share_of_process`
    (validation too, so evaluation losses must be averaged across ranks). Map-style results are written
    once to the ``datasets`` cache (built-in corpora: held in memory) and are not sharded: the
    distributed sampler of the training loop does that.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    docs = document_splits(dataset, name=name, text_field=text_field, val_fraction=val_fraction,
                           test_fraction=test_fraction, validation_dataset=validation_dataset,
                           test_dataset=test_dataset, max_documents=max_documents)
    if streaming:
        return {split: share_of_process(split_docs.stream(), rank, world_size)
                for split, split_docs in docs.items()}
    splits = datasets_of(docs)
    check_split_sizes({split: len(ds) for split, ds in splits.items()}, docs)
    return splits


def document_splits(
    dataset: str = "stdlib",
    *,
    name: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    test_fraction: float = 0.0,
    validation_dataset: str | None = None,
    test_dataset: str | None = None,
    max_documents: int | None = None,
) -> dict[str, Documents]:
    """The splits of :func:`load_splits`, unread: ``{split: Documents}``; a bad argument or source is
    refused before any document is read (but the first row of a source with fields)."""
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    if not 0 <= test_fraction <= 0.5:
        raise DataError(f"test_fraction must be in [0, 0.5], got {test_fraction!r}")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be a positive integer or None, got {max_documents!r}")
    want_test = test_dataset is not None or test_fraction > 0
    # Every source is resolved, and refused if bad, before any is read.
    local = _local_source(dataset, name)
    own_files = {split: (spec, _own_split_files(spec)) for split, spec in
                 (("validation", validation_dataset), ("test", test_dataset)) if spec is not None}
    _check_text_field(text_field, dataset, [local, *(files for _, files in own_files.values())])
    splits = _source_splits(dataset, name, local, text_field, max_documents)
    given = {split: _source_splits(spec, None, files, text_field, max_documents)["train"].with_split(split)
             for split, (spec, files) in own_files.items()}
    own = {"validation": given.get("validation", splits.get("validation"))}
    if "test" in given:
        own["test"] = given["test"]
    elif want_test or own["validation"] is None:
        own["test"] = splits.get("test")
    if not want_test and own["validation"] is None and own["test"] is not None:  # the test split validates
        own["validation"], own["test"] = own["test"].with_split("validation"), None
    held = {split: k for split, k in (("validation", round(1 / val_fraction)),
                                      ("test", round(1 / test_fraction) if test_fraction else 0))
            if own.get(split) is None and k and (split == "validation" or want_test)}
    train = splits["train"].with_strides(held)
    result = {"train": train, **{split: train.with_split(split) for split in held}}
    result.update({split: docs for split, docs in own.items() if docs is not None})
    for docs in sources_of(result):
        docs.check_text_field()
    return result


def check_split_sizes(sizes: dict[str, int], splits: dict[str, Documents]) -> None:
    """Refuse splits that came out empty (``sizes``: documents per split of ``splits``), as a DataError
    that says what the corpus holds and what to change."""
    train = splits["train"]
    held = [split for split in train.strides if split in sizes]
    total = sizes["train"] + sum(sizes[split] for split in held)
    if total == 0:
        raise DataError(f"no non-empty documents in {train.source!r}")
    names = ["train", *held]
    if held and total < len(names):
        raise DataError(f"{train.source!r} has {total} document(s); at least {len(names)} are needed to hold "
                        f"out {' and '.join(held)}")
    for split in names:
        if sizes[split] == 0:
            raise DataError(f"{train.source!r} has {total} document(s): no {split} document is left; "
                            "use more documents or larger fractions")
    for split, count in sizes.items():
        if split not in names and count == 0:
            raise DataError(f"no non-empty documents in {splits[split].source!r}")


def share_of_process(stream: IterableDataset, rank: int, world_size: int) -> IterableDataset:
    """Process ``rank``'s share of ``stream``: whole shards when there are at least ``world_size`` (each
    process reads only its own; their counts differ by one at most), else every ``world_size``-th row
    of everything (each process reads the whole stream)."""
    if world_size == 1:
        return stream
    strategy = "shards" if stream.num_shards >= world_size else "examples"
    return split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy=strategy)


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


def _source_splits(dataset: str, name: str | None, local: tuple[str, list[str]] | None, text_field: str,
                   max_documents: int | None) -> dict[str, Documents]:
    """Every split of one source (``local`` is its :func:`_local_source`) as its shards, unread."""
    if dataset in BUILTIN_CORPORA:
        return {"train": Documents(dataset, [BuiltinShard.of(dataset)], max_documents=max_documents,
                                   text_field=text_field)}
    if local is not None:
        return {"train": Documents(dataset, local_shards(*local, text_field), max_documents=max_documents,
                                   text_field=text_field)}
    try:  # anything that does not look like a local path is a hub dataset name, read as a stream
        streams = dict(datasets.load_dataset(dataset, name, streaming=True))
    except OSError as err:  # includes FileNotFoundError (unknown dataset) and ConnectionError (offline)
        raise DataError(f"cannot load dataset {dataset!r}: {first_line(err)}") from err
    if "train" not in streams:
        raise DataError(f"dataset {dataset!r} has no 'train' split (splits: {sorted(streams)})")
    return {split: Documents(dataset if split == "train" else f"{dataset}[{split}]",
                             hub_shards(stream, text_field, dataset), split=split,
                             max_documents=max_documents, text_field=text_field)
            for split, stream in streams.items() if split in ("train", "validation", "test")}


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
