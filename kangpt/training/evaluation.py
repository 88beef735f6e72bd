"""Language-model loss of a model on held-out token blocks (training's evaluation uses it too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def block_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(N,) mean next-token cross-entropy (nats/token) of every block of ``input_ids`` (N, T)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # position t predicts t + 1
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none").mean(1)


@torch.no_grad()
def validation_loss(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` (in eval mode) on blocks (N, T)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = [block_losses(model, ids.to(device)) for ids in input_ids.split(batch_size)]
    model.train(was_training)
    return torch.cat(losses).mean().item()
