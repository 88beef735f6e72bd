"""The model a run trains: fresh, or from a folder (``train.init_from``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..modeling_kangpt import KANGPT2LMHeadModel
from .run_config import ConfigError, RunConfig, model_config


def build_model(config: RunConfig, tokenizer) -> KANGPT2LMHeadModel:
    """A freshly initialised KAN-GPT-2 whose vocabulary and special tokens are the tokenizer's, or
    the model of the folder ``train.init_from`` (a GPT-2 folder's as ``ffn_type="mlp"``)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model_cfg = model_config(  # no pad_token_id: packed blocks hold no padding (as GPT-2)
        config, vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=tokenizer.eos_token_id
    )
    if config.train.init_from is None:
        model = KANGPT2LMHeadModel(model_cfg)
    elif model_cfg.ffn_type == "mlp" and _is_gpt2_folder(config.train.init_from):
        model = KANGPT2LMHeadModel.from_gpt2(config.train.init_from, ffn_type="mlp", **config.model)
    else:
        model = KANGPT2LMHeadModel.from_pretrained(config.train.init_from, config=model_cfg)
    if model.config.vocab_size < len(tokenizer):
        vocab = model.config.vocab_size
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    if config.train.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if config.train.compile:
        model.compile()  # in place: parameter names, checkpoints and save_pretrained are unchanged
    return model


def _is_gpt2_folder(path: str) -> bool:
    return json.loads(Path(path, "config.json").read_text()).get("model_type") == "gpt2"
