"""Packing documents into blocks of ``block_size`` tokens: in memory, as a stream, or as a resumable
stream of training batches.

Packing encodes every document (:class:`~kangpt.data.encoding.DocumentEncoder`: no special tokens, a
literal ``<|endoftext|>`` is text), appends the EOS token, concatenates everything in order and cuts
the stream into blocks of exactly ``block_size`` tokens. Labels are not shifted: Hugging Face
causal-LM models shift them internally, so pass ``labels=input_ids``. (A corpus tokenized once for
good is a token store, :mod:`.store`.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, IterableDataset
from datasets.table import InMemoryTable

from .encoding import DocumentEncoder, encode_batches, text_batches
from .errors import DataError
from .tokenizer import _iter_texts

STREAM_BATCH_BYTES = 1 << 16  # text per encoded batch of a stream: its position holds what is left of one


def pack_documents(docs, tokenizer, block_size: int) -> Dataset:
    """Tokenize ``docs`` and pack them into a ``Dataset`` of ``block_size``-token ``"input_ids"`` rows.

    The documents are concatenated in order, each followed by EOS, and cut into non-overlapping
    blocks, dropping the final partial block. ``docs`` is a dataset with a ``"text"`` column or an
    iterable of strings. The blocks are held in memory (int64, usable as ``labels`` too): for a
    corpus of any size, use a token store.
    """
    _check_block_size(block_size)
    if isinstance(docs, IterableDataset):
        raise DataError("pack_documents needs a map-style dataset; use stream_blocks for an IterableDataset")
    encoder = DocumentEncoder(tokenizer)
    batches = ((batch, None) for batch in text_batches(_iter_texts(docs)))
    encoded = [ids for ids, _ in encode_batches(batches, encoder)]
    tokens = np.concatenate([np.empty(0, encoder.dtype), *encoded])
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        raise DataError(f"only {len(tokens)} tokens (with EOS), fewer than one block of {block_size}")
    values = pa.array(tokens[:n_blocks * block_size].astype(np.int64))
    blocks = pa.FixedSizeListArray.from_arrays(values, block_size)
    return Dataset(InMemoryTable(pa.table({"input_ids": blocks})))


def stream_blocks(docs, tokenizer, block_size: int) -> IterableDataset:
    """Pack a stream of documents like :func:`pack_documents`, lazily.

    ``docs`` is an ``IterableDataset`` (or any iterable) of ``{"text": ...}`` rows or strings. The
    result is an ``IterableDataset`` yielding ``{"input_ids": [block_size int64 ids]}``; it is a
    single shard, so iterate it in the main process or one DataLoader worker.
    """
    _check_block_size(block_size)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"), length=block_size)})
    # One shard holding the whole stream: `datasets` would treat a list argument as a list of shards.
    kwargs = {"shards": [docs], "encoder": DocumentEncoder(tokenizer), "block_size": block_size}
    return IterableDataset.from_generator(_generate_blocks, features=features, gen_kwargs=kwargs)


def _generate_blocks(shards: list, encoder: DocumentEncoder, block_size: int) -> Iterator[dict]:
    texts = (text for docs in shards for text in _iter_texts(docs))
    batches = ((batch, None) for batch in text_batches(texts, STREAM_BATCH_BYTES))
    carry = np.empty(0, encoder.dtype)
    for ids, _ in encode_batches(batches, encoder):
        carry = np.concatenate([carry, ids])
        end = len(carry) - len(carry) % block_size
        for start in range(0, end, block_size):
            yield {"input_ids": carry[start:start + block_size].astype(np.int64).tolist()}
        carry = carry[end:]


class BlockStream(torch.utils.data.IterableDataset):
    """Endless ``(batch_size, block_size)`` int64 batches packed from a stream of documents, epoch after
    epoch, each yielded with the stream's position after it.

    ``docs`` is a ``datasets`` stream of ``{"text": ...}`` rows (one process's share). A position is
    ``{"epoch", "documents": docs.state_dict() after the last document read, "tokens": the bytes of the
    token ids of the documents read not yet yielded}``; ``BlockStream(..., position=p)`` continues
    exactly after the batch that ``p`` came with: ``datasets`` skips the shards before its document
    unread (and reads the shard it lies in from its start). Tokens left at the end of an epoch open the
    next one. Meant for one DataLoader worker (``batch_size=None``), so that encoding
    overlaps training.
    """

    def __init__(self, docs: IterableDataset, encoder: DocumentEncoder, block_size: int, batch_size: int,
                 position: dict | None = None):
        _check_block_size(block_size)
        self.docs, self.encoder, self.position = docs, encoder, position
        self.block_size, self.batch_size = block_size, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        position = self.position or {"epoch": 0, "documents": None, "tokens": b""}
        epoch, state = position["epoch"], position["documents"]
        carry = np.frombuffer(position["tokens"], self.encoder.dtype)
        size = self.batch_size * self.block_size
        while True:
            read = False
            for ids, after in encode_batches(self._text_batches(self._documents_from(state)), self.encoder):
                read = True
                carry = np.concatenate([carry, ids])
                while len(carry) >= size:
                    batch, carry = carry[:size], carry[size:]
                    batch = torch.from_numpy(batch.astype(np.int64).reshape(self.batch_size, self.block_size))
                    # Bytes: a DataLoader would make an array a tensor (one all_gather_object cannot take).
                    yield batch, {"epoch": epoch, "documents": after, "tokens": carry.tobytes()}
            if not read and state is None:
                raise DataError("the training data holds no document")
            epoch, state = epoch + 1, None

    def _documents_from(self, state: dict | None) -> IterableDataset:
        """The documents, from the start or (a copy) from the position ``state``."""
        if state is None:
            return self.docs
        docs = copy.deepcopy(self.docs)
        docs.load_state_dict(state)
        return docs

    @staticmethod
    def _text_batches(docs: IterableDataset) -> Iterable[tuple[list[str], dict]]:
        """Batches of texts of ``docs``, each with the position of ``docs`` after its last document."""
        for batch in text_batches((row["text"] for row in docs), STREAM_BATCH_BYTES):
            yield batch, docs.state_dict()


def _check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
