"""Text corpora, tokenizers and packed token blocks for causal language-model training.

The pipeline is::

    train_docs, val_docs = load_documents("stdlib")           # or local files, or a hub dataset
    splits = load_splits("pydoc-topics", test_fraction=0.1)  # train / validation / test
    tokenizer = load_tokenizer("bpe", train_docs, vocab_size=4096)
    train = pack_documents(train_docs, tokenizer, block_size=256)   # column "input_ids", in memory
    val = pack_documents(val_docs, tokenizer, block_size=256)
    baseline = unigram_entropy(train, val, len(tokenizer))   # nats/token the model must beat

    store = token_store(document_splits("corpus/"), tokenizer)   # a corpus of any size, on disk
    blocks = store.blocks("train", block_size=256)                # memory-mapped blocks

Its modules, one job each:

* :mod:`.builtin`: the built-in corpora, ``"stdlib"`` and ``"pydoc-topics"``;
* :mod:`.documents`: a corpus read shard by shard (built-in, local files, hub streams), and the rule
  that holds documents out for validation and test;
* :mod:`.corpora`: a corpus named as the user names it (local files, folders and globs, hub datasets),
  split into train / validation / test as datasets with one ``"text"`` column;
* :mod:`.diagnosis`: broken local files and folders (dead links, non-UTF-8 text, bad JSON lines,
  unreadable Parquet, run or model folders given as a corpus) refused in a one-line error naming them;
* :mod:`.tokenizer`: the byte-level BPE trained on a corpus and cached, or a pretrained tokenizer;
* :mod:`.encoding`: documents to token ids on all cores;
* :mod:`.store`: a corpus tokenized once into a token store on disk, read through memory maps;
* :mod:`.packing`: documents packed into blocks of ``block_size`` tokens, in memory or streamed;
* :mod:`.baseline`: the unigram cross-entropy a model must beat;
* :mod:`.errors`: ``DataError``, which all of them raise on bad input.
"""

# The "x as x" imports are private names that the tests reach as kangpt.data.x, not API.
from .baseline import token_counts, unigram_entropy, unigram_entropy_of_counts
from .builtin import BUILTIN_CORPORA, pydoc_topics_documents, stdlib_documents
from .builtin import _count_table_lines as _count_table_lines
from .builtin import _is_generated_data as _is_generated_data
from .corpora import (
    check_split_sizes,
    corpus_files,
    document_splits,
    is_local_source,
    load_documents,
    load_splits,
    share_of_process,
)
from .diagnosis import _RUN_FILE as _RUN_FILE
from .diagnosis import _corpus_error as _corpus_error
from .documents import Documents, Head
from .encoding import DocumentEncoder
from .errors import DataError
from .packing import BlockStream, pack_documents, stream_blocks
from .store import TokenBlocks, TokenStore, token_store
from .tokenizer import BPE_VOCAB_SIZE_RULE, MIN_BPE_VOCAB_SIZE, load_tokenizer, tokenizer_sha256

__all__ = [
    "BlockStream",
    "DataError",
    "DocumentEncoder",
    "Documents",
    "Head",
    "check_split_sizes",
    "TokenBlocks",
    "TokenStore",
    "document_splits",
    "load_documents",
    "load_splits",
    "pydoc_topics_documents",
    "corpus_files",
    "is_local_source",
    "load_tokenizer",
    "pack_documents",
    "share_of_process",
    "stdlib_documents",
    "stream_blocks",
    "token_counts",
    "token_store",
    "tokenizer_sha256",
    "unigram_entropy",
    "unigram_entropy_of_counts",
    "BUILTIN_CORPORA",
    "MIN_BPE_VOCAB_SIZE",
    "BPE_VOCAB_SIZE_RULE",
]
