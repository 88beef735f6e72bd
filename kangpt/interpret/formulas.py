"""Values of single edge and group functions, and formulas fitted to the most important edges."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import sympy
import torch

from ..kan import KANLinear
from .importance import _coefficients, edge_importance, rank_edges
from .statistics import LayerStats, _sample_mask, kan_layers, layer_statistics
from .symbolic import Candidate, fit_symbolic

_F64 = torch.float64


def _input_features(layer: KANLinear, i: int, x: torch.Tensor) -> torch.Tensor:
    """(P,) values of input i -> (P, F) float64 features of input i at those values."""
    x = x.to(device=layer.weight.device, dtype=_F64)
    with torch.no_grad():
        if layer.sharing == "group":  # the function depends on the input's group
            return layer.basis.features(x.unsqueeze(-1).expand(-1, layer.in_features))[..., i].cpu()
        return layer.basis.features(x.unsqueeze(-1))[..., 0].cpu()


def edge_values(layer: KANLinear, i: int, j: int, x: torch.Tensor) -> torch.Tensor:
    """(P,) float64 values of edge function ``phi_ij`` (input i -> output j) at points x (P,)."""
    return _input_features(layer, i, x) @ _coefficients(layer)[j, i]


def _group_values(layer: KANLinear, g: int, x: torch.Tensor) -> torch.Tensor:
    """(P,) float64 values of group function ``R_g`` of a grouped layer at points x (P,)."""
    return _input_features(layer, g * layer.basis.group_size, x)[:, 0]


def group_samples(layer: KANLinear, stats: LayerStats, g: int) -> torch.Tensor:
    """(P,) float64 sample inputs of group ``g`` of a grouped layer: the samples of its inputs pooled,
    as many as the layer has sample tokens, with the extremes (so that every input of the group lies in
    the domain of a formula fitted on them: sqrt, log)."""
    size = layer.basis.group_size
    pooled = stats.samples[:, g * size : (g + 1) * size].flatten().to(_F64)
    pick = _sample_mask(len(pooled), len(stats.samples), g)
    pick[torch.stack([pooled.argmin(), pooled.argmax()])] = True
    return pooled[pick]


def fit_group(layer: KANLinear, stats: LayerStats, g: int, library=None, top_k: int = 1) -> list:
    """The best ``top_k`` formulas (:func:`fit_symbolic`) for group function ``R_g`` of a grouped layer,
    fitted on :func:`group_samples`."""
    x = group_samples(layer, stats, g)
    return fit_symbolic(x, _group_values(layer, g, x), library, top_k=top_k)


def _resolve_layer(target, block: int | None, layer: int | None) -> KANLinear:
    if isinstance(target, KANLinear):
        return target
    layers = kan_layers(target)
    if (block, layer) not in layers:
        raise ValueError(f"no KAN layer (block={block}, layer={layer}); the model has {sorted(layers)}")
    return layers[block, layer]


def _r2(y: torch.Tensor, fitted: torch.Tensor) -> float:
    sst = (y - y.mean()).square().sum().item()
    return 1.0 - (y - fitted).square().sum().item() / sst if sst > 0 else 1.0


def _short_number(value: sympy.Float) -> sympy.Expr:
    """``value`` to 4 significant digits; an integer if that is +-1 (so ``1.0*x`` prints as ``x``)."""
    short = float(f"{float(value):.4g}")
    return sympy.Integer(int(short)) if abs(short) == 1 else sympy.Float(short, 4)


def _fit_entry(fit, symbol: sympy.Symbol, weight: float = 1.0) -> dict:
    """A fit as JSON: name, parameters, R^2 and ``weight * formula`` in ``symbol`` (4 digits)."""
    formula = fit.formula.subs(sympy.Symbol("x"), symbol)
    formula = formula if weight == 1.0 else weight * formula
    formula = formula.xreplace({v: _short_number(v) for v in formula.atoms(sympy.Float)})
    return {**fit.to_dict(), "weight": weight, "formula": str(formula)}


def auto_symbolic(
    target,
    inputs,
    *,
    block: int | None = None,
    layer: int | None = None,
    top_k: int = 8,
    library: Sequence[str] | Mapping[str, Candidate] | None = None,
    out_dir: str | Path | None = None,
) -> list[dict]:
    """Name the ``top_k`` most important edges of a KAN layer with formulas (:func:`fit_symbolic`).

    Args:
        target: a :class:`KANLinear`, or a KAN-GPT-2 model with ``block`` and ``layer`` choosing
            ``model.transformer.h[block].mlp.layers[layer]``.
        inputs: the layer's :class:`LayerStats`, or sample inputs (..., in) of the layer.
        top_k: number of edges, by decreasing :func:`edge_importance`.
        library: candidate functions, as for :func:`fit_symbolic`.
        out_dir: if given, ``symbolic.md`` and ``symbolic.json`` are written there.

    Returns:
        One dict per edge, most important first: ``input``, ``output``, ``importance``, ``best``
        (name, a, b, c, d, weight, r2, complexity and ``formula``, a sympy string in ``x_<input>``)
        and ``runners_up`` (the next two fits). Edges are fitted on the sample inputs of their
        input. For grouped layers every group function ``R_g`` is fitted once, on the pooled samples
        of the group's inputs; the edge's formula is ``w_ij`` times its group's (``weight``,
        ``group``) and its ``r2`` is measured on the edge's own inputs.
    """
    kan = _resolve_layer(target, block, layer)
    stats = inputs if isinstance(inputs, LayerStats) else layer_statistics(kan, inputs)
    edges = rank_edges(edge_importance(kan, stats), top_k)
    grouped = kan.sharing == "group"
    group_fits: dict[int, list] = {}
    for edge in edges:
        i, j = edge["input"], edge["output"]
        x = stats.samples[:, i].to(_F64)
        symbol = sympy.Symbol(f"x_{i}")
        if grouped:
            g = i // kan.basis.group_size
            if g not in group_fits:
                group_fits[g] = fit_group(kan, stats, g, library, top_k=3)
            fits, weight = group_fits[g], _coefficients(kan)[j, i, 0].item()
            entries = [_fit_entry(fit, symbol, weight) for fit in fits]
            for entry, fit in zip(entries, fits, strict=True):
                entry["r2"] = _r2(_group_values(kan, g, x), fit(x))
            edge.update(group=g)
        else:
            fits = fit_symbolic(x, edge_values(kan, i, j, x), library, top_k=3)
            entries = [_fit_entry(fit, symbol) for fit in fits]
        edge.update(best=entries[0], runners_up=entries[1:])
    if out_dir is not None:
        _write_symbolic_report(Path(out_dir), kan, edges, block, layer, len(stats.samples))
    return edges


def _write_symbolic_report(folder: Path, kan: KANLinear, edges: list[dict], block, layer, points: int):
    where = "" if block is None else f"block {block}, layer {layer}: "
    title = f"{where}{kan.basis_name} KAN layer {kan.in_features} -> {kan.out_features}"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"block": block, "layer": layer, "basis": kan.basis_name, "points": points, "edges": edges}
    (folder / "symbolic.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        f"# Symbolic fits ({title})",
        "",
        f"The {len(edges)} most important edges; each edge function phi_j,i(x_i) is fitted as "
        f"c*f(a*x_i + b) + d over {points} sample inputs (`kangpt.interpret.symbolic.fit_symbolic`).",
    ]
    if kan.sharing == "group":
        lines.append("Grouped layer: phi_j,i = w_j,i * R_g(x_i); the group function R_g is the one fitted.")
    lines += [
        "",
        "| rank | edge i → j | importance | formula | R² | next best (R²) |",
        "|---|---|---|---|---|---|",
    ]
    for rank, e in enumerate(edges, 1):
        others = ", ".join(f"{r['name']} ({r['r2']:.4f})" for r in e["runners_up"])
        lines.append(
            f"| {rank} | {e['input']} → {e['output']} | {e['importance']:.4g} | `{e['best']['formula']}` "
            f"| {e['best']['r2']:.4f} | {others} |"
        )
    (folder / "symbolic.md").write_text("\n".join(lines) + "\n")
