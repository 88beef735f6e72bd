"""A run's corpus: its splits packed into blocks with the run's tokenizer, what the run folder records
of it, and the endless, resumable stream of training batches of each process."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, Sampler

from ..data import (
    DataError,
    corpus_files,
    load_splits,
    load_tokenizer,
    pack_documents,
    stream_blocks,
    unigram_entropy,
)
from .run_config import DataConfig, TrainConfig


@dataclass
class Corpus:
    """Tokenizer, training blocks (this process's shard if streaming), validation and test blocks (None
    without a test split), unigram baseline."""

    tokenizer: object
    train: Dataset | IterableDataset
    val: Dataset
    test: Dataset | None
    baseline: float


def trained_on(data: DataConfig, tokenizer) -> dict:
    """What a run trains on, as its folder records it: the tokenizer's sha256 and the local corpus files
    (``{name: size}``, None for a built-in corpus or a hub dataset) of every source."""
    sources = {key: getattr(data, key) for key in ("dataset", "validation_dataset", "test_dataset")}
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    return {"tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
            "corpus": {key: corpus_files(source) for key, source in sources.items() if source is not None}}


def load_corpus(data: DataConfig, train: TrainConfig, accelerator: Accelerator) -> Corpus:
    """Load documents, get the tokenizer and pack both splits into ``data.block_size``-token blocks.

    The validation (and test) blocks are the same, in the same order, on every process and in every
    run. With ``data.streaming`` the training documents are sharded across processes, the BPE is
    trained on the first ``data.tokenizer_documents`` of them, and validation and test keep their first
    ``train.eval_blocks`` blocks.
    """
    splits = load_splits(
        data.dataset, name=data.name, text_field=data.text_field, val_fraction=data.val_fraction,
        test_fraction=data.test_fraction, validation_dataset=data.validation_dataset,
        test_dataset=data.test_dataset, streaming=data.streaming, max_documents=data.max_documents,
    )
    train_docs = splits["train"]
    if data.streaming:
        tokenizer_docs = list(itertools.islice(train_docs, data.tokenizer_documents))
    else:
        tokenizer_docs = train_docs.select(range(min(data.tokenizer_documents, len(train_docs))))
    # A run that starts from a model folder keeps the folder's tokenizer unless another is named.
    spec = train.init_from if train.init_from is not None and data.tokenizer == "bpe" else data.tokenizer
    with accelerator.main_process_first():  # the first process trains and caches the BPE, the others load it
        tokenizer = load_tokenizer(spec, tokenizer_docs, vocab_size=data.vocab_size)
    held_out = {split: _held_out_blocks(docs, tokenizer, data, train.eval_blocks, split)
                for split, docs in splits.items() if split != "train"}
    val, test = held_out["validation"], held_out.get("test")
    if data.streaming:
        rank, world_size = accelerator.process_index, accelerator.num_processes
        blocks = stream_blocks(split_dataset_by_node(train_docs, rank=rank, world_size=world_size), tokenizer,
                               data.block_size)
        sample_blocks = pack_documents(tokenizer_docs, tokenizer, data.block_size)
        baseline = unigram_entropy(sample_blocks, val, len(tokenizer))  # of the tokenizer's sample
    else:
        blocks = pack_documents(train_docs, tokenizer, data.block_size)
        baseline = unigram_entropy(blocks, val, len(tokenizer))
    return Corpus(tokenizer, blocks, val, test, baseline)


def _held_out_blocks(docs, tokenizer, data: DataConfig, eval_blocks: int | None, split: str) -> Dataset:
    """The first ``eval_blocks`` (all when None) packed blocks of a held-out split, in memory."""
    if isinstance(docs, IterableDataset):
        stream = stream_blocks(docs, tokenizer, data.block_size)
        blocks = Dataset.from_list(list(itertools.islice(stream, eval_blocks)))
        if len(blocks) == 0:
            raise DataError(f"the {split} documents hold no block of {data.block_size} tokens")
        return blocks
    try:
        blocks = pack_documents(docs, tokenizer, data.block_size)
    except DataError as err:
        raise DataError(f"{split} split: {err}") from err
    return blocks if eval_blocks is None else blocks.select(range(min(eval_blocks, len(blocks))))


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


def train_batches(blocks: Dataset | IterableDataset, cfg: TrainConfig, accelerator: Accelerator, skip: int):
    """Endless ``(batch_size, block_size)`` input_ids batches of this process, after skipping ``skip``."""
    if isinstance(blocks, IterableDataset):  # already this process's shard: read in order, epoch after epoch
        loader = DataLoader(blocks.with_format("torch"), batch_size=cfg.batch_size)
        return itertools.islice((batch["input_ids"] for batch in _repeat(loader)), skip, None)
    loader = DataLoader(
        blocks.with_format("torch"),
        batch_size=cfg.batch_size,
        sampler=ShuffledForever(len(blocks), cfg.seed),
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG, which dropout uses
    )
    loader = accelerator.skip_first_batches(accelerator.prepare(loader), skip)  # prepare: shards the batches
    return (batch["input_ids"] for batch in loader)


def _repeat(loader: DataLoader):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training data holds no block")
