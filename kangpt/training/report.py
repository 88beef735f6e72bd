"""What a finished run says about itself: the model card (README.md), the loss curve (loss.png) and a
sample from the saved model."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from torch import nn

from ..data import BUILTIN_CORPORA, is_local_source
from ..io.plotting import new_figure
from .run_config import RunConfig

# Run settings that only make sense on this machine (the card leaves them out), and those that may name
# a local file or folder (the card keeps only its name): a card is meant to be shared.
LOCAL_ONLY = {"train": ("out_dir", "resume", "overwrite")}
MAYBE_LOCAL = {"data": ("dataset", "validation_dataset", "test_dataset", "tokenizer"),
               "train": ("init_from",)}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by part: embeddings (the LM head is tied to them), attention, feed-forward, norms, total."""
    parts = {"embeddings": 0, "attention": 0, "feed-forward": 0, "layer norms": 0}
    for name, param in model.named_parameters():  # tied weights are listed once
        if ".attn." in name:
            part = "attention"
        elif ".mlp." in name:
            part = "feed-forward"
        elif ".ln_" in name:
            part = "layer norms"
        else:
            part = "embeddings"
        parts[part] += param.numel()
    parts["total"] = sum(parts.values())
    return parts


def shareable_settings(config: RunConfig) -> dict:
    """The run config as a card shows it: no settings of this machine, local sources by their name."""
    settings = config.to_dict()
    for section, keys in LOCAL_ONLY.items():
        for key in keys:
            settings[section].pop(key, None)
    for section, keys in MAYBE_LOCAL.items():
        for key in keys:
            value = settings[section].get(key)
            if isinstance(value, str) and is_local_source(value):
                settings[section][key] = Path(os.path.expanduser(value)).name
    return settings


def hub_datasets(config: RunConfig) -> list[str]:
    """The datasets of the hub a run trained and evaluated on (the card's ``datasets`` metadata)."""
    data = config.data
    sources = [data.dataset, data.validation_dataset, data.test_dataset]
    return [s for s in dict.fromkeys(sources) if s and s not in BUILTIN_CORPORA and not is_local_source(s)]


def write_model_card(
    folder: Path, model: nn.Module, config: RunConfig, metrics: dict, has_plot: bool
) -> None:
    """Write ``folder/README.md``: the hub's metadata, model, parameters, final metrics, usage and run
    config, with nothing that names this machine's folders."""
    mc = model.config
    settings = shareable_settings(config)
    shape = (f"GPT-2 with {mc.n_layer} layers, width {mc.n_embd}, {mc.n_head} heads, "
             f"context {mc.n_positions}, vocabulary {mc.vocab_size}")
    kan = f"KAN ({mc.kan_basis} basis, hidden width {mc.kan_hidden_size})"
    ffn = "GPT-2 MLP" if mc.ffn_type == "mlp" else kan
    data = settings["data"]
    local = " (a local corpus)" if is_local_source(config.data.dataset) else ""
    counts = "\n".join(f"| {part} | {n:,} |" for part, n in parameter_counts(model).items())
    plot = "\n![loss curve](loss.png)\n" if has_plot else ""
    test = (f"| test loss (nats/token) | {metrics['test_loss']:.4f} |\n"
            f"| test perplexity | {metrics['test_ppl']:.2f} |\n") if "test_loss" in metrics else ""
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation",
                "tags": ["kangpt", "kan", "gpt2", "text-generation"]}
    if hub_datasets(config):
        metadata["datasets"] = hub_datasets(config)
    card = f"""---
{yaml.safe_dump(metadata, sort_keys=False, default_flow_style=None).rstrip()}
---

# KAN-GPT-2 trained with kangpt

{shape}; feed-forward blocks: {ffn}.

Trained on `{data["dataset"]}`{local}, tokenizer `{data["tokenizer"]}`, blocks of {data["block_size"]} tokens.

## Parameters

| part | parameters |
| --- | ---: |
{counts}

## Final metrics

| metric | value |
| --- | ---: |
| optimizer steps | {metrics["step"]:,} |
| training tokens | {metrics["tokens"]:,} |
| validation loss (nats/token) | {metrics["val_loss"]:.4f} |
| validation perplexity | {metrics["val_ppl"]:.2f} |
{test}| unigram baseline (nats/token) | {metrics["unigram_baseline"]:.4f} |
{plot}
## Use

```python
import kangpt  # registers KAN-GPT-2 with the transformers Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = "path/to/this/folder"  # or the id of the hub repository it was uploaded to
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
```

or `kangpt generate path/to/this/folder --prompt "..."`.

## Run config

```yaml
{yaml.safe_dump(settings, sort_keys=False).rstrip()}
```
"""
    (folder / "README.md").write_text(card)


def plot_losses(records: list[dict], path: Path, baseline: float) -> bool:
    """Plot training and validation loss against step, with the unigram baseline, to ``path``.

    Returns False (and writes nothing) when there is nothing to plot; raises ModuleNotFoundError (with
    the install hint) when matplotlib is not installed, so the caller can say why there is no plot.
    """
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return False
    fig = new_figure(7, 4, layout=None)
    ax = fig.subplots()
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="KAN-GPT-2 training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def sample(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Load the saved folder as a user would and complete ``prompt``, within the model's context.

    A prompt longer than the context keeps its last tokens; the new tokens are capped to the room left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    context = model.config.n_positions
    tokenizer.truncation_side = "left"  # a prompt too long keeps its end, which the sample continues
    inputs = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=context - 1)  # room for one
    room = context - inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=min(max_new_tokens, room))
    return tokenizer.decode(output[0], skip_special_tokens=True)
