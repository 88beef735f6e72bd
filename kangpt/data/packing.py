"""Packing documents into blocks of ``block_size`` tokens, in memory or as a stream.

Packing tokenizes every document without special tokens, appends the EOS token, concatenates
everything in order and cuts the stream into blocks of exactly ``block_size`` tokens (dropping the
remainder). Labels are not shifted: Hugging Face causal-LM models shift them internally, so pass
``labels=input_ids``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset
from datasets.table import InMemoryTable

from .errors import DataError
from .tokenizer import _BATCH_DOCS, _iter_texts, _text_column


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
