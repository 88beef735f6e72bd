"""Held-out standard-library code as lm-evaluation-harness tasks.

Use them with ``lm_eval --include_path eval/lm_eval_tasks --tasks kangpt_stdlib_...``.

Both tasks read the validation documents of the default corpus, held out as ``configs/default.yaml``
holds them out (every 50th file of ``kangpt.data.stdlib_documents()``), so a model trained by
``python train.py`` never saw them. No download.
"""

from __future__ import annotations

import datasets

from kangpt.data import load_documents

VAL_FRACTION = 0.02  # data.val_fraction of configs/default.yaml
CONTEXT_LINES = 8  # lines of code before the line to complete
EVERY = 40  # one line to complete every EVERY lines of a document


def held_out_documents(**_metadata) -> datasets.DatasetDict:
    """The held-out documents, one row each (``text``): ``kangpt_stdlib_perplexity``."""
    _, val = load_documents("stdlib", val_fraction=VAL_FRACTION)
    return datasets.DatasetDict({"test": val})


def next_lines(**_metadata) -> datasets.DatasetDict:
    """``kangpt_stdlib_next_line``: ``CONTEXT_LINES`` lines of held-out code (``context``, ending in a
    newline and the next line's indentation) and the rest of the next line (``target``); one example
    every ``EVERY`` lines, at lines with some code on them."""
    rows = []
    for text in held_out_documents()["test"]["text"]:
        lines = text.splitlines()
        for i in range(CONTEXT_LINES, len(lines), EVERY):
            line = lines[i]
            code = line.lstrip()
            if len(code) < 4:  # blank or a lone bracket: nothing to predict
                continue
            indent = line[: len(line) - len(code)]
            rows.append({"context": "\n".join(lines[i - CONTEXT_LINES : i]) + "\n" + indent, "target": code})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
