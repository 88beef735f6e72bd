"""Tests for kangpt.data: corpora, splits, tokenizers, packing and the unigram baseline (offline)."""

import errno
import inspect
import json
import json.decoder
import logging
import math
import os
import sysconfig
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import kangpt.data as data
import kangpt.training.run_dir as run_dir
from kangpt.data import (
    DataError,
    load_documents,
    load_splits,
    load_tokenizer,
    pack_documents,
    pydoc_topics_documents,
    stdlib_documents,
    stream_blocks,
    unigram_entropy,
)

EOT = "<|endoftext|>"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Keep the kangpt and `datasets` caches out of the home directory; never touch the network."""
    monkeypatch.setenv("KANGPT_CACHE", str(tmp_path / "kangpt-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def small_docs():
    """A few small, varied stdlib sources."""
    docs = [d for d in stdlib_documents() if 2_000 < len(d) < 6_000]
    return docs[:12]


@pytest.fixture(scope="module")
def tokenizer(small_docs, tmp_path_factory):
    return load_tokenizer("bpe", small_docs, vocab_size=320, cache_dir=str(tmp_path_factory.mktemp("tok")))


def reference_stream(docs, tokenizer):
    """Independent packing reference: per-document encode (a literal EOT is text) + EOS, concatenated."""
    ids = []
    for doc in docs:
        ids += tokenizer.encode(doc, add_special_tokens=False, split_special_tokens=True)
        ids.append(tokenizer.eos_token_id)
    return ids


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def texts(ds):
    return [row["text"] for row in ds]


# ---------------------------------------------------------------------------------------------
# Corpus


def test_stdlib_documents_known_source_deterministic_and_no_tests():
    docs = stdlib_documents()
    assert len(docs) > 300 and all(isinstance(d, str) and d.strip() for d in docs)
    assert docs == stdlib_documents() and len(set(docs)) == len(docs)
    decoder, encoder = inspect.getsource(json.decoder), inspect.getsource(json.encoder)
    assert decoder in docs and encoder in docs
    assert docs.index(decoder) < docs.index(encoder)  # sorted by relative path

    root = Path(sysconfig.get_paths()["stdlib"])
    test_dirs = [root / "test", root / "unittest" / "test", root / "idlelib" / "idle_test",
                 root / "lib2to3" / "tests"]
    test_sources = [p.read_text("utf-8", "replace")
                    for d in test_dirs if d.is_dir() for p in d.rglob("test_*.py")]
    if not test_sources:
        pytest.skip("this Python installation ships no test suites")
    assert not set(test_sources) & set(docs)


def test_stdlib_documents_leave_out_generated_data_but_keep_codec_code():
    import encodings.cp1252
    import encodings.idna
    import encodings.punycode
    import encodings.utf_8
    import html.entities
    import pydoc_data.topics
    import stringprep

    docs = set(stdlib_documents())
    for table in (encodings.cp1252, html.entities, pydoc_data.topics, stringprep):
        assert inspect.getsource(table) not in docs, table.__name__
    for code in (encodings.idna, encodings.punycode, encodings.utf_8, json.decoder):
        assert inspect.getsource(code) in docs, code.__name__
    assert not any("0x00e9 -> LATIN SMALL LETTER E WITH ACUTE" in doc for doc in docs)  # no codec table left


@pytest.mark.parametrize(
    "line, is_entry",
    [
        ("    0x00e9: 'LATIN SMALL LETTER E WITH ACUTE',  # é", True),
        ("    '\\x00'     #  0x00 -> NULL", True),
        ("    (-1, +2.5e3, 0xFF, 1_000, 3j), [b'a', r\"b\\\\\", u'c'],", True),
        ("    '#', 1,", True),  # a "#" inside a string starts no comment
        ("    }", False),
        ("    x = 1", False),
        ("    f(1, 2)", False),
        ("    'a' + b", False),
        ("    'a' if c else 'b',", False),
        ("    f'{x}',", False),
        ("    '''", False),
        ("    an ordinary line of a docstring: 1, 2", False),
    ],
)
def test_table_entry_lines(line, is_entry):
    assert data._count_table_lines(line) == ((1, 0) if is_entry else (0, 1))
    with_comments = f"# comment\n\n   \n{line}\n    # another"  # blank and comment lines count as neither
    assert data._count_table_lines(with_comments) == data._count_table_lines(line)


def test_generated_data_rule_on_synthetic_sources():
    entry, code = "    0x41: 'A',  # LATIN CAPITAL LETTER A\n", "    y = f(x)\n"
    assert data._is_generated_data("# Auto-generated by Tools/make_tables.py\nX = 1\n")
    assert data._is_generated_data('"""Tables.\n\nThis file is automatically generated.\n"""\nX = 1\n')
    assert data._is_generated_data("# DO NOT EDIT\nX = 1\n")
    assert not data._is_generated_data("\n" * 5 + "# auto-generated below\nX = 1\n")  # not in lines 1-5
    assert not data._is_generated_data("# checks the generated code\nX = 1\n")  # "generated" alone is no mark
    assert data._is_generated_data("TABLE = {\n" + entry * 80 + "}\n" + code * 18)  # 80 of 100 lines
    assert not data._is_generated_data("TABLE = {\n" + entry * 79 + "}\n" + code * 19)  # 79 of 100
    assert data._is_generated_data(entry * 50)
    assert not data._is_generated_data(entry * 49)  # too short to be a table
    docstring = '"""\n' + "A line of text.\n" * 30 + '"""\n'  # 32 lines of code
    assert not data._is_generated_data(docstring + entry * 100)  # 100 of 132


def test_stdlib_split_is_every_kth_document_and_deterministic():
    expected = stdlib_documents()[:25]
    train, val = load_documents("stdlib", val_fraction=0.1, max_documents=25)
    assert isinstance(train, datasets.Dataset) and train.column_names == ["text"]
    assert texts(val) == expected[0::10]
    assert texts(train) == [d for i, d in enumerate(expected) if i % 10]
    train2, val2 = load_documents("stdlib", val_fraction=0.1, max_documents=25)
    assert texts(train2) == texts(train) and texts(val2) == texts(val)
    full_train, full_val = load_documents("stdlib")  # the default 1% split of the whole corpus
    assert len(full_val) == math.ceil(len(stdlib_documents()) / 100)
    assert not set(texts(full_train)) & set(texts(full_val))
    assert len(full_train) + len(full_val) == len(stdlib_documents())


def test_stdlib_streaming_matches_map_style_and_shards_across_ranks():
    train, val = load_documents("stdlib", val_fraction=0.25, max_documents=10)
    s_train, s_val = load_documents("stdlib", val_fraction=0.25, max_documents=10, streaming=True)
    assert isinstance(s_train, datasets.IterableDataset)
    assert texts(s_train) == texts(train) and texts(s_val) == texts(val)
    shards = [load_documents("stdlib", val_fraction=0.25, max_documents=10, streaming=True,
                             rank=rank, world_size=2) for rank in range(2)]
    parts = [texts(shard[0]) for shard in shards]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(texts(train))


def test_test_split_is_held_out_disjoint_from_validation_map_style_and_streamed():
    expected = stdlib_documents()[:40]
    splits = load_splits("stdlib", val_fraction=0.1, test_fraction=0.2, max_documents=40)
    assert list(splits) == ["train", "validation", "test"]
    assert texts(splits["validation"]) == expected[0::10]
    assert texts(splits["test"]) == [d for i, d in enumerate(expected) if i % 5 == 2 and i % 10]  # r = 5 // 2
    assert texts(splits["train"]) == [d for i, d in enumerate(expected) if i % 10 and i % 5 != 2]
    streamed = load_splits("stdlib", val_fraction=0.1, test_fraction=0.2, max_documents=40, streaming=True)
    assert {k: texts(v) for k, v in streamed.items()} == {k: texts(v) for k, v in splits.items()}
    # a stride that meets validation's: document 10 is validation's, never test's
    overlap = load_splits("stdlib", val_fraction=0.1, test_fraction=0.2, max_documents=40)
    assert not set(texts(overlap["validation"])) & set(texts(overlap["test"]))
    # without a test fraction nothing changes: the same two splits as load_documents
    train, val = load_documents("stdlib", val_fraction=0.1, max_documents=40)
    assert list(load_splits("stdlib", val_fraction=0.1, max_documents=40)) == ["train", "validation"]
    assert texts(val) == expected[0::10] and len(texts(train)) == 36


def test_local_validation_and_test_files_replace_the_hold_out(tmp_path):
    for i in range(6):
        write(tmp_path / "train" / f"{i}.txt", f"train {i}\n")
    write(tmp_path / "val.txt", "validation text\n")
    write(tmp_path / "held" / "a.txt", "test a\n")
    write(tmp_path / "held" / "b.txt", "test b\n")
    splits = load_splits(str(tmp_path / "train"), validation_dataset=str(tmp_path / "val.txt"),
                         test_dataset=str(tmp_path / "held"))
    assert texts(splits["train"]) == [f"train {i}\n" for i in range(6)]  # nothing held out of training
    assert texts(splits["validation"]) == ["validation text\n"]
    assert texts(splits["test"]) == ["test a\n", "test b\n"]
    only_test = load_splits(str(tmp_path / "train"), val_fraction=0.5, test_dataset=str(tmp_path / "held"))
    assert texts(only_test["validation"]) == ["train 0\n", "train 2\n", "train 4\n"]
    with pytest.raises(DataError, match="nowhere"):
        load_splits(str(tmp_path / "train"), test_dataset=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="test_fraction"):
        load_splits("stdlib", test_fraction=0.6)
    with pytest.raises(DataError, match="2 document.*at least 3 are needed to hold out validation and test"):
        load_splits(str(tmp_path / "held"), val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="6 document.*no train document is left"):  # 0, 2, 4 | 1, 3, 5
        load_splits(str(tmp_path / "train"), val_fraction=0.5, test_fraction=0.5)


def test_hub_test_split_is_the_test_split_and_validation_falls_back_to_it_without_one(monkeypatch):
    own = {"train": datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)]}).to_iterable_dataset(),
           "test": datasets.Dataset.from_dict({"text": ["the test"]}).to_iterable_dataset()}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.IterableDatasetDict(own))
    train, val = load_documents("someone/corpus")  # no validation split: the test split validates
    assert texts(val) == ["the test"] and len(train) == 10
    splits = load_splits("someone/corpus", val_fraction=0.5, test_fraction=0.1)
    assert texts(splits["test"]) == ["the test"]  # the source's own test split ...
    assert texts(splits["validation"]) == [f"t{i}" for i in range(0, 10, 2)]  # ... and validation held out


def test_pydoc_topics_corpus_is_english_paragraphs_on_every_machine():
    docs = pydoc_topics_documents()
    from pydoc_data.topics import topics

    assert len(docs) > 1000 and all(d.strip() and "\n\n" not in d for d in docs)
    assert sum(map(len, docs)) > 0.95 * sum(map(len, topics.values()))  # only blank lines are gone
    assert any(d.startswith('The "if" statement is used for conditional execution') for d in docs)
    splits = load_splits("pydoc-topics", val_fraction=0.1, test_fraction=0.1)
    assert sum(len(s) for s in splits.values()) == len(docs)
    assert texts(splits["validation"]) == docs[0::10]


# ---------------------------------------------------------------------------------------------
# Local files


def test_txt_folder_glob_and_file(tmp_path):
    docs = ["first doc\nwith lines\n", "zweites Dokument: ünïcödé ✓\n", "def f():\n    return 3\n", "last"]
    names = ["a.txt", "b.txt", "c.txt", "sub/d.txt"]
    paths = [write(tmp_path / "corpus" / name, doc) for name, doc in zip(names, docs, strict=True)]
    write(tmp_path / "corpus" / "empty.txt", "  \n")
    write(tmp_path / "corpus" / "README.md", "not a document")

    # One shard per file, in path order: a, b, c, empty, sub/d; every other file validates (the empty
    # one holds no document, so d, file 4, validates).
    train, val = load_documents(str(tmp_path / "corpus"), val_fraction=0.5)
    assert texts(val) == [docs[0], docs[2], docs[3]] and texts(train) == [docs[1]]

    train, val = load_documents(str(tmp_path / "corpus" / "*.txt"), val_fraction=0.5)  # top level only
    assert texts(val) + texts(train) == [docs[0], docs[2], docs[1]]

    train, val = load_documents(str(tmp_path / "corpus" / "**" / "*.txt"), val_fraction=0.5)
    assert sorted(texts(val) + texts(train)) == sorted(docs)

    with pytest.raises(DataError, match="at least 2"):
        load_documents(str(paths[0]))


def test_jsonl_field_extra_columns_and_empty_rows(tmp_path, caplog):
    rows = [{"body": f"document {i} ✓", "id": i} for i in range(10)]
    rows[3]["body"] = ""
    rows[5]["body"] = None
    rows[6]["body"] = " \n\t"
    rows[7]["body"] = 7
    del rows[8]["body"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    expected = [r["body"] for r in rows if isinstance(r.get("body"), str) and r["body"].strip()]

    with caplog.at_level("WARNING", logger="kangpt.data"):
        train, val = load_documents(str(path), text_field="body", val_fraction=0.25)
    assert [r.getMessage() for r in caplog.records] == [
        f"dropped 5 of 10 documents of {str(path)!r} with no text in field 'body' "
        "(missing, null, not a string or blank)"]
    assert len(expected) == 5 and train.column_names == ["text"] and val.column_names == ["text"]
    assert texts(val) == expected[0::4] and texts(train) == [d for i, d in enumerate(expected) if i % 4]

    s_train, s_val = load_documents(str(path), text_field="body", val_fraction=0.25, streaming=True)
    assert texts(s_train) == texts(train) and texts(s_val) == texts(val)


def test_parquet_column(tmp_path, caplog):
    docs = [f"parquet document {i}\n" * (i + 1) for i in range(6)]
    pq.write_table(pa.table({"content": docs, "n": list(range(6))}), tmp_path / "part.parquet")
    with caplog.at_level("WARNING", logger="kangpt.data"):
        train, val = load_documents(str(tmp_path / "part.parquet"), text_field="content", val_fraction=0.5)
    assert texts(val) == docs[0::2] and texts(train) == docs[1::2]
    assert not caplog.records  # nothing dropped, nothing said


def test_hub_path_uses_config_and_own_validation_split(monkeypatch, caplog):
    calls = []

    def fake_load_dataset(*args, **kwargs):  # a hub dataset is always read as a stream, shard by shard
        calls.append((args, kwargs))
        return datasets.IterableDatasetDict({
            "train": datasets.Dataset.from_dict({"story": ["a", "b", "", "c", "d"], "x": [1, 2, 3, 4, 5]})
                                     .to_iterable_dataset(num_shards=2),
            "validation": datasets.Dataset.from_dict({"story": ["v1", "v2"]}).to_iterable_dataset(),
        })

    monkeypatch.setattr(data.corpora.datasets, "load_dataset", fake_load_dataset)
    with caplog.at_level("WARNING", logger="kangpt.data"):
        train, val = load_documents("someone/stories", name="en", text_field="story")
    assert calls == [(("someone/stories", "en"), {"streaming": True})]
    assert texts(train) == ["a", "b", "c", "d"] and texts(val) == ["v1", "v2"]
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 1 of 5 documents of 'someone/stories' with no text in field 'story' "
        "(missing, null, not a string or blank)"]
    train, val = load_documents("someone/stories", name="en", text_field="story", max_documents=2)
    assert texts(train) == ["a", "b"] and texts(val) == ["v1", "v2"]  # each split's first two


def test_unreachable_hub_dataset_is_a_data_error():
    with pytest.raises(DataError, match="kangpt-test/no-such-dataset"):
        load_documents("kangpt-test/no-such-dataset")


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("missing.txt", {}, "missing.txt"),
        ("./nowhere", {}, "nowhere"),
        ("corpus/*.jsonl", {}, r"corpus/\*\.jsonl"),
        ("table.csv", {}, r"\.csv"),
        ("fields.jsonl", {"text_field": "content"}, "content"),
        ("blank", {}, "blank"),
        ("mixed", {}, "mixed"),
        ("fields.jsonl", {"name": "cfg"}, "cfg"),
        ("stdlib", {"val_fraction": 0.0}, "val_fraction"),
        ("stdlib", {"val_fraction": 0.9}, "val_fraction"),
        ("stdlib", {"max_documents": 0}, "max_documents"),
        ("stdlib", {"rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_load_documents_errors(tmp_path, monkeypatch, spec, kwargs, match):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "corpus" / "a.txt", "text")
    write(tmp_path / "table.csv", "text\nhello\n")
    write(tmp_path / "fields.jsonl", '{"body": "hello"}\n{"body": "world"}\n')
    write(tmp_path / "blank" / "a.txt", "\n\n")
    write(tmp_path / "blank" / "b.txt", " ")
    write(tmp_path / "mixed" / "a.txt", "hello")
    write(tmp_path / "mixed" / "b.jsonl", '{"text": "world"}\n')
    with pytest.raises(DataError, match=match) as info:
        load_documents(spec, **kwargs)
    assert "\n" not in str(info.value)


BINARY = b"good text\n" * 30 + b"\x00\xff\xfe\x01\x02binary"
LATIN1 = "naïve café crème\n".encode("latin-1")
LATIN1_JSONL = b'{"text": "one"}\n{"text": "caf\xe9"}\n'
# (file name, bytes, expected message start): the offsets are found in the bytes, not by decoding them.
BROKEN_FILES = [
    ("b.txt", BINARY, f"corpus/b.txt is not UTF-8 text (byte 0xff at offset {BINARY.index(0xFF)}); "
                      "convert it to UTF-8 or remove it from the corpus"),
    ("b.txt", LATIN1, f"corpus/b.txt is not UTF-8 text (byte 0xef at offset {LATIN1.index(0xEF)}); "
                      "convert it to UTF-8 or remove it from the corpus"),
    ("b.jsonl", b'{"text": "one"}\n\n{"text": "two"}\n{"text": oops}\n{"text": "three"}\n',
     "corpus/b.jsonl line 4 is not valid JSON (Expecting value at column 10); fix or remove that line"),
    ("b.jsonl", b'{"text": "one"}\n[1, 2]\n', "corpus/b.jsonl line 2 is not a JSON object"),
    ("b.jsonl", LATIN1_JSONL, "corpus/b.jsonl line 2 is not UTF-8 "
                              f"(byte 0xe9 at offset {LATIN1_JSONL.index(0xE9)}); "
                              "convert the file to UTF-8 or remove it from the corpus"),
    ("b.parquet", b"PAR1 this is not a parquet file", "corpus/b.parquet is not a readable Parquet file ("),
]


def write_good_file(path: Path) -> None:
    """A valid two-document corpus file of the type given by ``path``'s suffix."""
    if path.suffix == ".parquet":
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": ["good", "also good"]}), path)
    else:
        write(path, "a good document\n" if path.suffix == ".txt" else '{"text": "good"}\n{"text": "also"}\n')


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("name, content, message", BROKEN_FILES)
def test_broken_local_file_is_a_one_line_error(tmp_path, monkeypatch, caplog, streaming, name, content,
                                               message):
    monkeypatch.chdir(tmp_path)
    suffix = Path(name).suffix
    write_good_file(tmp_path / "corpus" / f"a{suffix}")  # the broken file is neither first nor last
    (tmp_path / "corpus" / name).write_bytes(content)
    write_good_file(tmp_path / "corpus" / f"c{suffix}")
    with pytest.raises(DataError) as info:
        train, val = load_documents("corpus", val_fraction=0.5, streaming=streaming)
        texts(train), texts(val)  # a stream may meet the broken file only when it is read
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # the error is the only word


def test_broken_file_search_spares_a_json_array_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "corpus" / "a.json", '[{"text": "x"},\n {"text": "y"}]\n')  # `datasets` reads this fine
    write(tmp_path / "corpus" / "b.jsonl", '{"text": "z"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"^corpus/b\.jsonl line 2 is not valid JSON"):
        load_documents("corpus")
    (tmp_path / "corpus" / "b.jsonl").unlink()
    train, val = load_documents("corpus", val_fraction=0.5)
    assert texts(val) + texts(train) == ["x", "y"]


def test_unexplained_read_error_names_the_file_and_the_cause(tmp_path):
    path = str(write(tmp_path / "a.txt", "valid UTF-8 ✓"))
    try:
        try:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        except UnicodeDecodeError as cause:
            raise datasets.exceptions.DatasetGenerationError("An error occurred") from cause
    except datasets.exceptions.DatasetGenerationError as err:
        error = data._corpus_error("text", [path], err)
    assert str(error) == f"cannot read {path}: 'utf-8' codec can't decode byte 0xff in position 0: " \
                         "invalid start byte"  # the cause, not the wrapper's "An error occurred"


def test_a_stream_of_local_files_has_one_shard_per_file(tmp_path):
    """So that processes split it by files, a resume skips files unread, and a broken file met while
    streaming is named without scanning the others."""
    for i in range(4):
        write(tmp_path / "corpus" / f"{i}.txt", f"document {i}")
    train = load_splits(str(tmp_path / "corpus"), val_fraction=0.5, streaming=True)["train"]
    assert train.num_shards == 4
    shards = [texts(train.shard(num_shards=4, index=i)) for i in range(4)]
    assert shards == [[], ["document 1"], [], ["document 3"]]  # files 0 and 2 validate


RECORDS = ".jsonl/.json/.parquet"  # the local files whose records have fields, so text_field applies


@pytest.mark.parametrize(
    "spec, what",
    [("corpus", ".txt files, one document per file ('corpus')"),
     ("corpus/a.txt", ".txt files, one document per file ('corpus/a.txt')"),
     ("stdlib", "the built-in corpus 'stdlib'")],
)
def test_text_field_that_no_source_reads_is_refused(tmp_path, monkeypatch, spec, what):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "corpus" / "a.txt", "one document")
    write(tmp_path / "corpus" / "b.txt", "another")
    with pytest.raises(DataError) as info:
        load_documents(spec, text_field="body")
    assert str(info.value) == (f"text_field='body' does not apply to {what}; it names the text column of "
                               f"{RECORDS} records and hub datasets")
    assert not (tmp_path / "hf-datasets").exists()  # refused before `datasets` read (and cached) anything


def test_text_field_applies_when_one_source_has_records(tmp_path):
    write(tmp_path / "train.jsonl", '{"body": "one"}\n{"body": "two"}\n')
    write(tmp_path / "val" / "a.txt", "validation text")
    splits = load_splits(str(tmp_path / "train.jsonl"), text_field="body",
                         validation_dataset=str(tmp_path / "val"))
    assert texts(splits["train"]) == ["one", "two"] and texts(splits["validation"]) == ["validation text"]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("spec", ["corpus", "corpus/*.txt", "corpus/b.txt"])
@pytest.mark.parametrize("target, cause", [("c.txt", errno.ELOOP), ("gone.txt", errno.ENOENT)],
                         ids=["loop", "dangling"])
def test_unreadable_link_in_a_corpus_is_refused_not_skipped(tmp_path, monkeypatch, streaming, spec, target,
                                                             cause):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "corpus" / "a.txt", "a good document\n")
    (tmp_path / "corpus" / "b.txt").symlink_to(target)
    (tmp_path / "corpus" / "c.txt").symlink_to("b.txt")  # with target c.txt: b.txt -> c.txt -> b.txt
    write(tmp_path / "corpus" / "d.txt", "another good document\n")
    with pytest.raises(DataError) as info:
        train, val = load_documents(spec, val_fraction=0.5, streaming=streaming)
        texts(train), texts(val)
    assert str(info.value) == (f"corpus/b.txt cannot be read ({os.strerror(cause)}); "
                               "fix it or remove it from the corpus")
    assert not list((tmp_path / "hf-datasets").rglob("*.arrow"))


@pytest.mark.parametrize(
    "files, what",
    [(["run.yaml", "metrics.jsonl", "checkpoints/step-000004/manifest.json", "model/config.json"],
      "a kangpt run folder (it holds run.yaml)"),
     (["config.json", "model.safetensors", "tokenizer.json"],
      "a model folder (it holds config.json and model.safetensors)")],
    ids=["run", "model"],
)
def test_run_or_model_folder_given_as_corpus_is_refused_unread(tmp_path, monkeypatch, files, what):
    monkeypatch.chdir(tmp_path)
    for name in files:
        write(tmp_path / "out" / name, "{\n")  # a manifest.json cut short: reading it would blame line 1
    write(tmp_path / "corpus" / "a.txt", "one document")
    write(tmp_path / "corpus" / "b.txt", "another")
    monkeypatch.setattr(datasets, "load_dataset", None)  # refused before any file is read
    message = f"'out' is {what}, not a corpus of .txt/{RECORDS} files"
    with pytest.raises(DataError) as info:
        load_documents("out")
    assert str(info.value) == message
    with pytest.raises(DataError) as info:
        load_splits("corpus", validation_dataset="out")
    assert str(info.value) == message
    assert data._RUN_FILE == run_dir.RUN_FILE  # the mark a run folder is told by


# ---------------------------------------------------------------------------------------------
# Tokenizer


ROUND_TRIP = [
    "def f(x):\n\treturn x ** 2  # ünïcödé ✓\n",
    "日本語のテキスト 😀 emoji\r\nand CRLF",
    "   leading and trailing spaces   ",
    f"a literal {EOT} inside",
    "",
]


def test_bpe_round_trips_and_special_tokens(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 320
    for s in ROUND_TRIP:
        assert tokenizer.decode(tokenizer.encode(s, add_special_tokens=False)) == s
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == tokenizer.pad_token == EOT
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == EOT
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi", add_special_tokens=False)


def test_bpe_smaller_than_vocab_size_warns_also_from_cache(small_docs, monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="kangpt.data"):
        full = load_tokenizer("bpe", small_docs, vocab_size=300)  # enough text for 300 tokens: no warning
        assert len(full) == 300 and not caplog.records
        short = load_tokenizer("bpe", small_docs[:2], vocab_size=4096)
        monkeypatch.setattr(data.tokenizer, "_train_bpe", None)  # the second call must load the cached one
        cached = load_tokenizer("bpe", small_docs[:2], vocab_size=4096)
    n = len(short.get_vocab())
    assert 257 < n < 4096 and len(cached) == n
    message = (f"the trained BPE has {n} tokens, fewer than vocab_size=4096: its 2 training texts ran out of "
               "merges (no pair of tokens within a word occurs 2 or more times); train it on more text or "
               "lower vocab_size")
    assert [r.getMessage() for r in caplog.records] == [message, message]


def test_bpe_is_cached_and_not_retrained(small_docs, tmp_path, monkeypatch):
    cache = Path(os.environ["KANGPT_CACHE"])  # the default location when cache_dir is None
    first = load_tokenizer("bpe", small_docs[:4], vocab_size=300)
    entries = list((cache / "tokenizers").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached tokenizer")

    monkeypatch.setattr(data.tokenizer, "_train_bpe", no_training)
    dataset = datasets.Dataset.from_dict({"text": small_docs[:4]})  # same texts as a dataset: same key
    second = load_tokenizer("bpe", dataset, vocab_size=300)
    assert second.get_vocab() == first.get_vocab()
    with pytest.raises(AssertionError, match="retrained"):  # other settings are a different cache entry
        load_tokenizer("bpe", small_docs[:4], vocab_size=301)
    with pytest.raises(AssertionError, match="retrained"):
        load_tokenizer("bpe", small_docs[:3], vocab_size=300)
    assert len(list((cache / "tokenizers").iterdir())) == 1  # no temp folders left behind


@pytest.mark.parametrize("name, damage", [("tokenizer.json", lambda text: text[:len(text) // 2]),
                                          ("tokenizer_config.json", lambda text: b"\x00garbage")],
                         ids=["truncated", "garbage"])
def test_damaged_bpe_cache_entry_is_retrained_and_replaced(small_docs, tmp_path, monkeypatch, caplog, name,
                                                           damage):
    fresh = load_tokenizer("bpe", small_docs[:4], vocab_size=300, cache_dir=str(tmp_path / "fresh"))
    load_tokenizer("bpe", small_docs[:4], vocab_size=300)
    (entry,) = (Path(os.environ["KANGPT_CACHE"]) / "tokenizers").iterdir()
    file = entry / name
    file.write_bytes(damage(file.read_bytes()))
    damaged_inode = file.stat().st_ino
    with pytest.raises(ValueError) as cause:  # what loading it raised before
        json.loads(file.read_bytes())
    with caplog.at_level("WARNING", logger="kangpt.data"):
        repaired = load_tokenizer("bpe", small_docs[:4], vocab_size=300)
    assert [r.getMessage() for r in caplog.records] == [
        f"the cached tokenizer file {file} is damaged ({cause.value}); retraining the BPE and replacing it"]
    assert repaired.backend_tokenizer.to_str() == fresh.backend_tokenizer.to_str()
    assert repaired.eos_token == EOT and repaired.padding_side == "left"
    assert file.stat().st_ino != damaged_inode  # replaced by a rename, never rewritten in place
    assert list(entry.parent.iterdir()) == [entry]  # no temporary folder left behind
    caplog.clear()
    monkeypatch.setattr(data.tokenizer, "_train_bpe", None)  # the repaired entry is loaded, not retrained
    again = load_tokenizer("bpe", small_docs[:4], vocab_size=300)
    assert again.backend_tokenizer.to_str() == fresh.backend_tokenizer.to_str() and not caplog.records


def test_bpe_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for s in ROUND_TRIP:
        assert reloaded.encode(s, add_special_tokens=False) == tokenizer.encode(s, add_special_tokens=False)
    assert reloaded.eos_token_id == tokenizer.eos_token_id and reloaded.pad_token == EOT
    batch = reloaded(["a", "a longer text"], padding=True).input_ids  # left padding, for generation
    assert batch[0][0] == reloaded.pad_token_id and batch[0][-1] != reloaded.pad_token_id


def test_pretrained_spec_gets_pad_token_from_eos(tmp_path):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(tmp_path / "plain")
    loaded = load_tokenizer(str(tmp_path / "plain"), None)
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


@pytest.mark.parametrize(
    "spec, texts_, kwargs, match",
    [
        ("bpe", ["some text"], {"vocab_size": 100}, "vocab_size"),
        ("bpe", None, {}, "train_texts"),
        ("bpe", ["", ""], {}, "no text"),
        ("bpe", "a single string", {}, "single string"),
        ("bpe", [1, 2], {}, "int"),
        ("/nonexistent/tokenizer-dir", None, {}, "nonexistent/tokenizer-dir"),
    ],
)
def test_load_tokenizer_errors(spec, texts_, kwargs, match):
    with pytest.raises(DataError, match=match):
        load_tokenizer(spec, texts_, **kwargs)


# ---------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("as_dataset", [False, True])
def test_pack_documents_matches_independent_tokenization(small_docs, tokenizer, as_dataset):
    docs = small_docs[:6]
    reference = reference_stream(docs, tokenizer)
    block = 61
    source = datasets.Dataset.from_dict({"text": docs}) if as_dataset else docs
    packed = pack_documents(source, tokenizer, block)
    rows = packed["input_ids"]
    assert packed.column_names == ["input_ids"]
    assert len(rows) == len(reference) // block and len(reference) % block  # a remainder was dropped
    assert all(len(r) == block for r in rows)
    assert [t for r in rows for t in r] == reference[: len(rows) * block]
    batch = packed.with_format("torch")[:2]["input_ids"]
    assert batch.dtype == torch.int64 and batch.shape == (2, block)


def test_pack_documents_from_split_view_and_literal_eot(tokenizer, tmp_path):
    docs = [f"doc {i}: {EOT} is text here" for i in range(9)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    train, _ = load_documents(str(path), val_fraction=1 / 3)  # train is a select() view
    packed = pack_documents(train, tokenizer, 4)
    flat = [t for r in packed["input_ids"] for t in r]
    assert flat == reference_stream(texts(train), tokenizer)[: len(flat)]
    eos = tokenizer.eos_token_id
    assert tokenizer.encode(docs[0], add_special_tokens=False).count(eos) == 1  # what splitting avoids
    reference = reference_stream(docs, tokenizer)
    (whole,) = pack_documents(docs, tokenizer, len(reference))["input_ids"]
    assert whole == reference and whole.count(eos) == len(docs)  # the literal EOT is text: one EOS per doc


def test_pack_documents_too_few_tokens(tokenizer):
    n = len(reference_stream(["tiny"], tokenizer))
    with pytest.raises(DataError, match=f"only {n} tokens"):
        pack_documents(["tiny"], tokenizer, 64)
    with pytest.raises(DataError, match="block_size"):
        pack_documents(["tiny"], tokenizer, 1)
    with pytest.raises(DataError, match="'text' column"):
        pack_documents(datasets.Dataset.from_dict({"body": ["x"]}), tokenizer, 2)


def test_stream_blocks_equals_pack_documents_across_batches(small_docs, tokenizer, monkeypatch):
    monkeypatch.setattr(data.packing, "STREAM_BATCH_BYTES", 5000)  # several batches: blocks straddle them
    docs = small_docs[:7]
    expected = pack_documents(docs, tokenizer, 53)["input_ids"]
    stream = stream_blocks(datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(), tokenizer, 53)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["input_ids"] for row in stream] == expected
    assert [row["input_ids"] for row in stream_blocks(docs, tokenizer, 53)] == expected


# ---------------------------------------------------------------------------------------------
# Baseline


def test_unigram_entropy_hand_computed():
    train, val = [[0, 0, 1], [2, 0, 1]], [[0, 3]]
    # counts 3, 2, 1, 0 over N = 6 tokens; add-one over V = 4: p = (c + 1) / 10
    expected = -(math.log(4 / 10) + math.log(1 / 10)) / 2
    assert unigram_entropy(train, val, 4) == pytest.approx(expected)
    as_datasets = [datasets.Dataset.from_dict({"input_ids": rows}) for rows in (train, val)]
    assert unigram_entropy(*as_datasets, 4) == pytest.approx(expected)
    view = datasets.Dataset.from_dict({"input_ids": [[9, 9, 9]] + train}).select([1, 2])
    assert unigram_entropy(view, val, 10) == pytest.approx(-(math.log(4 / 16) + math.log(1 / 16)) / 2)
    with pytest.raises(DataError, match="token id 4"):
        unigram_entropy(train, [[4]], 4)
    with pytest.raises(DataError, match="no validation tokens"):
        unigram_entropy(train, [], 4)


def test_unigram_entropy_on_packed_corpus_is_below_uniform(small_docs, tokenizer):
    train = pack_documents(small_docs[1:], tokenizer, 32)
    val = pack_documents(small_docs[:1], tokenizer, 32)
    entropy = unigram_entropy(train, val, len(tokenizer))
    assert 1.0 < entropy < math.log(len(tokenizer))


@pytest.mark.parametrize("world_size", [2, 4])
def test_streamed_hold_out_is_the_corpus_split_on_every_number_of_processes(tmp_path, world_size):
    """8 files: split_dataset_by_node hands whole files to the processes; the held-out documents must
    still be the corpus's 0, k, 2k, ..., and the processes' training documents the rest, once each."""
    for i in range(8):
        write(tmp_path / "corpus" / f"{i}.txt", f"document {i}\n")
    train, val = load_documents(str(tmp_path / "corpus"), val_fraction=0.34)
    shares = [load_documents(str(tmp_path / "corpus"), val_fraction=0.34, streaming=True, rank=rank,
                             world_size=world_size) for rank in range(world_size)]
    streamed_train = [text for share, _ in shares for text in texts(share)]
    assert sorted(streamed_train) == sorted(texts(train)) and len(streamed_train) == len(texts(train))
    assert texts(val) == [f"document {i}\n" for i in (0, 3, 6)]
    assert sorted(t for _, share_val in shares for t in texts(share_val)) == sorted(texts(val))
