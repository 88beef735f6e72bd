"""``kangpt compare`` (and ``python eval/compare.py``): KAN-GPT-2 side by side with GPT-2; see
:mod:`kangpt.comparison.models` for what is measured and how."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

from ..comparison.measure import DTYPES
from ..comparison.models import GPT2_SIZES, MODELS, SHAPES, run_comparison, shape_of
from ..comparison.report import plot, report_markdown
from ..kan import BASES
from .arguments import blocking_file, check_float, check_ints, usable_device
from .errors import CommandError

HELP = "compare KAN-GPT-2 with GPT-2: parameters, memory and speed"


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``eval/compare.py`` and ``kangpt compare``."""
    parser.add_argument(
        "--size",
        choices=list(SHAPES),
        default="mini",
        help="shape measured for memory and speed (default: mini = 4 layers, d=256)",
    )
    parser.add_argument("--n-layer", type=int, help="override the shape's number of layers")
    parser.add_argument("--n-embd", type=int, help="override the shape's width")
    parser.add_argument("--n-head", type=int, help="override the shape's number of heads")
    parser.add_argument("--vocab-size", type=int, help="override the shape's vocabulary size")
    parser.add_argument("--basis", choices=BASES, help="basis of the default KAN-GPT-2 (default: its own)")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"models measured, comma-separated, gpt2 first, among {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="autocast dtype of training, weight dtype of generation",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--prompt-len", type=int, help="generation prompt length (default: seq-len / 2)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated (default: seq-len / 4)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout of every model (GPT-2 used 0.1)")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generations per model")
    parser.add_argument("--compile", action="store_true",
                        help="measure compiled generation too (torch.compile, static cache; compiles first)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: torch's; 1 is steadier on a shared machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--params-only", action="store_true", help="only the parameter table (no memory, speed)"
    )
    parser.add_argument(
        "--estimate-sizes",
        default=",".join(GPT2_SIZES),
        help="sizes whose peak memory is estimated without allocating ('' for none)",
    )
    parser.add_argument("--estimate-batch", type=int, default=8, help="sequences per step of the estimates")
    parser.add_argument(
        "--estimate-seq-len", type=int, default=1024, help="tokens per sequence of the estimates"
    )
    parser.add_argument(
        "--estimate-dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the estimates"
    )
    parser.add_argument(
        "--estimate-new-tokens", type=int, default=16, help="decoding steps of the estimated generation"
    )
    parser.add_argument("--out", default="out/compare", help="folder of compare.json and the charts")


def check_arguments(args) -> None:
    """Fill defaults that depend on other arguments; reject impossible combinations (CommandError)."""
    check_ints(args, 1, "n_layer", "n_embd", "n_head", "vocab_size", "batch", "seq_len", "prompt_len",
               "new_tokens", "repeats", "gen_repeats", "threads", "estimate_batch", "estimate_seq_len",
               "estimate_new_tokens")
    check_float(args, "dropout", lambda p: 0 <= p < 1, "a probability in [0, 1)")
    shape = shape_of(args)
    if shape["n_embd"] % shape["n_head"]:  # attention splits the width into equal heads
        raise CommandError(f"--n-head {shape['n_head']} does not divide the width n_embd={shape['n_embd']}")
    args.prompt_len = args.prompt_len or max(1, args.seq_len // 2)
    args.new_tokens = args.new_tokens or max(1, args.seq_len // 4)
    names = args.models.split(",")
    if names[0] != "gpt2" or any(n not in MODELS for n in names) or len(set(names)) != len(names):
        raise CommandError(f"--models must start with gpt2 and name each of {', '.join(MODELS)} at most once")
    unknown = [size for size in args.estimate_sizes.split(",") if size and size not in SHAPES]
    if unknown:
        known = ", ".join(SHAPES)
        raise CommandError(f"--estimate-sizes: unknown size {unknown[0]!r}; the sizes are {known}")
    if max(args.seq_len, args.prompt_len + args.new_tokens) > shape["n_positions"]:
        raise CommandError(f"sequences longer than the model's {shape['n_positions']} positions")
    if args.prompt_len > args.seq_len:
        raise CommandError("--prompt-len cannot exceed --seq-len (the prompt is cut from the training batch)")
    usable_device(args.device)
    check_out(args.out)


def check_out(out: str) -> None:
    """Refuse (CommandError) an ``--out`` that cannot be made a folder: it, or one above it, is a file."""
    blocker = blocking_file(Path(out))
    if blocker == Path(out):
        raise CommandError(f"--out {out!r} is a file, not a folder")
    if blocker is not None:
        raise CommandError(f"--out {out!r}: {str(blocker)!r} is a file, not a folder")


def run(args) -> int:
    """Run the comparison ``args`` describes: print the tables, write JSON and charts to ``args.out``."""
    check_arguments(args)
    transformers.utils.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_comparison(args)
    print(report_markdown(results, args))
    (out / "compare.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    written = plot(results, out)
    print(f"\nwrote {out / 'compare.json'}" + "".join(f", {p}" for p in written), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python eval/compare.py``: the command under its own program name."""
    parser = argparse.ArgumentParser(prog="compare.py", description=HELP)
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CommandError as err:
        parser.error(str(err))
