"""The optimizer of a run and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .run_config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay to the minimum.

    A function of the step alone, so it is the same for any number of processes and after resuming.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_learning_rate + cosine * (cfg.learning_rate - cfg.min_learning_rate)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices, none on norms and biases.

    The coefficients of the learnable functions of grouped and rational KAN layers (the parameters of
    a layer's ``basis``) get their own group, at ``train.kan_function_lr_scale`` times the learning
    rate and with ``train.kan_function_weight_decay`` (default none); every group's ``lr_scale`` says
    by how much (the loop sets ``lr = schedule * lr_scale``).
    """
    decay, no_decay, functions = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".basis." in name:
            functions.append(param)
        else:
            (decay if name.endswith("weight") and param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": functions, "weight_decay": cfg.kan_function_weight_decay,
               "lr_scale": cfg.kan_function_lr_scale}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
