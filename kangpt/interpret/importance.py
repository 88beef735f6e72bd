"""How much every edge and every input of a KAN layer matters (see :mod:`kangpt.interpret`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..kan import KANLinear
from .statistics import LayerStats, kan_layers

_F64 = torch.float64


def _coefficients(layer: KANLinear) -> torch.Tensor:
    """(out, in, F) float64 CPU copy of the layer's edge coefficients."""
    return layer.coefficients().detach().to("cpu", _F64)


def edge_moments(layer: KANLinear, stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(spread, mean), both (out, in) float64: std and mean of every ``phi_ij(x_i)`` over the tokens."""
    w = _coefficients(layer)
    var = torch.einsum("jif,ifg,jig->ji", w, stats.feature_cov, w)
    mean = torch.einsum("jif,if->ji", w, stats.feature_mean)
    return var.clamp(min=0).sqrt(), mean


def _output_scale(stats: LayerStats) -> torch.Tensor:
    """sqrt(sum_j Var(y_j)), the spread of the whole output vector (never exactly zero)."""
    return stats.output_var.sum().sqrt().clamp(min=torch.finfo(_F64).tiny)


def edge_importance(layer: KANLinear, stats: LayerStats) -> torch.Tensor:
    """(out, in) importance ``I_ij = std(phi_ij) / sqrt(sum_j Var(y_j))`` (see the module docstring)."""
    spread, _ = edge_moments(layer, stats)
    return spread / _output_scale(stats)


def input_importance(layer: KANLinear, stats: LayerStats) -> torch.Tensor:
    """(in,) importance ``U_i = sqrt(sum_j std(phi_ij)^2) / sqrt(sum_j Var(y_j))`` of every input.

    For the second layer of a ``d -> h -> d`` block, these are the hidden units' importances.
    """
    spread, _ = edge_moments(layer, stats)
    return spread.square().sum(0).sqrt() / _output_scale(stats)


def rank_edges(importance: torch.Tensor, top_k: int | None = None) -> list[dict]:
    """Edges of an (out, in) importance matrix, most important first, as dicts
    ``{"input": i, "output": j, "importance": I_ij}``; all of them unless ``top_k`` is given."""
    flat = importance.flatten()
    values, index = torch.topk(flat, flat.numel() if top_k is None else min(top_k, flat.numel()))
    n_in = importance.shape[1]
    return [
        {"input": int(k) % n_in, "output": int(k) // n_in, "importance": float(v)}
        for v, k in zip(values.tolist(), index.tolist(), strict=True)
    ]


_DEFINITION = (
    "importance of edge i->j: std over the tokens of phi_ij(x_i) / sqrt(sum_j Var(y_j)) = relative RMS "
    "change of the layer output when the edge is replaced by its mean; of input i (a hidden unit for "
    "layer 1): the same with all of the input's edges replaced"
)


def importance_report(model: nn.Module, stats: Mapping[tuple[int, int], LayerStats], top_k: int = 20) -> dict:
    """JSON-ready importances of every KAN layer: quantiles, the ``top_k`` edges and inputs, and the
    ranking of all hidden units of every two-layer block."""
    layers, hidden = [], {}
    for (b, i), layer in kan_layers(model).items():
        imp = edge_importance(layer, stats[b, i])
        inputs = input_importance(layer, stats[b, i])
        q = torch.quantile(imp.flatten().float(), torch.tensor([0.5, 0.9, 0.99])).tolist()
        order = torch.argsort(inputs, descending=True)
        layers.append(
            {
                "block": b,
                "layer": i,
                "basis": layer.basis_name,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "edge_importance_quantiles": {"50%": q[0], "90%": q[1], "99%": q[2], "max": imp.max().item()},
                "top_edges": rank_edges(imp, top_k),
                "top_inputs": [{"input": int(k), "importance": float(inputs[k])} for k in order[:top_k]],
            }
        )
        if i == 1:
            hidden[str(b)] = [{"unit": int(k), "importance": float(inputs[k])} for k in order]
    tokens = next(iter(stats.values())).tokens
    return {"tokens": tokens, "definition": _DEFINITION, "layers": layers, "hidden_units": hidden}
