"""A run's corpus: its splits tokenized with the run's tokenizer (into a token store, or as a stream),
what the run folder records of it, and the endless, resumable batches of training tokens of each process.

Without ``data.streaming`` the corpus is tokenized once into a token store on disk (the first process
of a machine builds it, the others wait and map it; a later run reuses it) and training reads blocks
from memory maps. With it, each process packs its share of the stream in a DataLoader worker, and
checkpoints hold every process's position in its stream.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Sampler

from ..data import (
    BlockStream,
    DataError,
    DocumentEncoder,
    Documents,
    Head,
    TokenBlocks,
    TokenStore,
    check_split_sizes,
    corpus_files,
    document_splits,
    load_tokenizer,
    share_of_process,
    stream_blocks,
    token_counts,
    token_store,
    tokenizer_sha256,
    unigram_entropy_of_counts,
)
from .run_config import DataConfig, TrainConfig


@dataclass
class Corpus:
    """Tokenizer, training blocks (this process's share of the stream when streaming), validation and
    test blocks (None without a test split), unigram baseline, and the token store (None when streaming)."""

    tokenizer: object
    train: TokenBlocks | BlockStream
    val: TokenBlocks
    test: TokenBlocks | None
    baseline: float
    store: TokenStore | None = None


def trained_on(data: DataConfig, tokenizer) -> dict:
    """What a run trains on, as its folder records it: the tokenizer's sha256 and the local corpus files
    (``{name: size}``, None for a built-in corpus or a hub dataset) of every source."""
    sources = {key: getattr(data, key) for key in ("dataset", "validation_dataset", "test_dataset")}
    return {"tokenizer_sha256": tokenizer_sha256(tokenizer),
            "corpus": {key: corpus_files(source) for key, source in sources.items() if source is not None}}


def load_corpus(data: DataConfig, train: TrainConfig, accelerator: Accelerator) -> Corpus:
    """Load documents, get the tokenizer and make the blocks of every split.

    The validation (and test) blocks are the first ``train.eval_blocks`` (all when None), the same in the
    same order on every process and in every run. The BPE is trained on the first
    ``data.tokenizer_documents`` training documents, by the first process (the others load it).
    """
    splits = corpus_splits(data)
    with accelerator.main_process_first():
        tokenizer, tokenizer_docs = run_tokenizer(data, train, splits)
    if data.streaming:
        return _streamed_corpus(data, train, splits, tokenizer, tokenizer_docs, accelerator)
    store = token_store(splits, tokenizer, progress=accelerator.is_local_main_process)
    blocks = store.blocks("train", data.block_size)
    held = {split: store.blocks(split, data.block_size, limit=train.eval_blocks) for split in splits
            if split != "train"}
    # The unigram distribution of the blocks trained on: the store's counts less the tokens after them.
    train_counts = store.train_counts() - np.bincount(store.tokens("train")[len(blocks) * data.block_size:],
                                                      minlength=len(tokenizer))
    val_counts = token_counts(held["validation"].used_tokens(), len(tokenizer), "validation")
    baseline = unigram_entropy_of_counts(train_counts, val_counts)
    return Corpus(tokenizer, blocks, held["validation"], held.get("test"), baseline, store)


def corpus_splits(data: DataConfig) -> dict[str, Documents]:
    """The run's splits, unread (:func:`kangpt.data.document_splits` of ``data``)."""
    return document_splits(
        data.dataset, name=data.name, text_field=data.text_field, val_fraction=data.val_fraction,
        test_fraction=data.test_fraction, validation_dataset=data.validation_dataset,
        test_dataset=data.test_dataset, max_documents=data.max_documents,
    )


def run_tokenizer(data: DataConfig, train: TrainConfig, splits: dict[str, Documents]) -> tuple[object, Head]:
    """The run's tokenizer and the training documents the BPE is trained on (the first
    ``data.tokenizer_documents``, read when iterated). A run that starts from a model folder keeps the
    folder's tokenizer unless another is named."""
    tokenizer_docs = splits["train"].head(data.tokenizer_documents)
    if next(iter(tokenizer_docs), None) is None:  # no training document: the whole corpus was read
        check_split_sizes({split: sum(1 for _ in docs) for split, docs in splits.items()}, splits)
    spec = train.init_from if train.init_from is not None and data.tokenizer == "bpe" else data.tokenizer
    return load_tokenizer(spec, tokenizer_docs, vocab_size=data.vocab_size), tokenizer_docs


def prepare_store(data: DataConfig, train: TrainConfig, progress: bool = True) -> TokenStore:
    """The token store of a run's corpus, built if there is none (what ``kangpt prepare`` does ahead of
    a run, and the run itself when it finds none)."""
    splits = corpus_splits(data)
    tokenizer, _ = run_tokenizer(data, train, splits)
    return token_store(splits, tokenizer, progress=progress)


def _streamed_corpus(data: DataConfig, train: TrainConfig, splits: dict[str, Documents], tokenizer,
                     tokenizer_docs: Head, accelerator: Accelerator) -> Corpus:
    """This process's share of the training stream; the first ``eval_blocks`` blocks of the held-out
    streams; the baseline of the BPE's sample of the training documents."""
    encoder = DocumentEncoder(tokenizer)
    held = {split: _first_blocks(docs, tokenizer, data.block_size, train.eval_blocks, split)
            for split, docs in splits.items() if split != "train"}
    share = share_of_process(splits["train"].stream(), accelerator.process_index, accelerator.num_processes)
    stream = BlockStream(share, encoder, data.block_size, train.batch_size)
    sample = stream_blocks(tokenizer_docs, tokenizer, data.block_size)
    val_counts = token_counts(held["validation"].used_tokens(), len(tokenizer), "validation")
    baseline = unigram_entropy_of_counts(token_counts(sample, len(tokenizer), "train"), val_counts)
    return Corpus(tokenizer, stream, held["validation"], held.get("test"), baseline)


def _first_blocks(docs: Documents, tokenizer, block_size: int, count: int | None, split: str) -> TokenBlocks:
    """The first ``count`` (all when None) blocks of a held-out split, read from its stream, in memory."""
    rows = itertools.islice(stream_blocks(docs.stream(), tokenizer, block_size), count)
    tokens = np.array([row["input_ids"] for row in rows], dtype=np.int64).reshape(-1)
    if len(tokens) == 0:
        raise DataError(f"the {split} documents hold no block of {block_size} tokens")
    return TokenBlocks(tokens, block_size)


class ShuffledForever(Sampler):
    """Indices ``0..n-1`` in a new seeded permutation every epoch, without end.

    Batch k is the same in every run with the same seed, so a resumed run skips k batches and
    continues exactly; the global RNG is never touched.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(self.n, generator=generator).tolist()


class StreamPositions:
    """Where every process's training stream stands: the position of the last batch each process took
    (:class:`~kangpt.data.BlockStream`). Registered for checkpointing, so a resumed run continues each
    stream where it stopped, without reading the documents before it again."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.mine: dict | None = None

    def state_dict(self) -> dict:
        """Every process's position (a collective call: all processes make it, as ``save_state`` does)."""
        return {"positions": gather_object([self.mine])}

    def load_state_dict(self, state: dict) -> None:
        """Take this process's position; a checkpoint of another number of processes is refused."""
        positions, processes = state["positions"], self.accelerator.num_processes
        if len(positions) != processes:
            raise DataError(f"the checkpoint holds the stream positions of {len(positions)} process(es); "
                            f"resume it with {len(positions)}, not {processes}")
        self.mine = positions[self.accelerator.process_index]


def train_batches(blocks: TokenBlocks | BlockStream, cfg: TrainConfig, accelerator: Accelerator, skip: int,
                  positions: StreamPositions | None = None) -> Iterator[torch.Tensor]:
    """Endless ``(batch_size, block_size)`` input_ids batches of this process: blocks of the store in a
    seeded order after skipping ``skip`` batches, or the stream from ``positions.mine`` (which then
    follows the batches taken)."""
    if isinstance(blocks, BlockStream):
        return _streamed_batches(blocks, positions)
    loader = DataLoader(
        blocks,
        batch_size=cfg.batch_size,
        sampler=ShuffledForever(len(blocks), cfg.seed),
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG, which dropout uses
    )
    loader = accelerator.skip_first_batches(accelerator.prepare(loader), skip)  # prepare: shards the batches
    return (batch["input_ids"] for batch in loader)


def _streamed_batches(stream: BlockStream, positions: StreamPositions) -> Iterator[torch.Tensor]:
    """The stream's batches, packed in one DataLoader worker while the model trains."""
    resumed = BlockStream(stream.docs, stream.encoder, stream.block_size, stream.batch_size, positions.mine)
    # Its own generator: the worker's seed would otherwise be drawn from the global RNG, which dropout uses.
    loader = DataLoader(resumed, batch_size=None, num_workers=1, worker_init_fn=_stream_worker,
                        generator=torch.Generator().manual_seed(0))
    with _tokenizers_parallelism("false"):  # the worker forked now neither warns nor uses our thread pool
        batches = iter(loader)
    try:
        for input_ids, position in batches:
            positions.mine = position
            yield input_ids
    finally:  # closed (the loop ended or failed): the worker stops now, not at exit (where it hangs)
        del batches


def _stream_worker(_worker_id: int) -> None:
    """The stream worker encodes on one thread (a machine's processes each have one), and leaves Ctrl-C
    and SIGTERM to the training process, which stops after its step and then ends the worker (closing
    its batches: the worker ignores the SIGTERM that would end it at the interpreter's exit)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def _tokenizers_parallelism(value: str) -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM`` set to ``value`` while inside (a process forked then inherits it)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
