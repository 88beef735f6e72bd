"""Language-model loss of a model on held-out token blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def validation_loss(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` (in eval mode) on blocks (N, T)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for s in range(0, len(input_ids), batch_size):
        ids = input_ids[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # position t predicts t + 1
        total += F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum").item()
    model.train(was_training)
    return total / (input_ids.shape[0] * (input_ids.shape[1] - 1))
