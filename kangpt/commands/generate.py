"""``kangpt generate``: stream a continuation of a prompt from a model folder."""

from __future__ import annotations

import argparse

import torch
from transformers import TextStreamer

from ..loading import load_model
from .arguments import check_float, check_ints, usable_device
from .errors import CommandError

HELP = "generate text from a trained model folder, printing tokens as they are produced"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="folder written by train.py (OUT_DIR/model), or a hub model name")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from the BOS token)")
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="tokens to generate, at most the model's context minus the prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def check_arguments(args: argparse.Namespace) -> str:
    """Refuse bad numbers and a device this torch cannot use (CommandError); the device to use."""
    check_ints(args, 1, "max_new_tokens")
    check_ints(args, 0, "top_k")
    check_float(args, "temperature", lambda t: t >= 0, "a finite number >= 0 (0: greedy)")
    check_float(args, "top_p", lambda p: 0 < p <= 1, "in (0, 1]")
    return usable_device(args.device)


def run(args: argparse.Namespace) -> int:
    """Load ``args.model_dir`` and stream a continuation of ``args.prompt`` to stdout."""
    device = check_arguments(args)
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
