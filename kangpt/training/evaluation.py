"""Language-model loss of a model on held-out token blocks: training's validation and test losses,
and the losses ``kangpt convert`` and ``kangpt inspect`` report, all computed by :func:`evaluate`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def block_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(N,) mean next-token cross-entropy (nats/token) of every block of ``input_ids`` (N, T)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # position t predicts t + 1
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none").mean(1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    *,
    device: torch.device | str | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` (in eval mode, then back in its mode)
    over every block of ``batches``, each counted once.

    ``batches`` yields (B, T) input_ids, or dicts holding them (a DataLoader of packed blocks), moved to
    ``device`` (default: the model's). ``gather`` collects every process's block losses (accelerate's
    ``gather_for_metrics``, which also drops the blocks repeated to even out the processes' shares).
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for batch in batches:
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        losses.append(block_losses(model, input_ids.to(device)))
        if gather is not None:
            losses[-1] = gather(losses[-1])
    model.train(was_training)
    return torch.cat(losses).mean().item()


def validation_loss(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on blocks (N, T), ``batch_size`` at a time."""
    return evaluate(model, input_ids.split(batch_size))
