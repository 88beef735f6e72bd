"""What int8 weight-only quantisation (torchao, ``kangpt.finetuning.quantization``) costs a trained model.

Loads a model folder twice, quantises one copy with :func:`kangpt.finetuning.quantization.quantize_int8`, and
reports for both, measured in one run: the bytes of the weights (all of them, and the feed-forward
blocks alone), the loss on held-out tokens and the time of a forward pass over a batch of them
(median of interleaved repeats).

    python eval/quantize.py out/default/model      # held-out: the validation documents of its corpus

The held-out tokens are the validation documents of ``--dataset`` split as ``train.py`` splits them
(every k-th document, ``--val-fraction``; the defaults are those of configs/default.yaml), packed into
blocks of the model's context.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from kangpt.comparison.measure import MiB, interleaved_median_times
from kangpt.data import load_documents, pack_documents
from kangpt.finetuning.quantization import quantize_int8, tensor_bytes
from kangpt.io.loading import load_model
from kangpt.training.evaluation import validation_loss


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model folder (OUT_DIR/model of train.py)")
    parser.add_argument("--dataset", default="stdlib", help="corpus whose validation documents are held out")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="as data.val_fraction in training")
    parser.add_argument("--max-blocks", type=int, default=256, help="held-out blocks to evaluate at most")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per model")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def feed_forward_bytes(model) -> int:
    return sum(tensor_bytes(block.mlp) for block in model.transformer.h)


def print_table(rows: dict[str, dict]) -> None:
    """One markdown table, each figure also as a ratio to fp32's."""
    fp32 = rows["fp32"]
    print("\n| weights | MiB | × fp32 | feed-forward MiB | × fp32 | held-out loss | Δ nats/token "
          "| forward ms | × fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ff = r["feed_forward_bytes"]
        print(
            f"| {name} | {r['bytes'] / MiB:.2f} | {r['bytes'] / fp32['bytes']:.3f} | "
            f"{ff / MiB:.2f} | {ff / fp32['feed_forward_bytes']:.3f} | "
            f"{r['held_out_loss']:.4f} | {r['held_out_loss'] - fp32['held_out_loss']:+.4f} | "
            f"{r['forward_ms']:.1f} | {r['forward_ms'] / fp32['forward_ms']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    tokenizer, model = load_model(args.model_dir, "cpu")
    _, val_docs = load_documents(args.dataset, val_fraction=args.val_fraction)
    blocks = torch.tensor(pack_documents(val_docs, tokenizer, model.config.n_positions)["input_ids"])
    blocks = blocks[: args.max_blocks]
    quantised = quantize_int8(copy.deepcopy(model))

    batch = blocks[:8]
    with torch.no_grad():
        times = interleaved_median_times(
            {"fp32": lambda: model(batch), "int8": lambda: quantised(batch)}, args.repeats, "cpu"
        )
        rows = {}
        for name, m in (("fp32", model), ("int8", quantised)):
            rows[name] = {
                "bytes": tensor_bytes(m),
                "feed_forward_bytes": feed_forward_bytes(m),
                "held_out_loss": validation_loss(m, blocks),
                "forward_ms": 1000 * times[name],
            }
    print(f"{args.model_dir}: {blocks.numel():,} held-out tokens ({len(blocks)} blocks of {blocks.shape[1]})")
    print_table(rows)
    if args.json:
        figures = {"model_dir": args.model_dir, "tokens": blocks.numel(), **rows}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
