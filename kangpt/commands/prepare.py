"""``kangpt prepare``: tokenize a run config's corpus into its token store, ahead of the run."""

from __future__ import annotations

import argparse
import time

from ..training.corpus import prepare_store
from ..training.run_config import parse_args
from .errors import CommandError

HELP = "tokenize a run config's corpus once into its token store (e.g. on a CPU machine before the GPU job)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        f"{HELP[0].upper()}{HELP[1:]}. Takes what train takes (CONFIG.yaml and --section.key=value "
        "overrides) and builds what that run would build first: the BPE (data.tokenizer: bpe) and the "
        "token store of the corpus in $KANGPT_CACHE/tokens (default ~/.cache/kangpt). The run then finds "
        "both and starts training at once."
    )
    parser.add_argument("config", nargs="?", help="run config (default: every key at its default, as kangpt "
                        "train; python train.py's is configs/default.yaml)")
    parser.set_defaults(overrides=[])


def run(args: argparse.Namespace) -> int:
    """Build (or find) the store; print where it is, its tokens, its bytes on disk and the time taken."""
    config = parse_args([args.config, *args.overrides] if args.config else args.overrides)
    if config.data.streaming:
        raise CommandError("data.streaming is true: a streamed corpus is tokenized while it trains and has "
                           "no token store; prepare and train with --data.streaming=false")
    started = time.perf_counter()
    store = prepare_store(config.data, config.train)
    took = time.perf_counter() - started
    what = (f"built in {took:.1f} s" if store.built
            else f"found in {took:.1f} s (built earlier in {store.info['seconds']:.1f} s)")
    print(f"token store {store.path}: {what}\n{store.summary()}")
    return 0
