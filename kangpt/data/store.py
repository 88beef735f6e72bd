"""The token store: a corpus tokenized once, kept on disk, and read through a memory map.

::

    $KANGPT_CACHE/tokens/<source>-<key>/
      train.bin, validation.bin[, test.bin]  token ids, little-endian uint16 (vocabularies of up to 65,536
                                             entries) or uint32; each document followed by EOS, in order
      train-counts.npy                       how often each id occurs in train.bin (the unigram baseline)
      sources.jsonl                          every shard it was read from, one a line (files with their
                                             sizes and modification times; hub shards; built-in corpora)
      store.json                             what it was built from (the sha256 of sources.jsonl and of the
                                             tokenizer, the held-out rule of each split), the tokens and
                                             documents of each split, the build's time
      manifest.json                          size and sha256 of every other file, written last

The key is a hash of what ``store.json`` says it was built from, so another corpus, another tokenizer
or other held-out settings make another store; the block size does not (blocks are cut when read).

A store is used only when whole: written under a temporary name and renamed, and opened only when every
file matches its manifest (a damaged one is built again, with a warning naming the file). One process
builds a store, once: every process takes the store's lock (``flock`` on ``<store>.lock``) before
looking, so on one machine the first builds and the others wait and then map it; machines that share
the folder share the store, others build their own. A failed write (a full disk) or Ctrl-C while
building leaves no store behind and says so in one line.

Why flat memory-mapped files (nanoGPT's ``train.bin``) rather than ``datasets``' Arrow cache or litdata:
2 bytes per token and nothing else, blocks of any size read at any offset without an index, the
page cache shared by all processes of a machine, and nothing to install.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io.folders import atomic_folder, write_text_atomically
from ..io.manifest import MANIFEST, folder_problem, write_manifest
from .corpora import check_split_sizes
from .documents import Documents, sources_of
from .encoding import BATCH_BYTES, DocumentEncoder, encode_batches
from .errors import DataError
from .tokenizer import cache_root, tokenizer_sha256

logger = logging.getLogger(__name__)

FORMAT = 1
INFO = "store.json"
SOURCES = "sources.jsonl"
COUNTS = "train-counts.npy"
# What a failed write raises without naming its file (a write to an open file): disk full, quota, ...
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class TokenStore:
    """An opened store: its splits' token arrays (memory maps) and what ``store.json`` says of it."""

    def __init__(self, path: Path, info: dict, built: bool = False):
        self.path, self.info, self.built = path, info, built
        self.dtype = np.dtype(info["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        """Every token of ``split``, a read-only memory map (nothing is read until it is used)."""
        count = self.info["tokens"][split]
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r", shape=(count,))

    def blocks(self, split: str, block_size: int, limit: int | None = None) -> TokenBlocks:
        """``split`` cut into blocks of ``block_size`` tokens (the first ``limit`` of them, if given)."""
        return TokenBlocks(self.tokens(split), block_size, limit=limit, what=f"the {split} split")

    def train_counts(self) -> np.ndarray:
        """How often each token id occurs in the training split (``vocab_size`` int64 counts)."""
        return np.load(self.path / COUNTS)

    def disk_bytes(self) -> int:
        """The bytes of the store's files on disk."""
        return sum(file.stat().st_size for file in self.path.iterdir())

    def summary(self) -> str:
        """One line: its tokens and documents per split and its bytes on disk."""
        splits = ", ".join(f"{split} {count:,} tokens ({self.info['documents'][split]:,} documents)"
                           for split, count in self.info["tokens"].items())
        total = sum(self.info["tokens"].values())
        return (f"{splits}; {self.disk_bytes() / 2**20:,.1f} MiB on disk, "
                f"{self.disk_bytes() / total:.2f} bytes per token")


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``block_size`` tokens of a flat token array, as ``{"input_ids": int64}``.

    ``blocks[i]`` is block ``i`` (``(block_size,)``), ``blocks[a:b]`` blocks ``a`` to ``b`` stacked
    (``(b - a, block_size)``); the tokens after the last whole block are left out. Over a memory map only
    the blocks read are paged in, and a pickled copy (a DataLoader worker's) maps the file again.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, limit: int | None = None, what: str = "the data"):
        if not isinstance(block_size, int) or block_size < 2:
            raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
        count = len(tokens) // block_size
        if count == 0:
            raise DataError(f"{what} holds only {len(tokens)} tokens (with EOS), fewer than one block of "
                            f"{block_size}")
        self.tokens, self.block_size = tokens, block_size
        self.count = count if limit is None else min(limit, count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int | slice) -> dict[str, torch.Tensor]:
        size = self.block_size
        if isinstance(index, slice):
            start, stop, step = index.indices(self.count)
            if step != 1:
                raise IndexError("TokenBlocks takes slices of consecutive blocks only")
            ids = self.tokens[start * size:max(start, stop) * size].reshape(-1, size)
        else:
            if not -self.count <= index < self.count:
                raise IndexError(f"block {index} of {self.count}")
            index %= self.count
            ids = self.tokens[index * size:(index + 1) * size]
        return {"input_ids": torch.from_numpy(ids.astype(np.int64))}

    def used_tokens(self) -> np.ndarray:
        """The tokens of the blocks, in order (a view)."""
        return self.tokens[:self.count * self.block_size]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap):  # pickled as its file, not as a copy of its data
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.str, len(self.tokens))
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, count = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=(count,))
        self.__dict__.update(state)


def token_store(splits: dict[str, Documents], tokenizer, *, cache_dir: str | Path | None = None,
                progress: bool = True) -> TokenStore:
    """Open the store of ``splits`` tokenized by ``tokenizer``, building it first when there is none.

    Building reads each source once (its held-out splits with it) and tokenizes it on all cores
    (:mod:`.encoding`), with a progress bar unless ``progress`` is False. Raises DataError for bad
    input and a failed write, and KeyboardInterrupt (with its one-line message) when interrupted;
    neither leaves a store.
    """
    encoder = DocumentEncoder(tokenizer)
    sources = hashlib.sha256()
    for line in _source_lines(splits):  # a line at a time: a corpus may have a million files
        sources.update(line.encode())
    built_from = {"format": FORMAT, "tokenizer_sha256": tokenizer_sha256(tokenizer),
                  "sources_sha256": sources.hexdigest(),
                  "splits": {split: docs.identity() for split, docs in splits.items()}}
    path = _store_path(cache_root(cache_dir), splits["train"].source, built_from)
    lock = path.with_name(f"{path.name}.lock")
    with _locked(lock, shared=True):  # many may check a store at once
        store, problem = _open(path, built_from)
    if store is not None:
        return store
    with _locked(lock, shared=False):  # one builds it
        store, problem = _open(path, built_from)  # another process may have built it meanwhile
        if store is not None:
            return store
        if problem is not None:
            logger.warning("the token store %s is damaged (%s); building it again", path, problem)
        _build(path, splits, encoder, built_from, progress)
        store, problem = _open(path, built_from)
    if store is None:
        raise DataError(f"the token store {str(path)!r} just built does not verify: {problem}")
    store.built = True
    return store


def _store_path(root: Path, source_name: str, built_from: dict) -> Path:
    """``root/tokens/<name>-<key>``: the source's last path part, made safe, and a hash of ``built_from``."""
    key = hashlib.sha256(json.dumps(built_from, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source_name.rstrip("/*")).name or "corpus").strip("-.")
    return root / "tokens" / f"{name[:40] or 'corpus'}-{key}"


def _open(path: Path, built_from: dict) -> tuple[TokenStore | None, str | None]:
    """The store at ``path`` when it is whole and ``built_from`` that; else None and why (None: absent)."""
    if not path.is_dir():
        return None, None
    problem = folder_problem(path)
    if problem is not None:
        return None, problem
    info = json.loads((path / INFO).read_text())
    if {key: info.get(key) for key in built_from} != built_from:  # never another tokenizer's or corpus's
        return None, f"its {INFO} says it was built from something else"
    return TokenStore(path, info), None


def _build(path: Path, splits: dict[str, Documents], encoder: DocumentEncoder, built_from: dict,
           progress: bool) -> None:
    """Tokenize every split into a new store folder, verified, then renamed to ``path``. Each source is
    read once, its documents going to the files of their splits."""
    started = time.perf_counter()
    totals = {split: {"tokens": 0, "documents": 0, "characters": 0} for split in splits}
    counts = np.zeros(encoder.vocab_size, dtype=np.int64)
    with _store_errors(path), atomic_folder(path, shared=True, last=MANIFEST) as tmp, ExitStack() as files:
        out = {split: files.enter_context((tmp / f"{split}.bin").open("wb")) for split in splits}
        bar = files.enter_context(tqdm(desc="tokenizing", unit="tok", unit_scale=True, mininterval=1.0,
                                       disable=not progress))
        for ids, (split, documents, characters) in encode_batches(_batches(splits), encoder):
            out[split].write(ids.tobytes())
            if split == "train":
                counts += np.bincount(ids, minlength=len(counts))
            for key, value in zip(("tokens", "documents", "characters"), (len(ids), documents, characters),
                                  strict=True):
                totals[split][key] += value
            bar.update(len(ids))
        files.close()  # every token written before the folder is verified and renamed
        check_split_sizes({split: total["documents"] for split, total in totals.items()}, splits)
        np.save(tmp / COUNTS, counts)
        with (tmp / SOURCES).open("w") as out:
            out.writelines(_source_lines(splits))
        info = {**built_from, "dtype": encoder.dtype.str, "eos_id": encoder.eos_id,
                "vocab_size": encoder.vocab_size, "seconds": round(time.perf_counter() - started, 3),
                **{key: {split: total[key] for split, total in totals.items()}
                   for key in ("tokens", "documents", "characters")}}
        write_text_atomically(tmp / INFO, json.dumps(info, indent=1) + "\n")
        write_manifest(tmp)


def _source_lines(splits: dict[str, Documents]) -> Iterator[str]:
    """The lines of ``sources.jsonl``: every shard of every source of ``splits``, in order."""
    for docs in sources_of(splits):
        for shard in docs.shards:
            yield json.dumps({"source": docs.source, **shard.identity()}, sort_keys=True) + "\n"


def _batches(splits: dict[str, Documents]) -> Iterator[tuple[list[str], tuple[str, int, int]]]:
    """Batches of texts of one split each, with ``(split, documents, characters)``, reading every source
    of ``splits`` once (a split with files of its own is a source of its own)."""
    for source in sources_of(splits):
        wanted = {docs.split for docs in splits.values() if docs.shards is source.shards}
        pending, sizes = {split: [] for split in wanted}, dict.fromkeys(wanted, 0)
        for row in source.tagged():
            split = row["split"]
            if split not in wanted:
                continue
            pending[split].append(row["text"])
            sizes[split] += len(row["text"])
            if sizes[split] >= BATCH_BYTES:
                yield pending[split], (split, len(pending[split]), sizes[split])
                pending[split], sizes[split] = [], 0
        for split, texts in pending.items():
            if texts:
                yield texts, (split, len(texts), sizes[split])


@contextmanager
def _store_errors(path: Path) -> Iterator[None]:
    """A failed write or Ctrl-C while building ``path``, said in one line (what was written is gone)."""
    try:
        yield
    except KeyboardInterrupt as err:
        raise KeyboardInterrupt(f"interrupted while building the token store {str(path)!r}; "
                                "nothing of it was kept") from err
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS and not str(err.filename or "").startswith(str(path.parent)):
            raise  # not a write of the store's (a hub connection, say)
        free = shutil.disk_usage(path.parent).free / 2**20 if path.parent.exists() else 0.0
        full = " (the disk is full)" if err.errno == errno.ENOSPC else ""
        raise DataError(f"cannot write the token store {str(path)!r}: {err.strerror or err}{full}; "
                        f"{free:,.1f} MiB free on its disk; nothing of it was kept") from err


@contextmanager
def _locked(path: Path, shared: bool) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (shared or exclusive) while inside; it goes with the process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
