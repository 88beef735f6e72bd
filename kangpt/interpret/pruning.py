"""Pruning a KAN-GPT-2: hidden units removed for real, edges zeroed, their means kept in the biases."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from ..kan import KANLinear, coefficient_view
from .importance import edge_moments, input_importance
from .statistics import LayerStats, kan_layers


def _kept_units(importance: torch.Tensor, remove_count: int, groups: int) -> torch.Tensor:
    """Sorted indices of the units kept when removing ``remove_count`` of the least important ones,
    the same number from each of ``groups`` contiguous groups."""
    size = len(importance) // groups
    per_group = remove_count // groups
    kept = [
        g * size + torch.argsort(importance[g * size : (g + 1) * size], descending=True)[: size - per_group]
        for g in range(groups)
    ]
    return torch.sort(torch.cat(kept)).values


def _unit_removals(model, stats, fraction: float, scope: str) -> dict[int, int]:
    """Number of hidden units to remove from every two-layer block (multiples of the groups of grouped
    layers).

    ``block`` scope: ``floor(fraction * h)`` units of every block; ``global`` scope: the least
    important ``fraction`` of all hidden units, by their absolute output spread ``sqrt(sum_j s_jk^2)``
    (the RMS change they cause in the residual stream), so blocks end at different widths.
    """
    seconds = {b: layer for (b, i), layer in kan_layers(model).items() if i == 1}
    step = model.config.kan_groups if any(layer.sharing == "group" for layer in seconds.values()) else 1

    def allowed(b, count):  # at least one unit (per group) stays
        width = seconds[b].in_features
        return min(count // step * step, width - step)

    if scope == "block":
        return {b: allowed(b, math.floor(fraction * layer.in_features)) for b, layer in seconds.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'block' or 'global', got {scope!r}")
    spreads = {b: edge_moments(layer, stats[b, 1])[0].square().sum(0).sqrt() for b, layer in seconds.items()}
    if not spreads:
        return {}
    everything = torch.cat(list(spreads.values()))
    count = math.floor(fraction * len(everything))
    threshold = torch.sort(everything).values[count - 1] if count else -math.inf
    return {b: allowed(b, int((s <= threshold).sum())) for b, s in spreads.items()}


def _parameter_counts(model: nn.Module) -> dict[str, int]:
    kan = [p for m in model.modules() if isinstance(m, KANLinear) for p in m.parameters()]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "kan_parameters": sum(p.numel() for p in kan),
        "nonzero_kan_parameters": sum(int(torch.count_nonzero(p)) for p in kan),
    }


def _zero_edges(state: dict, prefix: str, spread: torch.Tensor, mean: torch.Tensor, fraction: float) -> int:
    """Zero the ``fraction`` of a layer's edges with the smallest spread in ``state`` (weight and bias
    under ``prefix``, replaced by modified copies), folding their means into the bias; return how many."""
    n_in = spread.shape[1]
    count = math.floor(fraction * spread.numel())
    index = torch.topk(spread.flatten(), count, largest=False).indices
    rows, cols = index // n_in, index % n_in
    weight, bias = state[prefix + "weight"].clone(), state[prefix + "bias"].clone()
    coefficient_view(weight, n_in)[rows.to(weight.device), cols.to(weight.device)] = 0
    bias.index_add_(0, rows.to(bias.device), mean[rows, cols].to(bias))
    state[prefix + "weight"], state[prefix + "bias"] = weight, bias
    return count


@torch.no_grad()
def prune(
    model: nn.Module,
    stats: Mapping[tuple[int, int], LayerStats],
    *,
    hidden_fraction: float = 0.0,
    edge_fraction: float = 0.0,
    scope: str = "block",
) -> tuple[nn.Module, dict]:
    """Return a new, smaller copy of a KAN-GPT-2 model and a JSON-ready report; ``model`` is unchanged.

    Args:
        model: a KAN-GPT-2 model (e.g. ``KANGPT2LMHeadModel``); ``stats`` are its statistics
            (:func:`collect_statistics`).
        hidden_fraction: fraction of the hidden units of the two-layer blocks to remove, the least
            important first (:func:`input_importance` of the block's second layer). With ``scope``
            ``"block"`` every block loses ``floor(fraction * h)`` units; with ``"global"`` the
            least important fraction of all units goes, ranked by absolute output spread, so
            widths differ by block. In grouped layers each group loses the same number of units,
            so widths stay multiples of ``kan_groups``; at least one unit per group stays.
        edge_fraction: then, in every KAN layer, this fraction of the remaining edges, the least
            important first (:func:`edge_importance`), have all their coefficients set to zero.

    A removed unit's or edge's mean value over the sample tokens is added to the bias of the layer
    it fed, so the output keeps its mean. Units are removed for real: the new model's
    ``kan_hidden_size`` is the list of per-block widths and it saves and loads with
    ``save_pretrained``/``from_pretrained``. Zeroed edges keep their parameters (the count does
    not shrink; ``nonzero_kan_parameters`` does) and would be trained again like any weight. All
    importances come from ``stats``, i.e. from the unpruned model.
    """
    for name, value in (("hidden_fraction", hidden_fraction), ("edge_fraction", edge_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    layers = kan_layers(model)
    names = {module: name for name, module in model.named_modules()}
    state = model.state_dict()
    config = model.config
    widths_before = [config.kan_hidden_size_of_layer(b) for b in range(config.n_layer)]
    widths = list(widths_before)
    removals = _unit_removals(model, stats, hidden_fraction, scope) if hidden_fraction > 0 else {}
    kept: dict[int, torch.Tensor] = {}
    for b, count in removals.items():
        first, second = layers[b, 0], layers[b, 1]
        keep = _remove_units(state, names, first, second, stats[b, 1], count)
        kept[b], widths[b] = keep, len(keep)
    zeroed = 0
    for (b, i), layer in layers.items():
        if edge_fraction > 0:
            spread, mean = edge_moments(layer, stats[b, i])
            if b in kept:  # hidden units removed above: rows of layer 0, columns of layer 1
                index = kept[b].cpu()
                spread, mean = (spread[index], mean[index]) if i == 0 else (spread[:, index], mean[:, index])
            zeroed += _zero_edges(state, names[layer] + ".", spread, mean, edge_fraction)
    pruned = _rebuilt(model, widths if removals else None, state)
    before, after = _parameter_counts(model), _parameter_counts(pruned)
    report = {
        "hidden_fraction": hidden_fraction,
        "edge_fraction": edge_fraction,
        "scope": scope,
        "hidden_sizes": {"before": widths_before, "after": widths},
        "zeroed_edges": zeroed,
        **{key: {"before": before[key], "after": after[key]} for key in before},
    }
    return pruned, report


def _remove_units(state: dict, names: dict, first: KANLinear, second: KANLinear, stats: LayerStats,
                  count: int) -> torch.Tensor:
    """Remove from ``state`` the ``count`` least important hidden units between ``first`` and ``second``
    (named in ``names``): rows of the first layer, columns of the second, whose bias takes their mean
    outputs. Returns the indices of the units kept."""
    step = second.groups if second.sharing == "group" else 1
    keep = _kept_units(input_importance(second, stats), count, step).to(first.weight.device)
    removed = torch.ones(second.in_features, dtype=torch.bool, device=keep.device)
    removed[keep] = False
    _, mean = edge_moments(second, stats)  # (d, h)
    p0, p1 = names[first] + ".", names[second] + "."
    state[p0 + "weight"] = first.weight.view(first.out_features, -1)[keep]
    state[p0 + "bias"] = first.bias[keep]
    w2 = second.weight.view(second.out_features, -1, second.in_features)[..., keep]  # (d, F, kept)
    state[p1 + "weight"] = w2.reshape(second.out_features, -1)
    state[p1 + "bias"] = second.bias + mean[:, removed.cpu()].sum(1).to(second.bias)
    return keep


def _rebuilt(model: nn.Module, widths: list[int] | None, state: dict) -> nn.Module:
    """A new model of ``model``'s class with per-block hidden ``widths`` (None: the same) holding
    ``state``, on ``model``'s device and dtype, with its generation config, in eval mode."""
    config = copy.deepcopy(model.config)
    if widths is not None:
        config.kan_hidden_size = widths
    parameter = next(model.parameters())
    pruned = type(model)(config).to(device=parameter.device, dtype=parameter.dtype)
    pruned.load_state_dict(state)
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()
