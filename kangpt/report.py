"""What a finished run says about itself: the model card (README.md) and the loss curve (loss.png)."""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from .plotting import new_figure
from .run_config import RunConfig


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


def write_model_card(
    folder: Path, model: nn.Module, config: RunConfig, metrics: dict, has_plot: bool, published_as: Path
) -> None:
    """Write ``folder/README.md``: model, parameters, final metrics, usage and run config.

    ``published_as`` is where the folder ends up (the usage example names it).
    """
    mc = model.config
    shape = (f"GPT-2 with {mc.n_layer} layers, width {mc.n_embd}, {mc.n_head} heads, "
             f"context {mc.n_positions}, vocabulary {mc.vocab_size}")
    kan = f"KAN ({mc.kan_basis} basis, hidden width {mc.kan_hidden_size})"
    ffn = "GPT-2 MLP" if mc.ffn_type == "mlp" else kan
    data = config.data
    counts = "\n".join(f"| {part} | {n:,} |" for part, n in parameter_counts(model).items())
    plot = "\n![loss curve](loss.png)\n" if has_plot else ""
    test = (f"| test loss (nats/token) | {metrics['test_loss']:.4f} |\n"
            f"| test perplexity | {metrics['test_ppl']:.2f} |\n") if "test_loss" in metrics else ""
    card = f"""---
library_name: transformers
tags: [kangpt, kan, gpt2, text-generation]
---

# KAN-GPT-2 trained with kangpt

{shape}; feed-forward blocks: {ffn}.

Trained on `{data.dataset}`, tokenizer `{data.tokenizer}`, blocks of {data.block_size} tokens.

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

tokenizer = AutoTokenizer.from_pretrained("{published_as}")
model = AutoModelForCausalLM.from_pretrained("{published_as}")
```

or `kangpt generate {published_as} --prompt "..."`.

## Run config

```yaml
{yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip()}
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
