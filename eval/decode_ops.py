"""How many operations one cached decode step runs: GPT-2 against KAN-GPT-2, counted, not timed.

At one token per step each operation's fixed cost (dispatch on a CPU, a kernel launch on a GPU) is
much of a decode step's time, so the count is what the decode path of the KAN block cuts. Every aten
operation the model's forward dispatches is counted (``TorchDispatchMode``), for one step of batch 1
after a prompt of ``--prompt-len`` tokens, without autograd, as ``generate`` runs it.

    python eval/decode_ops.py                 # mini
    python eval/decode_ops.py --size small    # 124M
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from kangpt.comparison.models import SHAPES, build_comparison_model


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def decode_step_ops(name: str, size: str, prompt_len: int) -> collections.Counter:
    """The operations of one decode step of model ``name`` at ``size`` (random weights, batch 1)."""
    torch.manual_seed(0)
    model = build_comparison_model(name, SHAPES[size], "cpu").eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(prompt, cache=cache, use_cache=True).logits  # the prefill
        step = logits[:, -1:].argmax(-1)
        model(step, cache=cache, use_cache=True)  # a first step: caches the KAN piece tables
        with OpCounter() as counter:
            model(step, cache=cache, use_cache=True)
    return counter.counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SHAPES), default="mini")
    parser.add_argument("--prompt-len", type=int, default=128)
    args = parser.parse_args(argv)
    counts = {name: decode_step_ops(name, args.size, args.prompt_len) for name in ("gpt2", "kan")}
    print(f"| model | operations per decode step ({args.size}, batch 1) | the most frequent |")
    print("|---|---:|---|")
    for name, ops in counts.items():
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(5))
        print(f"| {name} | {sum(ops.values())} | {top} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
