"""The ``kangpt`` console script: ``kangpt COMMAND ...``, one subcommand per registered command.

A command is a function that adds its arguments to an ``argparse`` parser and returns the function
that runs it (namespace -> exit code), registered with :func:`command`::

    @command("inspect", "show the KAN edge functions of a trained model")
    def inspect_command(parser):
        parser.add_argument("model_dir")
        return run_inspect

A module that registers commands is listed in ``COMMAND_MODULES``. Errors meant for the user are
raised as :class:`CommandError` (or ``ConfigError``/``DataError``) and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer

from .config import ConfigError
from .configuration_kangpt import KANGPT2Config
from .data import DataError, _first_line

# Modules whose import registers subcommands (besides this one).
COMMAND_MODULES: tuple[str, ...] = ("kangpt.interpret", "kangpt.compare")

Runner = Callable[[argparse.Namespace], "int | None"]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


class CommandError(Exception):
    """A problem with the command's input, reported as ``error: <message>`` and exit code 1."""


def command(name: str, help: str):
    """Register the decorated ``configure(parser) -> run`` function as subcommand ``name``."""

    def register(configure: Callable[[argparse.ArgumentParser], Runner]):
        _COMMANDS[name] = (help, configure)
        return configure

    return register


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen command and return its exit code."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="kangpt", description="KAN-GPT-2: GPT-2 with Kolmogorov-Arnold blocks."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure) in _COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        subparser.set_defaults(run=configure(subparser))
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (CommandError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


@command("generate", "generate text from a trained model folder, printing tokens as they are produced")
def generate_command(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("model_dir", help="folder written by train.py (OUT_DIR/model), or a hub model name")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from the BOS token)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=200,
                        help="tokens to generate, at most the model's context minus the prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return run_generate


def run_generate(args: argparse.Namespace) -> int:
    """Load ``args.model_dir`` and stream a continuation of ``args.prompt`` to stdout."""
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise CommandError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = load_model(args.model_dir, device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids if args.prompt else torch.tensor([[start]])
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    context = getattr(model.config, "max_position_embeddings", None) or ids.shape[1] + args.max_new_tokens
    if ids.shape[1] >= context:
        raise CommandError(f"the prompt has {ids.shape[1]} tokens; the model's context is {context}")
    model.generate(
        ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=min(args.max_new_tokens, context - ids.shape[1]),
        streamer=TextStreamer(tokenizer, skip_special_tokens=True),
        **(sampling if args.temperature > 0 else {"do_sample": False}),
    )
    return 0


@command("convert", "turn a GPT-2's MLPs into KAN blocks that already do their job; write a KAN-GPT-2 folder")
def convert_command(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("gpt2_dir", help="a GPT-2 folder (save_pretrained output) or hub name")
    parser.add_argument("out_dir", help="folder to write the KAN-GPT-2 to (from_pretrained loads it)")
    parser.add_argument("--data", default="stdlib",
                        help="calibration corpus: stdlib, pydoc-topics, text files or a hub dataset")
    parser.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet/hub data")
    parser.add_argument("--calibration-tokens", type=_positive_int, default=16384,
                        help="training-split tokens whose activations the blocks are fitted on")
    parser.add_argument("--eval-tokens", type=_positive_int, default=16384,
                        help="validation-split tokens on which GPT-2 and the conversion are evaluated")
    parser.add_argument("--block-size", type=_positive_int, help="tokens per block (default: up to 256)")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per distilled per-edge block")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a KANGPT2Config field of the KAN design, e.g. kan_sharing=edge (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return run_convert


def run_convert(args: argparse.Namespace) -> int:
    """``kangpt convert``: GPT-2 -> KAN-GPT-2 with converted blocks, its loss before and after, a report."""
    import json

    import datasets
    import yaml
    from tqdm.auto import tqdm

    from .convert import convert_gpt2, load_gpt2
    from .data import load_documents, pack_documents
    from .evaluation import validation_loss
    from .modeling_kangpt import KANGPT2LMHeadModel, kangpt2_config_of
    from .run_dir import publish, remove, temporary_name, writing

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CommandError(f"{args.out_dir!r} exists and is not empty; pass --overwrite to replace it")
    overrides = {}
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep or name not in KANGPT2Config.__dataclass_fields__:
            raise CommandError(f"--set {item!r}: expected FIELD=VALUE with a KANGPT2Config field")
        overrides[name] = yaml.safe_load(text)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    transformers.utils.logging.disable_progress_bar()  # the blocks' bar is the command's
    datasets.disable_progress_bars()
    try:
        gpt2, tokenizer = load_gpt2(args.gpt2_dir)
        with torch.device("meta"):  # a design that cannot be built is refused before any work
            KANGPT2LMHeadModel(kangpt2_config_of(gpt2.config, **overrides))
    except ValueError as err:
        raise CommandError(str(err)) from err
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
    tmp = temporary_name(out)
    with writing(tmp):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        model.generation_config = gpt2.generation_config
        model.save_pretrained(tmp)
        tokenizer.model_max_length = model.config.n_positions
        tokenizer.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
        publish(tmp, out)
    for entry in report.blocks:
        print(f"block {entry['block']:>2}: relative error {entry['relative_error']:.4f}")
    print(f"held-out loss ({blocks['evaluation'].numel():,} tokens of {args.data}): GPT-2 {before:.4f}, "
          f"converted {after:.4f} nats/token ({after - before:+.4f})")
    print(f"{report.method} in {report.seconds:.0f} s")
    print(f"wrote {out}")
    return 0


def load_model(name: str, device: str):
    """``(tokenizer, model)`` of a model folder or hub name; what cannot load is a CommandError."""
    folder = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub names are "org/name"
    if looks_local and not folder.is_dir():
        raise CommandError(f"no such model folder: {name!r}")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise CommandError(f"{name!r} is not a model folder (no config.json)")
    source = str(folder) if folder.is_dir() else name
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source)  # first: a bad config is told before the tokenizer warns
        model = AutoModelForCausalLM.from_pretrained(source, config=config)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except SafetensorError as err:  # a truncated or damaged weights file
        raise CommandError(f"cannot load {name!r}: a weights file is damaged ({_first_line(err)})") from err
    except (OSError, ValueError) as err:  # missing files, a hub that cannot be reached, a bad config
        if not folder.is_dir():  # "org/name" was neither a folder here nor a model the hub gave
            raise CommandError(
                f"no such model folder: {name!r}, and no hub model of that name loaded ({_first_line(err)})"
            ) from err
        raise CommandError(f"cannot load {name!r}: {_first_line(err)}") from err
    return tokenizer, model.to(device).eval()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
