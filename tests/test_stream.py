"""Streamed corpora (kangpt.data.documents and BlockStream): a resume continues exactly where the stream
stopped without reading the documents before it, each process reads only its own files, and opening a
stream reads nothing. Counted by the files each run reads."""

import itertools
from pathlib import Path

import datasets
import pytest
import torch

import kangpt.data.documents as documents
import kangpt.data.packing as packing
from kangpt.data import (
    BlockStream,
    DocumentEncoder,
    document_splits,
    load_splits,
    load_tokenizer,
    share_of_process,
    stdlib_documents,
)

pytestmark = pytest.mark.usefixtures("isolated_caches")  # conftest: caches in the test's folder, offline

@pytest.fixture(scope="module")
def docs():
    return [d for d in stdlib_documents() if 800 < len(d) < 2_500][:24]


@pytest.fixture(scope="module")
def encoder(docs, tmp_path_factory):
    tokenizer = load_tokenizer("bpe", docs, vocab_size=300, cache_dir=str(tmp_path_factory.mktemp("bpe")))
    return DocumentEncoder(tokenizer)


@pytest.fixture
def corpus(docs, tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(text)
    return folder


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The .txt files read, in order, by anything in this process."""
    read = []
    texts = documents.TextFile.texts

    def counted(self):
        read.append(Path(self.path).name)
        return texts(self)

    monkeypatch.setattr(documents.TextFile, "texts", counted)
    monkeypatch.setattr(packing, "STREAM_BATCH_BYTES", 1)  # one document per encoded batch
    return read


def take(stream: BlockStream, count: int) -> list[tuple[torch.Tensor, dict]]:
    return list(itertools.islice(stream, count))


@pytest.mark.parametrize("at", [10, 100], ids=["first epoch", "third epoch"])
def test_a_resumed_stream_continues_exactly_and_reads_no_document_before_its_position(
        corpus, encoder, reads, at):
    train = document_splits(str(corpus), val_fraction=0.25)["train"]  # 18 documents, about 40 batches
    straight, read_by = [], []
    for batch in itertools.islice(BlockStream(train.stream(), encoder, block_size=64, batch_size=8), at + 12):
        straight.append(batch)
        read_by.append(len(reads))  # files read when the batch came out
    read_straight = list(reads)
    reads.clear()
    position = straight[at - 1][1]
    resumed = take(BlockStream(train.stream(), encoder, 64, 8, position=position), 12)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, straight[at:], strict=True))
    assert [p["epoch"] for _, p in resumed] == [p["epoch"] for _, p in straight[at:]]
    # One document an encoded batch, and the next one read while it is encoded: the position lies in
    # the file read last but one. The resumed stream reads that file again (datasets resumes within a
    # shard by reading it from its start), then the files after it, and no file before it.
    start = read_by[at - 1] - 2
    assert reads[: len(read_straight) - start] == read_straight[start:]
    assert len(reads) <= len(read_straight) - start + 1 and start > 0
    assert position["epoch"] == (0 if at == 10 else 2)


def test_each_process_reads_only_its_own_files(corpus, encoder, reads):
    train = document_splits(str(corpus), val_fraction=0.25)["train"]
    shares = []
    for rank in range(2):
        reads.clear()
        share = share_of_process(train.stream(), rank, 2)
        batches = take(BlockStream(share, encoder, 32, 2), 5)
        shares.append((set(reads), torch.cat([b for b, _ in batches])))
    assert not torch.equal(shares[0][1], shares[1][1])
    # Files (shards) go round the processes: 0, 2, 4, ... to the first, 1, 3, ... to the second; neither
    # reads the validation files (0, 4, 8, ...), whose one document each is held out.
    assert shares[0][0] and shares[0][0] <= {f"{i:03d}.txt" for i in range(2, 24, 4)}
    assert shares[1][0] and shares[1][0] <= {f"{i:03d}.txt" for i in range(1, 24, 2)}


def test_opening_a_stream_reads_no_file_and_splits_no_shard(corpus, reads, monkeypatch):
    split = []
    shard = datasets.IterableDataset.shard

    def counted(self, *args, **kwargs):
        split.append(1)
        return shard(self, *args, **kwargs)

    monkeypatch.setattr(datasets.IterableDataset, "shard", counted)
    streams = load_splits(str(corpus), val_fraction=0.25, test_fraction=0.25, streaming=True)
    assert reads == [] and split == [] and all(s.num_shards == 24 for s in streams.values())
    assert [row["text"] for row in streams["validation"]] == [(corpus / f"{i:03d}.txt").read_text()
                                                              for i in range(0, 24, 4)]
