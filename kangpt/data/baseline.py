"""The unigram baseline: the loss a language model must beat on packed token blocks."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from .errors import DataError
from .tokenizer import _BATCH_DOCS


def unigram_entropy(dataset_blocks_train, dataset_blocks_val, vocab_size: int) -> float:
    """Cross-entropy in nats/token of the validation tokens under the training unigram distribution.

    The unigram probabilities are add-one smoothed over ``vocab_size`` entries
    (``p(t) = (count(t) + 1) / (N + vocab_size)``), so every token has finite loss. A language model
    that learned anything must get a validation loss below this. Arguments are packed datasets, token
    arrays, or iterables of ``{"input_ids": ...}`` rows or of id sequences; use ``len(tokenizer)`` as
    ``vocab_size``.
    """
    if vocab_size < 1:
        raise DataError(f"vocab_size must be positive, got {vocab_size!r}")
    train = token_counts(dataset_blocks_train, vocab_size, "train")
    return unigram_entropy_of_counts(train, token_counts(dataset_blocks_val, vocab_size, "validation"))


def unigram_entropy_of_counts(train: np.ndarray, val: np.ndarray) -> float:
    """:func:`unigram_entropy` from the token counts of both splits (``vocab_size`` entries each)."""
    log_p = np.log(train + 1.0) - np.log(train.sum() + len(train))
    return float(-(val * log_p).sum() / val.sum())


def token_counts(blocks, vocab_size: int, which: str) -> np.ndarray:
    """How often each id in ``[0, vocab_size)`` occurs in ``blocks`` (as :func:`unigram_entropy` takes
    them; ``which`` names them in errors); a DataError for an id outside the vocabulary or no tokens."""
    if isinstance(blocks, Dataset):
        tables = blocks.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=_BATCH_DOCS)
        chunks: Iterable = (pc.list_flatten(table["input_ids"]).to_numpy() for table in tables)
    elif isinstance(blocks, np.ndarray):
        chunks = (blocks[start:start + (1 << 24)] for start in range(0, len(blocks), 1 << 24))
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
