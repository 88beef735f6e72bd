"""The KAN grid levers of a run: grids refined on a schedule (``train.kan_grid_schedule``) and moved to
the range their inputs take (``train.kan_grid_update_steps``), before the steps named, and replayed
before a resume so that the checkpoint's parameters fit their shapes."""

from __future__ import annotations

import math

import torch

from ..data import TokenBlocks
from ..kan import KANLinear
from ..modeling_kangpt import KANGPT2LMHeadModel
from .run_config import TrainConfig


class KANGrids:
    """The grid upkeep of one run: its (unwrapped) model, its optimizer, its settings."""

    def __init__(self, model: KANGPT2LMHeadModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg

    def before_step(self, step: int, val: TokenBlocks, device: torch.device) -> list[tuple[str, dict | None]]:
        """Make the grid changes due before optimizer step ``step``; return what to say of each, with
        the metrics record to keep (a moved range, which :meth:`replay` reads back), or None."""
        events = []
        if step in self.cfg.kan_grid_update_steps:  # on the first validation blocks: deterministic
            ids = val[: self.cfg.batch_size]["input_ids"].to(device)
            low, high = grid_range_of_inputs(self.model, ids)
            set_grid_ranges(self.model, self.optimizer, low, high)
            record = {"step": step, "kan_grid_low": low, "kan_grid_high": high}
            events.append((f"step {step}: KAN grids moved to [{low}, {high}]", record))
        for at, grid_size in self.cfg.kan_grid_schedule:
            if at == step:
                extend_grids(self.model, self.optimizer, grid_size)
                events.append((f"step {step}: KAN grids refined to {grid_size} intervals", None))
        return events

    def replay(self, records: list[dict], done: int) -> None:
        """Give the grids the shape they had after ``done`` steps: the ranges the run recorded
        (``records``, its metrics) and the sizes scheduled before that step."""
        for record in records:
            if "kan_grid_low" in record and record["step"] < done:
                set_grid_ranges(self.model, self.optimizer, record["kan_grid_low"], record["kan_grid_high"])
        for step, grid_size in self.cfg.kan_grid_schedule:
            if step < done:
                extend_grids(self.model, self.optimizer, grid_size)


def extend_grids(model: KANGPT2LMHeadModel, optimizer: torch.optim.Optimizer, grid_size: int) -> None:
    """Refine the grid of every KAN layer to ``grid_size`` intervals (``KANLinear.extend_grid``: the
    functions are kept) and record the size in the model's config (the saved model is built with it)."""
    layers = [m for m in model.modules() if isinstance(m, KANLinear) and m.spec.has_grid]
    _refit_layers(layers, optimizer, lambda layer: layer.extend_grid(grid_size))
    model.config.kan_grid_size = grid_size


def set_grid_ranges(model: KANGPT2LMHeadModel, optimizer: torch.optim.Optimizer, low: float, high: float):
    """Move the grid of every B-spline or RBF KAN layer to ``[low, high]`` (``KANLinear.set_grid_range``)
    and record the range in the model's config."""
    _refit_layers(_ranged_grid_layers(model), optimizer, lambda layer: layer.set_grid_range(low, high))
    model.config.kan_grid_range = [low, high]


def _ranged_grid_layers(model: torch.nn.Module) -> list[KANLinear]:
    """The KAN layers whose grid has a range to move: B-spline and RBF ones."""
    return [m for m in model.modules() if isinstance(m, KANLinear) and m.basis_name in ("bspline", "rbf")]


def _refit_layers(layers: list[KANLinear], optimizer: torch.optim.Optimizer, refit) -> None:
    """``refit(layer)`` every layer, then put the parameters it replaced (the per-edge weight, or a
    grouped layer's function coefficients) in the optimizer in place of the old ones, with fresh state."""
    for layer in layers:
        before = list(layer.parameters())
        refit(layer)
        for old, new in zip(before, layer.parameters(), strict=True):
            if new is not old:
                optimizer.state.pop(old, None)
                for group in optimizer.param_groups:
                    group["params"] = [new if p is old else p for p in group["params"]]


# Quantiles of the inputs a data-driven grid covers (grid range update), and its rounding.
GRID_QUANTILES = (0.005, 0.995)


@torch.no_grad()
def grid_range_of_inputs(model: KANGPT2LMHeadModel, input_ids: torch.Tensor) -> tuple[float, float]:
    """The range covering the ``GRID_QUANTILES`` of the inputs of every B-spline or RBF KAN layer on
    ``input_ids`` (the widest over the layers, rounded out to 0.25): where a grid is worth its knots."""
    layers = _ranged_grid_layers(model)
    lows, highs = [], []

    def record(layer, args):
        x = args[0].detach().float().flatten()
        x = x[:: max(1, x.numel() // (1 << 20))]  # torch.quantile takes at most 16M values
        q = torch.quantile(x, torch.tensor(GRID_QUANTILES, device=x.device))
        lows.append(q[0].item())
        highs.append(q[1].item())

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return math.floor(min(lows) * 4) / 4, math.ceil(max(highs) * 4) / 4
