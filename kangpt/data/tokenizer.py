"""Tokenizers: a byte-level BPE trained on the corpus and cached, or a pretrained tokenizer.

:func:`load_tokenizer` trains a GPT-2-style byte-level BPE whose only special token is ``<|endoftext|>``,
caches it keyed by a hash of its texts and settings (a damaged cache entry is retrained and replaced),
or loads any other tokenizer with ``AutoTokenizer``. Also here: reading the texts of documents
(a dataset's ``"text"`` column or an iterable), which training and packing share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..io.folders import atomic_folder
from ..messages import first_line
from .errors import DataError

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"
# Everything that determines the trained BPE besides its texts and vocabulary size (part of the cache key).
_BPE_SETTINGS = {"format": 1, "model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
                 "special_tokens": [EOT], "min_frequency": 2, "padding_side": "left"}
# A byte-level BPE holds the 256 bytes and EOT before its first merge. One rule, which run_config also
# checks when a run config is read, before any data is loaded.
MIN_BPE_VOCAB_SIZE = 257
BPE_VOCAB_SIZE_RULE = f"must be at least {MIN_BPE_VOCAB_SIZE} (256 bytes + {EOT})"
_BATCH_DOCS = 1000  # documents per tokenization batch


def load_tokenizer(
    spec: str, train_texts=None, *, vocab_size: int = 4096, cache_dir: str | None = None
) -> PreTrainedTokenizerFast:
    """Return a ``PreTrainedTokenizerFast`` with ``pad_token`` set (to EOS when it had none).

    ``spec == "bpe"`` trains a GPT-2-style byte-level BPE with ``vocab_size`` entries (fewer, with a
    logged warning, if the texts run out of merges) on ``train_texts`` (strings, or a dataset with a
    ``"text"`` column; one that can be iterated again is read twice, for the cache key and to train,
    and never held in memory), whose only special token ``<|endoftext|>`` is BOS, EOS, UNK and PAD. The
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
    if iter(train_texts) is train_texts:  # an iterator goes once: its texts are kept for a second pass
        train_texts = list(train_texts)
    key, count = _bpe_key(_iter_texts(train_texts), vocab_size)
    if count == 0:
        raise DataError("cannot train a BPE tokenizer: train_texts contains no text")
    path = cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}"
    tokenizer = _cached_bpe(path)
    if tokenizer is None:
        trained = _train_bpe(_iter_texts(train_texts), count, vocab_size)
        # Runs started together may train the same BPE at once: each writes its own whole entry.
        with atomic_folder(path, shared=True, last="tokenizer.json") as tmp:  # it marks a whole entry
            trained.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if len(tokenizer) < vocab_size:  # checked after loading, so a cached short BPE is reported too
        logger.warning("the trained BPE has %d tokens, fewer than vocab_size=%d: its %d training texts "
                       "ran out of merges (no pair of tokens within a word occurs %d or more times); "
                       "train it on more text or lower vocab_size",
                       len(tokenizer), vocab_size, count, _BPE_SETTINGS["min_frequency"])
    return tokenizer


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where kangpt caches what it builds from a corpus (BPEs, token stores): ``cache_dir``, else
    ``$KANGPT_CACHE``, else ``~/.cache/kangpt``."""
    return Path(cache_dir or os.environ.get("KANGPT_CACHE") or Path.home() / ".cache" / "kangpt")


def tokenizer_sha256(tokenizer) -> str:
    """The sha256 of a tokenizer's backend (its ``tokenizer.json``): what tells one tokenizer from another."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


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


def _bpe_key(texts: Iterable[str], vocab_size: int) -> tuple[str, int]:
    """The cache key of a BPE trained on ``texts``, and how many of them hold text."""
    digest = hashlib.sha256(json.dumps([_BPE_SETTINGS, vocab_size], sort_keys=True).encode())
    count = 0
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        count += bool(text)
    return digest.hexdigest()[:20], count


def _train_bpe(texts: Iterable[str], count: int, vocab_size: int) -> PreTrainedTokenizerFast:
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
    tokenizer.train_from_iterator(texts, trainer=trainer, length=count)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=EOT, clean_up_tokenization_spaces=False,
                                   padding_side="left")  # batched generation pads on the left
