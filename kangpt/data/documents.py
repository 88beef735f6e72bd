"""A corpus read shard by shard: its documents, the split each belongs to, and streams of them.

A source is a list of shards read in order: a built-in corpus is one shard, local files are one shard
per file, a hub dataset one per shard of its stream (its data files). A document's split follows from
its shard and its place in that shard alone, so no process ever needs the rest of the corpus to know
it: each process of a streamed run reads only its own shards, and a stream resumed at some shard
skips the shards before it without reading them.

The rule: document ``j`` of shard ``s`` (``j`` counting the shard's documents that have text) is held
out for validation when ``(s + j) % k == 0`` (``k`` the validation stride) and for test when
``(s + j) % k' == k' // 2`` and it is not validation's. In a corpus of one shard (a built-in corpus,
one file) that is documents ``0, k, 2k, ...``; in a folder of one-document files, every k-th file.

:class:`Documents` is one split of one source: iterated in this process (what the token store reads),
or as a ``datasets`` stream (:meth:`Documents.stream`); :func:`datasets_of` makes map-style datasets
of splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset
from datasets.exceptions import DatasetGenerationError

from .builtin import builtin_documents
from .diagnosis import _READ_ERRORS, _builder_errors_unlogged, _corpus_error, _display
from .errors import DataError

logger = logging.getLogger(__name__)

FEATURES = datasets.Features({"text": datasets.Value("string")})
_TAGGED = datasets.Features({"text": datasets.Value("string"), "split": datasets.Value("string")})


def split_of(position: int, strides: dict[str, int], rest: str = "train") -> str:
    """The split of the document at ``position`` (its shard's index plus its own in the shard) under the
    held-out ``strides`` (``{"validation": k, "test": k'}``, either may be absent): the module's rule;
    ``rest`` is the split of the documents not held out."""
    if "validation" in strides and position % strides["validation"] == 0:
        return "validation"
    if "test" in strides and position % strides["test"] == strides["test"] // 2:
        return "test"
    return rest


@dataclass(frozen=True)
class Shard:
    """One shard of a source: ``index``, its place among the source's shards (the ``s`` of the rule)."""

    index: int

    def texts(self) -> Iterator[object]:
        """The text value of each row, in order (anything: rows without text are dropped by the reader)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What the shard is, as JSON: equal for two shards that hold the same rows."""
        raise NotImplementedError


@dataclass(frozen=True)
class BuiltinShard(Shard):
    """A built-in corpus, whole; ``digest`` (of its text) tells one Python's library from another's."""

    name: str
    digest: str = ""

    @classmethod
    def of(cls, name: str) -> BuiltinShard:
        digest = hashlib.sha256("\0".join(builtin_documents(name)).encode("utf-8", "surrogatepass"))
        return cls(0, name, digest.hexdigest())

    def texts(self) -> Iterator[object]:
        yield from builtin_documents(self.name)

    def identity(self) -> dict:
        return {"builtin": self.name, "sha256": self.digest}


@dataclass(frozen=True)
class TextFile(Shard):
    """A local ``.txt`` file, one document, read as UTF-8 with universal newlines (as ``datasets``' text
    builder reads it). ``stamp`` (size and modification time) makes a changed file another shard."""

    path: str
    stamp: tuple[int, int] = (0, 0)

    def texts(self) -> Iterator[object]:
        try:
            with open(self.path, encoding="utf-8") as file:
                text = file.read()
        except (UnicodeDecodeError, OSError) as err:
            raise _corpus_error("text", [self.path], err) from err
        yield text

    def identity(self) -> dict:
        return {"file": self.path, "size": self.stamp[0], "mtime_ns": self.stamp[1]}


@dataclass(frozen=True)
class RecordFile(Shard):
    """A local ``.jsonl``/``.json``/``.parquet`` file of records, read by ``datasets``' ``builder``;
    ``field`` names the text column."""

    path: str
    builder: str
    field: str
    stamp: tuple[int, int] = (0, 0)

    def texts(self) -> Iterator[object]:
        try:
            with _builder_errors_unlogged():
                rows = datasets.load_dataset(self.builder, data_files=[self.path], streaming=True)["train"]
                for row in rows:
                    if self.field not in row:
                        raise DataError(f"text field {self.field!r} not found in "
                                        f"{_display(self.path)!r} (columns: {list(row)})")
                    yield row[self.field]
        except _READ_ERRORS as err:
            raise _corpus_error(self.builder, [self.path], err) from err

    def identity(self) -> dict:
        return {"file": self.path, "size": self.stamp[0], "mtime_ns": self.stamp[1], "field": self.field}


@dataclass(frozen=True)
class HubShard(Shard):
    """Shard ``index`` of the ``count`` shards of a hub dataset's ``stream`` (one split, streamed)."""

    stream: IterableDataset = field(compare=False)
    count: int = 1
    field: str = "text"
    source: str = ""

    def texts(self) -> Iterator[object]:
        rows = self.stream if self.count == 1 else self.stream.shard(num_shards=self.count, index=self.index)
        for row in rows:
            if self.field not in row:
                raise DataError(f"text field {self.field!r} not found in {self.source!r} "
                                f"(columns: {list(row)})")
            yield row[self.field]

    def identity(self) -> dict:
        return {"hub": self.source, "config": self.stream.info.config_name, "split": str(self.stream.split),
                "shard": self.index, "of": self.count, "field": self.field}


def local_shards(builder: str, files: list[str], text_field: str) -> list[Shard]:
    """One shard per local file (``builder`` as :func:`kangpt.data.corpora._local_files` resolves it)."""
    shards = []
    for index, path in enumerate(files):
        stat = os.stat(path) if os.path.exists(path) else None  # a dead link: refused when it is read
        stamp = (stat.st_size, stat.st_mtime_ns) if stat else (0, 0)
        shards.append(TextFile(index, path, stamp) if builder == "text"
                      else RecordFile(index, path, builder, text_field, stamp))
    return shards


def hub_shards(stream: IterableDataset, text_field: str, source: str) -> list[Shard]:
    """One shard per shard of a hub dataset's stream."""
    count = stream.num_shards
    return [HubShard(index, stream, count, text_field, source) for index in range(count)]


@dataclass
class Documents:
    """The documents of one split of one source, in corpus order.

    ``shards`` are the source's; ``strides`` its held-out rule (``{}``: nothing is held out, all its
    documents are this split's: a split with files of its own, a hub dataset's own validation split);
    ``split`` which of them this is (``"train"`` is what is held out of nothing);
    at most the first ``max_documents`` documents of the source are read; ``text_field`` is the field
    the shards read the text from (named in messages).
    """

    source: str
    shards: list[Shard]
    split: str = "train"
    strides: dict[str, int] = field(default_factory=dict)
    max_documents: int | None = None
    text_field: str = "text"

    def with_split(self, split: str) -> Documents:
        """The same source's documents of another split."""
        return dataclasses.replace(self, split=split)

    def with_strides(self, strides: dict[str, int]) -> Documents:
        """The same source's documents under another held-out rule (``{}``: all of them)."""
        return dataclasses.replace(self, strides=strides)

    def __iter__(self) -> Iterator[str]:
        """The texts of this split, read in this process (a DataError names a broken file)."""
        for row in _generate(tuple(self.shards), **self._settings()):
            yield row["text"]

    def head(self, count: int) -> Head:
        """The first ``count`` texts of this split, read anew at each iteration (never held)."""
        return Head(self, count)

    def tagged(self) -> Iterator[dict]:
        """``{"text", "split"}`` of every document of the source, in order: all its splits in one read."""
        settings = self._settings()
        del settings["split"]
        return _tagged(tuple(self.shards), **settings)

    def stream(self) -> IterableDataset:
        """A ``datasets`` stream of ``{"text": ...}`` rows with one shard per shard of the source (a single
        one under ``max_documents``, which counts across shards), resumable with ``state_dict``."""
        shards = tuple(self.shards) if self.max_documents is not None else list(self.shards)
        return IterableDataset.from_generator(_generate, features=FEATURES,
                                              gen_kwargs={"shards": shards, **self._settings()})

    def identity(self) -> dict:
        """What picks these documents out of their source's shards, as JSON (the shards themselves: each
        one's :meth:`Shard.identity`)."""
        return {"source": self.source, "split": self.split, "strides": self.strides,
                "max_documents": self.max_documents}

    def check_text_field(self) -> None:
        """Read the first row of a source with fields (records, a hub dataset), so that a text field that
        no row has is refused up front, not when a stream first meets it; other sources are not read."""
        if self.shards and isinstance(self.shards[0], (RecordFile, HubShard)):
            next(iter(self.shards[0].texts()), None)

    def _settings(self) -> dict:
        rest = "train" if self.strides else self.split  # the split of the documents not held out
        return {"split": self.split, "strides": self.strides, "rest": rest,
                "max_documents": self.max_documents, "source": self.source, "field": self.text_field}


@dataclass(frozen=True)
class Head:
    """The first ``count`` texts of ``documents``: iterated, they are read again."""

    documents: Documents
    count: int

    def __iter__(self) -> Iterator[str]:
        return itertools.islice(iter(self.documents), self.count)


def sources_of(splits: dict[str, Documents]) -> list[Documents]:
    """One of the splits of each source of ``splits`` (the held-out ones share their source's shards)."""
    return list({id(docs.shards): docs for docs in splits.values()}.values())


def datasets_of(splits: dict[str, Documents]) -> dict[str, Dataset]:
    """Map-style ``Dataset``s of ``{"text": ...}`` rows of ``splits``: each source read once, in memory for
    a built-in corpus, else written to the ``datasets`` cache (keyed by its files' sizes and times) and
    memory-mapped; a split is a selection of its source's rows."""
    tagged = {id(docs.shards): _tagged_dataset(docs) for docs in sources_of(splits)}
    result = {}
    for split, docs in splits.items():
        rows = tagged[id(docs.shards)]
        in_split = pc.equal(rows.data.column("split"), docs.split).to_numpy(zero_copy_only=False)
        picked = np.flatnonzero(in_split)
        result[split] = rows.select(picked).select_columns(["text"])
    return result


def _tagged_dataset(docs: Documents) -> Dataset:
    """Every document of ``docs``' source with the split it belongs to (``{"text", "split"}`` rows)."""
    if next(iter(docs.with_strides({})), None) is None:
        raise DataError(f"no non-empty documents in {docs.source!r}")
    kwargs = docs._settings()
    del kwargs["split"]
    kwargs["shards"] = tuple(docs.shards)
    if all(isinstance(shard, BuiltinShard) for shard in docs.shards):
        return Dataset.from_list(list(_tagged(**kwargs)), features=_TAGGED)
    try:
        return Dataset.from_generator(_tagged, features=_TAGGED, gen_kwargs=kwargs)
    except DatasetGenerationError as err:  # it wraps what the generator raised: a DataError is the user's
        cause = err.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _generate(shards, split: str, strides: dict[str, int], rest: str, max_documents: int | None,
              source: str, field: str) -> Iterator[dict]:
    """``{"text": ...}`` of each document of ``split`` in ``shards``, in order. A ``.txt`` file holds one
    document, whose split its place alone tells: the files of other splits are not read (but under
    ``max_documents``, which counts them)."""
    if max_documents is None:
        shards = type(shards)(shard for shard in shards if not isinstance(shard, TextFile)
                              or split_of(shard.index, strides, rest) == split)
    for row in _tagged(shards, strides, rest, max_documents, source, field, warn=split == rest):
        if row["split"] == split:
            yield {"text": row["text"]}


def _tagged(shards, strides: dict[str, int], rest: str, max_documents: int | None, source: str, field: str,
            warn: bool = True) -> Iterator[dict]:
    """``{"text", "split"}`` of each document in ``shards``, in order. Rows without text (missing, null,
    not a string, blank) are dropped, counted in a warning (with ``warn``) when ``shards`` is a whole
    source (a tuple: a list is a stream's, read shard by shard)."""
    kept = dropped = 0
    for position, text in _rows(shards):
        if not _is_document(text):
            dropped += 1
        elif max_documents is not None and kept == max_documents:
            break
        else:
            yield {"text": text, "split": split_of(position, strides, rest)}
            kept += 1
    if warn and dropped and isinstance(shards, tuple):  # said: dropping rows silently could hide a bad field
        logger.warning("dropped %d of %d documents of %r with no text in field %r (missing, null, not a "
                       "string or blank)", dropped, dropped + kept, source, field)


def _rows(shards) -> Iterator[tuple[int, object]]:
    """``(position, text value)`` of every row of ``shards``; a row without text takes no position."""
    for shard in shards:
        position = shard.index
        for text in shard.texts():
            yield position, text
            position += _is_document(text)


def _is_document(text: object) -> bool:
    return isinstance(text, str) and bool(text.strip())
