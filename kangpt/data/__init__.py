"""Text corpora, tokenizers and packed token blocks for causal language-model training.

The pipeline is::

    train_docs, val_docs = load_documents("stdlib")           # or local files, or a hub dataset
    splits = load_splits("pydoc-topics", test_fraction=0.1)  # train / validation / test
    tokenizer = load_tokenizer("bpe", train_docs, vocab_size=4096)
    train = pack_documents(train_docs, tokenizer, block_size=256)   # column "input_ids"
    val = pack_documents(val_docs, tokenizer, block_size=256)
    baseline = unigram_entropy(train, val, len(tokenizer))   # nats/token the model must beat

Its modules, one job each:

* :mod:`.corpora`: the corpora (the built-in ``"stdlib"`` and ``"pydoc-topics"``, hub datasets, local
  files, folders and globs) read as documents, datasets with one ``"text"`` column, and split into
  train / validation / test;
* :mod:`.diagnosis`: broken local files and folders (dead links, non-UTF-8 text, bad JSON lines,
  unreadable Parquet, run or model folders given as a corpus) refused in a one-line error naming them;
* :mod:`.tokenizer`: the byte-level BPE trained on a corpus and cached, or a pretrained tokenizer;
* :mod:`.packing`: documents tokenized and packed into blocks of ``block_size`` tokens;
* :mod:`.baseline`: the unigram cross-entropy a model must beat;
* :mod:`.errors`: ``DataError``, which all of them raise on bad input.
"""

# The "x as x" imports are private names that the tests reach as kangpt.data.x, not API.
from .baseline import unigram_entropy
from .corpora import (
    BUILTIN_CORPORA,
    corpus_files,
    is_local_source,
    load_documents,
    load_splits,
    pydoc_topics_documents,
    stdlib_documents,
)
from .corpora import _count_table_lines as _count_table_lines
from .corpora import _is_generated_data as _is_generated_data
from .corpora import _load_splits as _load_splits
from .diagnosis import _RUN_FILE as _RUN_FILE
from .diagnosis import _corpus_error as _corpus_error
from .errors import DataError
from .packing import pack_documents, stream_blocks
from .tokenizer import BPE_VOCAB_SIZE_RULE, MIN_BPE_VOCAB_SIZE, load_tokenizer

__all__ = [
    "DataError",
    "load_documents",
    "load_splits",
    "pydoc_topics_documents",
    "corpus_files",
    "is_local_source",
    "load_tokenizer",
    "pack_documents",
    "stdlib_documents",
    "stream_blocks",
    "unigram_entropy",
    "BUILTIN_CORPORA",
    "MIN_BPE_VOCAB_SIZE",
    "BPE_VOCAB_SIZE_RULE",
]
