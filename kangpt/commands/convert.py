"""``kangpt convert``: a GPT-2 folder -> a KAN-GPT-2 folder whose blocks already do their job."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import datasets
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm

from ..configuration_kangpt import KANGPT2Config
from ..data import DataError, load_documents, pack_documents
from ..finetuning.convert import convert_gpt2, load_gpt2
from ..io.folders import atomic_folder, temporary_name
from ..messages import first_line
from ..modeling_kangpt import KANGPT2LMHeadModel, kangpt2_config_of
from ..training.evaluation import validation_loss
from ..training.run_config import read_yaml
from ..training.run_dir import writing
from .arguments import check_ints, check_not_within, holds_something, usable_device
from .errors import CommandError

HELP = "turn a GPT-2's MLPs into KAN blocks that already do their job; write a KAN-GPT-2 folder"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gpt2_dir", help="a GPT-2 folder (save_pretrained output) or hub name")
    parser.add_argument("out_dir", help="folder to write the KAN-GPT-2 to (from_pretrained loads it)")
    parser.add_argument("--data", default="stdlib",
                        help="calibration corpus: stdlib, pydoc-topics, text files or a hub dataset")
    parser.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet/hub data")
    parser.add_argument("--calibration-tokens", type=int, default=16384,
                        help="training-split tokens whose activations the blocks are fitted on")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="validation-split tokens on which GPT-2 and the conversion are evaluated")
    parser.add_argument("--block-size", type=int, help="tokens per block (default: up to 256)")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per distilled per-edge block")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a KANGPT2Config field of the KAN design, e.g. kan_sharing=edge (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """``kangpt convert``: GPT-2 -> KAN-GPT-2 with converted blocks, its loss before and after, a report."""
    check_ints(args, 1, "calibration_tokens", "eval_tokens", "block_size")
    check_ints(args, 0, "steps")  # 0: the least-squares start alone
    device = usable_device(args.device)
    check_not_within(args.gpt2_dir, args.out_dir)  # --overwrite would replace the GPT-2 being read
    out = Path(args.out_dir)
    if holds_something(out) and not args.overwrite:
        raise CommandError(f"{args.out_dir!r} exists and is not empty; pass --overwrite to replace it")
    overrides = {}
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep or name not in KANGPT2Config.__dataclass_fields__:
            raise CommandError(f"--set {item!r}: expected FIELD=VALUE with a KANGPT2Config field")
        overrides[name] = read_yaml(text)
    transformers.utils.logging.disable_progress_bar()  # the blocks' bar is the command's
    datasets.disable_progress_bars()
    try:
        gpt2, tokenizer = load_gpt2(args.gpt2_dir)
        with torch.device("meta"):  # a design that cannot be built is refused before any work
            KANGPT2LMHeadModel(kangpt2_config_of(gpt2.config, **overrides))
    except (ValueError, StrictDataclassError) as err:
        raise CommandError(first_line(err)) from err
    block = args.block_size or min(256, gpt2.config.n_positions)
    train_docs, val_docs = load_documents(args.data, text_field=args.text_field)
    blocks = {}
    for split, docs, tokens in (("calibration", train_docs, args.calibration_tokens),
                                ("evaluation", val_docs, args.eval_tokens)):
        try:
            enough = docs.select(range(min(len(docs), 4 * tokens // block + 1)))  # more than needed
            packed = pack_documents(enough, tokenizer, block)
        except DataError as err:
            raise DataError(f"{split} text of {args.data!r}: {err}") from err
        blocks[split] = torch.tensor(packed["input_ids"][: math.ceil(tokens / block)])
    gpt2.to(device)
    before = validation_loss(gpt2, blocks["evaluation"])
    try:
        model, report = convert_gpt2(gpt2, blocks["calibration"].to(device), steps=args.steps,
                                     progress=lambda items: tqdm(items, desc="blocks"), **overrides)
    except ValueError as err:
        raise CommandError(f"cannot convert: {err}") from err
    after = validation_loss(model, blocks["evaluation"])
    summary = {**report.to_dict(), "source": args.gpt2_dir, "design": overrides, "eval_tokens":
               blocks["evaluation"].numel(), "loss": {"gpt2": before, "converted": after}}
    with writing(temporary_name(out)), atomic_folder(out) as tmp:
        model.generation_config = gpt2.generation_config
        model.save_pretrained(tmp)
        tokenizer.model_max_length = model.config.n_positions
        tokenizer.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    for entry in report.blocks:
        print(f"block {entry['block']:>2}: relative error {entry['relative_error']:.4f}")
    print(f"held-out loss ({blocks['evaluation'].numel():,} tokens of {args.data}): GPT-2 {before:.4f}, "
          f"converted {after:.4f} nats/token ({after - before:+.4f})")
    print(f"{report.method} in {report.seconds:.0f} s")
    print(f"wrote {out}")
    return 0
