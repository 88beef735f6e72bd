"""Token ids of documents as packing joins them, encoded on all cores into flat numpy arrays.

Every packer of the pipeline (the token store, a stream, :func:`~kangpt.data.packing.pack_documents`)
encodes through :class:`DocumentEncoder`: a document is encoded without special tokens added (a
literal ``<|endoftext|>`` inside it is text, not a document boundary) and followed by the EOS token.
It calls the tokenizer's Rust backend on a batch of documents at once, which spreads the batch over the
cores the process may use; :func:`encode_batches` reads the next batch while one is being encoded.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer

from .errors import DataError

Tag = TypeVar("Tag")
BATCH_BYTES = 1 << 20  # text per encoded batch: enough for every core, little to hold


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a ``vocab_size``-entry vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class DocumentEncoder:
    """``encoder(texts)``: the token ids of ``texts``, each document followed by EOS, in one flat array
    of :func:`token_dtype` (2 bytes per token for vocabularies of up to 65,536 entries)."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no EOS token")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no fast (Rust) backend to encode with")
        # A copy: transformers sets truncation and padding on its backend when a call asks for them.
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = True  # what split_special_tokens=True asks of transformers
        self.eos_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        self.dtype = token_dtype(self.vocab_size)

    def __call__(self, texts: list[str]) -> np.ndarray:
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        eos = (self.eos_id,)
        ids = itertools.chain.from_iterable(itertools.chain(encoding.ids, eos) for encoding in encodings)
        return np.fromiter(ids, dtype=self.dtype)


def text_batches(texts: Iterable[str], max_bytes: int = BATCH_BYTES) -> Iterator[list[str]]:
    """``texts`` in lists of about ``max_bytes`` of text (at least one document each)."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_batches(batches: Iterable[tuple[list[str], Tag]], encoder: DocumentEncoder
                   ) -> Iterator[tuple[np.ndarray, Tag]]:
    """``(ids, tag)`` of each ``(texts, tag)`` of ``batches``, in order; the next batch is read (in this
    thread) while one is encoded (in another; the backend releases the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kangpt-encode") as pool:
        pending = None
        for texts, tag in batches:
            encoding = pool.submit(encoder, texts)
            if pending is not None:
                yield pending[0].result(), pending[1]
            pending = (encoding, tag)
        if pending is not None:
            yield pending[0].result(), pending[1]
