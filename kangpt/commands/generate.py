"""``kangpt generate``: stream a continuation of a prompt from a model folder."""

from __future__ import annotations

import argparse

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TextStreamer

from ..io.generating import compiled
from ..io.loading import load_model
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
    parser.add_argument("--compile", action="store_true",
                        help="compile the model (torch.compile, static KV cache): slow to start, then faster")


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
    ids, healing = heal_trailing_whitespace(tokenizer, ids, start)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    context = getattr(model.config, "max_position_embeddings", None) or ids.shape[1] + args.max_new_tokens
    if ids.shape[1] >= context:
        raise CommandError(f"the prompt has {ids.shape[1]} tokens; the model's context is {context}")
    model.generate(
        ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=min(args.max_new_tokens, context - ids.shape[1]),
        streamer=TextStreamer(tokenizer, skip_special_tokens=True),
        logits_processor=LogitsProcessorList(healing),
        **(sampling if args.temperature > 0 else {"do_sample": False}),
        **(compiled(model) if args.compile else {}),
    )
    return 0


def heal_trailing_whitespace(tokenizer, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, list]:
    """``(ids, processors)``: a prompt's trailing whitespace tokens taken off, and a processor that makes
    the first generated tokens spell them out again.

    A byte-level BPE puts a space in front of the word that follows it (``def f`` -> ``def``, `` f``), so
    ``"def "`` ends in a lone-space token that training text has only inside runs of spaces, where the
    next token starts with a space too: the model goes on with `` def`` and the output reads ``def  def``.
    Generating from ``def`` with a first token that must start with the space gives ``def f``.
    """
    cut = ids.shape[1]
    while cut > 0 and tokenizer.decode(ids[0, cut - 1]).isspace():
        cut -= 1
    if cut == ids.shape[1]:
        return ids, []
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    head = ids[:, :cut] if cut else torch.tensor([[start]])
    tail = "".join(vocab[i] for i in ids[0, cut:].tolist())
    return head, [SpellOut(vocab, tail, head.shape[1])]


class SpellOut(LogitsProcessor):
    """Lets the tokens generated after the first ``prompt_length`` spell ``text`` (in the tokenizer's
    own token strings, e.g. ``Ġ`` for a space) before anything else: only a token whose string is a
    prefix of what is left of ``text``, or starts with all of it, can come next."""

    def __init__(self, vocab: list[str], text: str, prompt_length: int):
        self.vocab, self.text, self.prompt_length = vocab, text, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        spelled = ""
        for token in input_ids[0, self.prompt_length :].tolist():
            if len(spelled) >= len(self.text):  # spelled out: the model is free (a later token may
                return scores  # even lie past the tokenizer's vocabulary, in a padded embedding)
            spelled += self.vocab[token]
        left = self.text[len(spelled) :]
        if not left:
            return scores
        allowed = [i for i, token in enumerate(self.vocab)
                   if token and (left.startswith(token) or token.startswith(left))]
        if not allowed:  # a vocabulary without single-character tokens: let the model go on freely
            return scores
        mask = torch.full_like(scores, float("-inf"))
        mask[:, allowed] = 0
        return scores + mask
