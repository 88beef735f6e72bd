"""The token store (kangpt.data.store): what it holds, when it is reused or built again, faults while
building, two builders at once, memory that does not grow with the corpus; and ``kangpt prepare``."""

import json
import os
import pickle
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from training_runs import FILE_SIZE_LIMIT

import kangpt.data.encoding as encoding
import kangpt.data.store as store_module
from kangpt.commands import main
from kangpt.data import (
    DataError,
    document_splits,
    load_tokenizer,
    pack_documents,
    stdlib_documents,
    token_store,
)
from kangpt.io.manifest import MANIFEST

pytestmark = pytest.mark.usefixtures("isolated_caches")  # conftest: caches in the test's folder, offline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def docs():
    """Thirty small standard-library sources, one with a literal end-of-text inside."""
    sources = [d for d in stdlib_documents() if 1_000 < len(d) < 4_000][:30]
    return [sources[0] + "\n# <|endoftext|> is text here\n", *sources[1:]]


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    return load_tokenizer("bpe", docs, vocab_size=400, cache_dir=str(tmp_path_factory.mktemp("bpe")))


def write_corpus(folder: Path, texts: list[str]) -> Path:
    """One .txt file per document, named so that their order is the list's."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"{i:05d}.txt").write_text(text)
    return folder


def stores(tmp_path: Path) -> list[Path]:
    """The store folders (and anything half-written) in the test's cache; not the lock files."""
    return [p for p in (tmp_path / "kangpt-cache" / "tokens").iterdir() if not p.name.endswith(".lock")]


def reference_tokens(texts: list[str], tokenizer) -> list[int]:
    """Independent reference: transformers' own call per document (a literal EOT is text), then EOS."""
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    return ids


def test_a_store_holds_each_splits_tokens_in_two_bytes_each_and_says_what_it_was_built_from(
        docs, tokenizer, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs)
    splits = document_splits(str(corpus), val_fraction=0.2, test_fraction=1 / 3)
    store = token_store(splits, tokenizer, progress=False)
    assert store.built and store.path.parent == tmp_path / "kangpt-cache" / "tokens"
    for split, split_docs in splits.items():
        tokens = store.tokens(split)
        assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
        assert tokens.tolist() == reference_tokens(list(split_docs), tokenizer)
        assert (store.path / f"{split}.bin").stat().st_size == 2 * len(tokens)
    # One document a file: file i validates when i % 5 == 0, else tests when i % 3 == 1.
    held = {i: "validation" if i % 5 == 0 else "test" if i % 3 == 1 else "train" for i in range(30)}
    assert {split: list(d) for split, d in splits.items()} == {
        split: [docs[i] for i in range(30) if held[i] == split] for split in ("train", "validation", "test")}
    info = json.loads((store.path / "store.json").read_text())
    assert info["tokenizer_sha256"] == store_module.tokenizer_sha256(tokenizer)
    assert info["documents"] == {"train": 16, "validation": 6, "test": 8}
    shards = [json.loads(line) for line in (store.path / "sources.jsonl").read_text().splitlines()]
    assert {shard["source"] for shard in shards} == {str(corpus)}
    files = sorted(corpus.iterdir())
    assert [(s["file"], s["size"]) for s in shards] == [(str(p), p.stat().st_size) for p in files]
    counts = np.bincount(np.asarray(store.tokens("train")), minlength=len(tokenizer))
    assert store.train_counts().tolist() == counts.tolist()


def test_splits_with_files_of_their_own_go_to_their_own_tokens(docs, tokenizer, tmp_path):
    train = write_corpus(tmp_path / "train", docs[:20])
    val = write_corpus(tmp_path / "val", docs[20:25])
    test = write_corpus(tmp_path / "test", docs[25:])
    splits = document_splits(str(train), validation_dataset=str(val), test_dataset=str(test))
    store = token_store(splits, tokenizer, progress=False)
    for split, texts in (("train", docs[:20]), ("validation", docs[20:25]), ("test", docs[25:])):
        assert store.tokens(split).tolist() == reference_tokens(texts, tokenizer), split
    lines = (store.path / "sources.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["source"] for line in lines}) == sorted(map(str, (train, val, test)))


def test_blocks_are_pack_documents_blocks_read_from_the_memory_map(docs, tokenizer, tmp_path):
    store = token_store(document_splits(str(write_corpus(tmp_path / "c", docs))), tokenizer, progress=False)
    train = document_splits(str(tmp_path / "c"))["train"]
    blocks = store.blocks("train", 61)
    expected = torch.tensor(pack_documents(list(train), tokenizer, 61)["input_ids"])
    assert len(blocks) == len(expected) and torch.equal(blocks[:]["input_ids"], expected)
    assert torch.equal(blocks[3]["input_ids"], expected[3])
    assert torch.equal(blocks[-1]["input_ids"], expected[-1])
    assert blocks[2:5]["input_ids"].shape == (3, 61) and len(store.blocks("train", 61, limit=4)) == 4
    copy = pickle.loads(pickle.dumps(blocks))  # a DataLoader worker's: the file mapped again, not copied
    assert len(pickle.dumps(blocks)) < 1000 and torch.equal(copy[:]["input_ids"], expected)
    with pytest.raises(DataError, match="the validation split holds only .* fewer than one block of 100000"):
        store.blocks("validation", 100_000)


def test_a_second_run_reuses_the_store_without_tokenizing_a_document(docs, tokenizer, tmp_path, monkeypatch):
    corpus = str(write_corpus(tmp_path / "corpus", docs))
    first = token_store(document_splits(corpus), tokenizer, progress=False)

    def no_tokenizing(self, texts):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(encoding.DocumentEncoder, "__call__", no_tokenizing)
    again = token_store(document_splits(corpus), tokenizer, progress=False)
    assert again.path == first.path and not again.built


def test_another_corpus_tokenizer_or_split_makes_another_store(docs, tokenizer, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs)
    first = token_store(document_splits(str(corpus)), tokenizer, progress=False).path
    other_split = token_store(document_splits(str(corpus), val_fraction=0.1), tokenizer, progress=False).path
    other_tokenizer = load_tokenizer("bpe", docs[:20], vocab_size=300, cache_dir=str(tmp_path / "bpe2"))
    by_other = token_store(document_splits(str(corpus)), other_tokenizer, progress=False).path
    (corpus / "00003.txt").write_text(docs[3] + "# one more line\n")
    changed = token_store(document_splits(str(corpus)), tokenizer, progress=False)
    assert len({first, other_split, by_other, changed.path}) == 4 and changed.built
    assert changed.tokens("train").tolist() != token_store(document_splits(str(corpus)), other_tokenizer,
                                                           progress=False).tokens("train").tolist()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no manifest", "other tokenizer"])
def test_a_damaged_or_half_written_store_is_never_read_and_is_built_again(damage, docs, tokenizer, tmp_path,
                                                                        caplog):
    splits = document_splits(str(write_corpus(tmp_path / "corpus", docs)))
    store = token_store(splits, tokenizer, progress=False)
    expected = store.tokens("train").tolist()
    train_bin, info = store.path / "train.bin", store.path / "store.json"
    if damage == "truncated":
        train_bin.write_bytes(train_bin.read_bytes()[:-2])
    elif damage == "flipped byte":
        data = bytearray(train_bin.read_bytes())
        data[10] ^= 0xFF
        train_bin.write_bytes(bytes(data))
    elif damage == "no manifest":  # what a writer that died before its last file leaves
        (store.path / MANIFEST).unlink()
    else:  # a store whose own record says another tokenizer made it: never read as this one's
        record = json.loads(info.read_text())
        record["tokenizer_sha256"] = "0" * 64
        info.write_text(json.dumps(record))
        (store.path / MANIFEST).unlink()  # and a manifest that matches it
        store_module.write_manifest(store.path)
    with caplog.at_level("WARNING", logger="kangpt.data"):
        again = token_store(splits, tokenizer, progress=False)
    assert again.built and again.tokens("train").tolist() == expected
    reason = {"truncated": "train.bin has", "flipped byte": "train.bin differs from its manifest",
              "no manifest": "it has no manifest.json", "other tokenizer": "built from something else"}
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if reason[damage] in m and "building it again" in m], said


def test_ctrl_c_while_building_leaves_no_store_and_says_so(docs, tokenizer, tmp_path, monkeypatch):
    splits = document_splits(str(write_corpus(tmp_path / "corpus", docs * 4)))
    calls = []
    encode = encoding.DocumentEncoder.__call__

    def interrupted_at_the_second_batch(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(self, texts)

    monkeypatch.setattr(store_module, "BATCH_BYTES", 20_000)
    monkeypatch.setattr(encoding.DocumentEncoder, "__call__", interrupted_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt, match="interrupted while building the token store .*nothing of it"):
        token_store(splits, tokenizer, progress=False)
    assert stores(tmp_path) == []


# `kangpt prepare`, Ctrl-C'd (SIGINT to itself, as a terminal sends it) while it encodes its first batch
# and reads the second. As in a terminal, SIGINT raises KeyboardInterrupt: a suite started in the
# background of a script inherits SIGINT ignored, and the signal would be lost (the build ran to its end).
PREPARE_INTERRUPTED = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import kangpt.data.store as store
batches = store._batches
def interrupted(splits):
    for n, batch in enumerate(batches(splits)):
        if n == 1:  # while the first batch encodes
            os.kill(os.getpid(), signal.SIGINT)
        yield batch
store._batches, store.BATCH_BYTES = interrupted, 20_000
from kangpt.commands import main
sys.exit(main(["prepare", *sys.argv[1:]]))
"""


def test_ctrl_c_while_prepare_builds_is_one_line_exit_130_and_no_store(docs, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs * 8)
    env = {**os.environ, "KANGPT_CACHE": str(tmp_path / "kangpt-cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", PREPARE_INTERRUPTED, f"--data.dataset={corpus}",
                             "--data.vocab_size=300"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 130, result.stderr[-2000:]
    assert re.fullmatch(r"error: interrupted while building the token store '.*/tokens/corpus-[0-9a-f]{16}'; "
                        "nothing of it was kept", result.stderr.splitlines()[-1])
    assert stores(tmp_path) == []


def test_a_failed_write_while_building_is_one_line_and_leaves_no_store(docs, tmp_path):
    """A file-size limit stops the write of train.bin as a full disk would (EFBIG for ENOSPC)."""
    corpus = write_corpus(tmp_path / "corpus", docs * 8)
    env = {**os.environ, "KANGPT_CACHE": str(tmp_path / "kangpt-cache"), "HF_HUB_OFFLINE": "1",
           "FILE_SIZE_LIMIT": "60000"}  # the BPE's files fit, the tokens do not
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, "-m", "kangpt.commands", "prepare",
                             f"--data.dataset={corpus}", "--data.vocab_size=300"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(r"error: cannot write the token store '.*/kangpt-cache/tokens/corpus-[0-9a-f]{16}': "
                        r"File too large; [\d,.]+ MiB free on its disk; nothing of it was kept", last), last
    assert stores(tmp_path) == []


def test_memory_while_building_and_opening_does_not_grow_with_the_corpus(docs, tokenizer, tmp_path,
                                                                         monkeypatch):
    """Python's allocations (numpy's included) at their peak, for three .jsonl files of the documents and
    for the same files holding them 16 times over: 16 times the text, in as many files."""
    monkeypatch.setattr(store_module, "BATCH_BYTES", 16_384)

    def peak(copies: int) -> int:
        corpus = tmp_path / f"x{copies}"
        corpus.mkdir()
        for part in range(3):
            rows = [{"text": doc} for doc in docs[part::3] * copies]
            (corpus / f"{part}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        splits = document_splits(str(corpus), val_fraction=0.5)
        tracemalloc.start()
        store = token_store(splits, tokenizer, progress=False)
        blocks = store.blocks("train", 64)
        [blocks[i] for i in range(0, len(blocks), 7)]
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert sum(store.info["characters"].values()) == copies * sum(map(len, docs))
        return high

    small, large = peak(1), peak(16)
    assert large < 1.25 * small, (small, large)  # the old packer held every token in memory


def test_two_builders_at_once_make_one_store(docs, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs * 20)
    env = {**os.environ, "KANGPT_CACHE": str(tmp_path / "kangpt-cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "kangpt.commands", "prepare", f"--data.dataset={corpus}",
            "--data.vocab_size=300", "--data.tokenizer_documents=20"]
    builders = [subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    outputs = [builder.communicate(timeout=300) for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0], outputs
    said = sorted(out.split(": ")[1].split(" in ")[0] for out, _ in outputs)
    assert said == ["built", "found"], outputs
    assert len(stores(tmp_path)) == 1 and store_module.folder_problem(stores(tmp_path)[0]) is None


def test_prepare_prints_where_the_store_is_its_tokens_bytes_and_time(docs, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", docs)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": str(corpus), "vocab_size": 300,
                                               "val_fraction": 0.1}}))
    assert main(["prepare", str(config)]) == 0
    first = capsys.readouterr().out.splitlines()
    store = Path(first[0].split("token store ")[1].split(":")[0])
    info = json.loads((store / "store.json").read_text())
    assert first[0].endswith(f"built in {first[0].split('built in ')[1]}") and "s" in first[0]
    tokens = info["tokens"]
    assert first[1].startswith(f"train {tokens['train']:,} tokens (27 documents), validation "
                               f"{tokens['validation']:,} tokens (3 documents); ")
    assert "bytes per token" in first[1] and "MiB on disk" in first[1]
    assert main(["prepare", str(config)]) == 0
    assert "found in" in capsys.readouterr().out
    assert main(["prepare", str(config), "--data.streaming=true"]) == 1
    assert "error: data.streaming is true" in capsys.readouterr().err
