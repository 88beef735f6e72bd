"""Look inside a KAN-GPT-2: edge importance, pictures of the learned edges, formulas, pruning.

Every edge ``i -> j`` of a KAN layer is a 1-D function ``phi_ij(x_i) = sum_f W[j, i, f] F_f(x_i)``
of input i's features ``F`` (see :mod:`kangpt.kan`; for a grouped layer, ``rational`` included, the
single feature is the function of the input's group, so ``phi_ij = w_ij R_g(x_i)``). Everything here
is measured on sample tokens run through the model::

    stats = collect_statistics(model, input_ids)              # {(block, layer): LayerStats}
    imp = edge_importance(layer, stats[0, 0])                  # (out, in)
    report = auto_symbolic(model, stats[0, 0], block=0, layer=0, top_k=8, out_dir="inspect")
    plot_edges(layer, stats[0, 0], "edges.png")
    pruned, info = prune(model, stats, hidden_fraction=0.25)   # a new, smaller model

or, from the shell, ``kangpt inspect MODEL_DIR`` (see :func:`run_inspect`).

Statistics. For each KAN layer, :class:`LayerStats` holds the mean and covariance of every input's
features over the tokens, the variance of every output, and the inputs of a random subset of the
tokens (for plots and fits). Nothing of size (tokens, out, in) is ever built.

Importance. Replacing edge ``i -> j`` by its mean value (folded into the bias) changes output j by
``phi_ij - E[phi_ij]``, whose RMS over the tokens is the edge's *spread*
``s_ij = std(phi_ij(x_i)) = sqrt(W_ji^T C_i W_ji)`` (``C_i``: covariance of input i's features).
The *edge importance* is that change relative to the spread of the layer's whole output vector,

    I_ij = s_ij / sqrt(sum_j Var(y_j)),

and the *input importance* of input i is the same ratio when all its edges are replaced by their
means, which changes each output j by its own edge: ``U_i = sqrt(sum_j s_ij^2) / sqrt(sum_j Var(y_j))``
(exactly, not a first-order estimate). A hidden unit k of a ``d -> h -> d`` block is input k of the
block's second layer, so its importance ``U_k`` is exactly the relative RMS change of the block's
output when the unit is removed and its mean folded into the output bias. The unit's incoming edges
act through the distribution of ``h_k`` (a unit whose incoming edges are all flat is constant and
scores 0). Input spreads are not used as the normaliser (pykan's ``std(phi) / std(x)``): that ratio
is an edge's gain, which can be large for an edge whose nearly constant input contributes nothing.

Pruning (:func:`prune`) removes hidden units for real (the new model's ``kan_hidden_size`` is a list
of per-block widths) and zeroes the coefficients of pruned edges (the parameter count stays; the
number of non-zero parameters drops). Removed parts are replaced by their mean over the sample
tokens, folded into the bias of the layer they fed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch
from torch import nn

from .cli import CommandError, command, load_model
from .data import DataError, load_documents, pack_documents
from .evaluation import validation_loss
from .kan import KANLinear, coefficient_view
from .plotting import new_figure
from .run_dir import publish, remove, temporary_name
from .symbolic import LIBRARY, Candidate, fit_symbolic

__all__ = [
    "LayerStats",
    "auto_symbolic",
    "collect_statistics",
    "edge_importance",
    "edge_moments",
    "edge_values",
    "fit_symbolic",
    "importance_report",
    "input_importance",
    "kan_layers",
    "layer_statistics",
    "plot_edges",
    "plot_importance",
    "prune",
    "rank_edges",
    "run_inspect",
    "sample_blocks",
    "validation_loss",
]

_F64 = torch.float64
_FEATURE_CHUNK = 1 << 22  # feature elements per chunk when accumulating statistics
_PLOT_POINTS = 200  # points per drawn edge function
_PLOT_QUANTILES = (0.001, 0.999)  # the drawn input range: these quantiles of the sample inputs


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class LayerStats:
    """Statistics of one KAN layer over sample tokens (on the CPU).

    Attributes:
        tokens: number of tokens seen.
        feature_mean: (in, F) float64 mean of every input's features.
        feature_cov: (in, F, F) float64 covariance of every input's features (population).
        output_var: (out,) float64 variance of every output.
        samples: (S, in) float32 inputs of S randomly chosen tokens (for plots and fits).
    """

    tokens: int
    feature_mean: torch.Tensor
    feature_cov: torch.Tensor
    output_var: torch.Tensor
    samples: torch.Tensor


class _Accumulator:
    """Running sums of one layer's features and outputs, in float64 on the layer's device."""

    def __init__(self, layer: KANLinear):
        self.layer = layer
        self.tokens = 0
        n_in, n_out, n_feat = layer.in_features, layer.out_features, layer.num_features
        factory = {"device": layer.weight.device, "dtype": _F64}
        self.f_sum = torch.zeros(n_in, n_feat, **factory)
        self.ff_sum = torch.zeros(n_in, n_feat, n_feat, **factory)
        self.y_sum = torch.zeros(n_out, **factory)
        self.yy_sum = torch.zeros(n_out, **factory)
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> None:
        """Add tokens: inputs x (n, in), outputs y (n, out); rows where ``keep`` (n,) is set are sampled."""
        x = x.detach()
        chunk = max(1, _FEATURE_CHUNK // (self.layer.in_features * self.layer.num_features))
        for s in range(0, len(x), chunk):
            feats = self.layer.basis.features(x[s : s + chunk].to(_F64)).transpose(1, 2)  # (n, in, F)
            self.f_sum += feats.sum(0)
            self.ff_sum += torch.einsum("nif,nig->ifg", feats, feats)
        y = y.detach().to(_F64)
        self.y_sum += y.sum(0)
        self.yy_sum += (y * y).sum(0)
        self.tokens += len(x)
        self.samples.append(x[keep].float().cpu())

    def result(self) -> LayerStats:
        n = max(self.tokens, 1)
        mean = self.f_sum / n
        cov = self.ff_sum / n - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        y_mean = self.y_sum / n
        return LayerStats(
            tokens=self.tokens,
            feature_mean=mean.cpu(),
            feature_cov=cov.cpu(),
            output_var=(self.yy_sum / n - y_mean * y_mean).clamp(min=0).cpu(),
            samples=torch.cat(self.samples),
        )


def _sample_mask(n: int, samples: int, seed: int) -> torch.Tensor:
    """(n,) bool: ``samples`` positions chosen at random (all when n <= samples)."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]] = True
    return keep


def layer_statistics(layer: KANLinear, x: torch.Tensor, *, samples: int = 2048, seed: int = 0) -> LayerStats:
    """Statistics of a single KAN layer on inputs ``x`` (..., in); see :class:`LayerStats`."""
    x = x.reshape(-1, layer.in_features).to(layer.weight.device)
    acc = _Accumulator(layer)
    with torch.no_grad():
        acc.update(x, layer(x), _sample_mask(len(x), samples, seed).to(x.device))
    return acc.result()


def kan_layers(model: nn.Module) -> dict[tuple[int, int], KANLinear]:
    """The KAN layers of a KAN-GPT-2 model (LM head or bare), keyed by ``(block, layer)``."""
    config = getattr(model, "config", None)
    if getattr(config, "ffn_type", None) != "kan":
        raise ValueError(f"the model has no KAN blocks (ffn_type={getattr(config, 'ffn_type', None)!r})")
    base = getattr(model, "transformer", model)
    return {(b, i): layer for b, block in enumerate(base.h) for i, layer in enumerate(block.mlp.layers)}


@torch.no_grad()
def collect_statistics(
    model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, samples: int = 2048, seed: int = 0
) -> dict[tuple[int, int], LayerStats]:
    """Run token blocks ``input_ids`` (N, T) through ``model`` (in eval mode) and return the
    :class:`LayerStats` of every KAN layer, keyed by ``(block, layer)``.

    The same ``samples`` tokens (drawn with ``seed``) are kept as sample inputs of every layer.
    """
    layers = kan_layers(model)
    device = next(model.parameters()).device
    keep = _sample_mask(input_ids.numel(), samples, seed).view(input_ids.shape)
    accumulators = {key: _Accumulator(layer) for key, layer in layers.items()}
    batch_keep: list[torch.Tensor] = []  # the current batch's sample mask, flattened

    def hook(key):
        def record(module, args, output):
            x = args[0].reshape(-1, module.in_features)
            accumulators[key].update(x, output.reshape(-1, module.out_features), batch_keep[0])

        return record

    handles = [layer.register_forward_hook(hook(key)) for key, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(input_ids), batch_size):
            batch_keep[:] = [keep[s : s + batch_size].reshape(-1).to(device)]
            model(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: acc.result() for key, acc in accumulators.items()}


# ---------------------------------------------------------------------------------------------
# Importance


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


# ---------------------------------------------------------------------------------------------
# Edge functions and formulas


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
                pooled = stats.samples[:, g * kan.basis.group_size : (g + 1) * kan.basis.group_size]
                pooled = pooled.flatten().to(_F64)
                pick = _sample_mask(len(pooled), len(stats.samples), g)
                # with the extremes, every input of the group lies in the domain of the fit (sqrt, log)
                pick[torch.stack([pooled.argmin(), pooled.argmax()])] = True
                pooled = pooled[pick]
                group_fits[g] = fit_symbolic(pooled, _group_values(kan, g, pooled), library, top_k=3)
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
        f"c*f(a*x_i + b) + d over {points} sample inputs (`kangpt.symbolic.fit_symbolic`).",
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


# ---------------------------------------------------------------------------------------------
# Plots


def _seen_range(seen: torch.Tensor) -> torch.Tensor:
    """(_PLOT_POINTS,) points spanning the 0.1%-99.9% quantiles of sample inputs (width 1 if constant)."""
    seen = seen[_sample_mask(len(seen), 1 << 20, 0)]  # torch.quantile takes at most 2^24 values
    lo, hi = torch.quantile(seen, torch.tensor(_PLOT_QUANTILES, dtype=_F64)).tolist()
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    return torch.linspace(lo, hi, _PLOT_POINTS, dtype=_F64)


def _fit_curve(entry: dict, x: torch.Tensor) -> torch.Tensor | None:
    """Values of a fit entry of :func:`auto_symbolic` at x (None for functions not in LIBRARY)."""
    cand = LIBRARY.get(entry["name"])
    if cand is None:
        return None
    return entry["weight"] * (entry["c"] * cand.fn(entry["a"] * x + entry["b"]) + entry["d"])


def plot_edges(
    layer: KANLinear,
    stats: LayerStats,
    path: str | Path,
    *,
    top_k: int = 8,
    fits: Sequence[dict] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the ``top_k`` most important edges of a layer to a PNG and return its path.

    Each panel shows ``phi_ij`` over the input range seen (the 0.1%-99.9% quantiles of the sample
    inputs of input i) and, beneath it, the histogram of those inputs. ``fits`` (the output of
    :func:`auto_symbolic`) adds each edge's best formula as a dashed line.
    """
    formulas = {(e["input"], e["output"]): e["best"] for e in fits or ()}
    edges = rank_edges(edge_importance(layer, stats), top_k)
    cols = min(4, len(edges))
    rows = math.ceil(len(edges) / cols)
    fig = new_figure(3.6 * cols, 3.2 * rows)
    grid = fig.add_gridspec(rows, cols)
    for n, edge in enumerate(edges):
        i, j = edge["input"], edge["output"]
        seen = stats.samples[:, i].to(_F64)
        x = _seen_range(seen)
        lo, hi = x[0].item(), x[-1].item()
        top, bottom = (
            grid[n // cols, n % cols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0).subplots(sharex=True)
        )
        top.plot(x, edge_values(layer, i, j, x), color="C0", label="learned")
        fit = formulas.get((i, j))
        curve = _fit_curve(fit, x) if fit else None
        if curve is not None:
            top.plot(x, curve, "--", color="C3", label=f"{fit['name']}, R²={fit['r2']:.3f}")
            top.legend(fontsize=7, loc="best")
        top.set_title(f"edge {i} → {j}   importance {edge['importance']:.3g}", fontsize=9)
        top.tick_params(labelsize=7)
        bottom.hist(seen[(seen >= lo) & (seen <= hi)].numpy(), bins=40, color="0.6")
        bottom.set_yticks([])
        bottom.set_xlabel(f"x_{i}", fontsize=8)
        bottom.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_importance(
    importance: torch.Tensor,
    path: str | Path,
    *,
    max_rows: int = 64,
    max_cols: int = 128,
    title: str | None = None,
) -> Path:
    """Heatmap of an (out, in) edge-importance matrix (log colour scale) to a PNG; returns its path.

    Larger layers show the ``max_rows`` outputs and ``max_cols`` inputs of highest total importance,
    each sorted by it (the axis labels say so).
    """
    imp = importance.double()
    rows = torch.argsort(imp.sum(1), descending=True)[:max_rows]
    cols = torch.argsort(imp.sum(0), descending=True)[:max_cols]
    shown = imp[rows][:, cols]
    positive = shown[shown > 0]
    vmax = positive.max().item() if len(positive) else 1.0
    vmin = max(positive.min().item() if len(positive) else vmax, vmax * 1e-4)
    fig = new_figure(min(14.0, 3 + 0.08 * len(cols)), min(10.0, 2.5 + 0.08 * len(rows)))
    from matplotlib.colors import LogNorm  # matplotlib is there: new_figure checked

    ax = fig.add_subplot()
    picture = ax.imshow(
        shown.clamp(min=vmin).numpy(),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=vmin, vmax=vmax),
    )
    fig.colorbar(picture, ax=ax, label="edge importance")

    def label(name, picked, total):
        which = f"top {len(picked)} of {total}" if len(picked) < total else "all"
        return f"{name} ({which}, sorted by importance)"

    ax.set_xlabel(label("input i", cols, imp.shape[1]))
    ax.set_ylabel(label("output j", rows, imp.shape[0]))
    for axis, picked in ((ax.xaxis, cols), (ax.yaxis, rows)):  # tick labels are the real indices
        ticks = range(0, len(picked), math.ceil(len(picked) / 32))
        axis.set_ticks(ticks, [str(int(picked[t])) for t in ticks], fontsize=7)
    ax.tick_params(axis="x", labelrotation=90)
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def _plot_groups(layer: KANLinear, stats: LayerStats, path: Path) -> Path:
    """The group functions ``R_g`` of a grouped layer over the range of their pooled inputs."""
    size = layer.basis.group_size
    cols = min(4, layer.basis.groups)
    fig = new_figure(3.2 * cols, 2.6 * math.ceil(layer.basis.groups / cols))
    axes = fig.subplots(math.ceil(layer.basis.groups / cols), cols, squeeze=False).flatten()
    for g in range(layer.basis.groups):
        x = _seen_range(stats.samples[:, g * size : (g + 1) * size].flatten().to(_F64))
        axes[g].plot(x, _group_values(layer, g, x))
        axes[g].set_title(f"R_{g} (inputs {g * size}-{(g + 1) * size - 1})", fontsize=9)
        axes[g].tick_params(labelsize=7)
    for ax in axes[layer.basis.groups :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Pruning


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
        step = second.groups if second.sharing == "group" else 1
        keep = _kept_units(input_importance(second, stats[b, 1]), count, step).to(first.weight.device)
        removed = torch.ones(second.in_features, dtype=torch.bool, device=keep.device)
        removed[keep] = False
        _, mean = edge_moments(second, stats[b, 1])  # (d, h)
        p0, p1 = names[first] + ".", names[second] + "."
        state[p0 + "weight"] = first.weight.view(first.out_features, -1)[keep]
        state[p0 + "bias"] = first.bias[keep]
        w2 = second.weight.view(second.out_features, -1, second.in_features)[..., keep]  # (d, F, kept)
        state[p1 + "weight"] = w2.reshape(second.out_features, -1)
        state[p1 + "bias"] = second.bias + mean[:, removed.cpu()].sum(1).to(second.bias)
        kept[b], widths[b] = keep, len(keep)
    zeroed = 0
    for (b, i), layer in layers.items():
        if edge_fraction > 0:
            spread, mean = edge_moments(layer, stats[b, i])
            if b in kept:  # hidden units removed above: rows of layer 0, columns of layer 1
                index = kept[b].cpu()
                spread, mean = (spread[index], mean[index]) if i == 0 else (spread[:, index], mean[:, index])
            zeroed += _zero_edges(state, names[layer] + ".", spread, mean, edge_fraction)
    new_config = copy.deepcopy(config)
    if removals:
        new_config.kan_hidden_size = widths
    parameter = next(model.parameters())
    pruned = type(model)(new_config).to(device=parameter.device, dtype=parameter.dtype)
    pruned.load_state_dict(state)
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.eval()
    before, after = _parameter_counts(model), _parameter_counts(pruned)
    report = {
        "hidden_fraction": hidden_fraction,
        "edge_fraction": edge_fraction,
        "scope": scope,
        "hidden_sizes": {
            "before": widths_before,
            "after": widths,
        },
        "zeroed_edges": zeroed,
        **{key: {"before": before[key], "after": after[key]} for key in before},
    }
    return pruned, report


@torch.no_grad()
# ---------------------------------------------------------------------------------------------
# Sample tokens


def sample_blocks(tokenizer, block_size: int, *, text_file: str | Path | None = None) -> torch.Tensor:
    """Token blocks (N, block_size) to inspect a model with.

    Default: the validation documents of the standard-library corpus (``load_documents("stdlib")``);
    with ``text_file``, that file's text as one document. Packed by :func:`kangpt.data.pack_documents`.
    """
    if text_file is None:
        _, docs = load_documents("stdlib")
    else:
        path = Path(text_file).expanduser()
        try:
            docs = [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read text file {str(text_file)!r}: {err}") from err
    return torch.tensor(pack_documents(docs, tokenizer, block_size)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Command line: kangpt inspect


@command("inspect", "plot a trained model's KAN edges, fit formulas to them and optionally prune it")
def inspect_command(parser: argparse.ArgumentParser):
    parser.add_argument("model_dir", help="model folder (save_pretrained output, e.g. OUT_DIR/model)")
    parser.add_argument("--out", default="inspect", help="output folder (default: ./inspect)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--block", type=int, default=0, help="block to plot and fit (negative: from the end)")
    parser.add_argument("--layer", type=int, default=0, help="KAN layer of the block (0 or 1)")
    parser.add_argument("--top-k", type=int, default=8, help="edges to plot and fit")
    parser.add_argument("--tokens", type=int, default=8192, help="sample tokens for the statistics")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="other tokens for validation losses")
    parser.add_argument("--text", default=None, help="text file to take tokens from (default: stdlib corpus)")
    parser.add_argument("--block-size", type=int, default=None, help="block length (default: n_positions)")
    parser.add_argument("--samples", type=int, default=2048, help="sample inputs kept for plots and fits")
    parser.add_argument("--library", default=None, help="comma-separated formula names (default: all)")
    parser.add_argument("--prune-hidden", type=float, default=0.0, help="fraction of hidden units to remove")
    parser.add_argument("--prune-edges", type=float, default=0.0, help="fraction of edges to zero")
    parser.add_argument(
        "--prune-scope",
        choices=("block", "global"),
        default="block",
        help="block: every block loses the same fraction; global: the least important units overall",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return run_inspect


def run_inspect(args: argparse.Namespace) -> int:
    """``kangpt inspect``: write into ``args.out``

    - ``importance.json`` (:func:`importance_report`) and ``importance.png`` (heatmap of the chosen
      layer), ``edges.png`` (its top-k edges with their formulas), ``groups.png`` (grouped layers),
    - ``symbolic.md`` and ``symbolic.json`` (:func:`auto_symbolic`),
    - with ``--prune-hidden``/``--prune-edges``: ``pruned/`` (model and tokenizer) and ``pruning.json``
      (:func:`prune`'s report plus validation losses before and after, on tokens not used for the
      statistics).

    The folder is written under a temporary name and renamed when complete.
    """
    import datasets

    _check_inspect_args(args)
    out, folder = Path(args.out).expanduser(), Path(args.model_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise CommandError(f"{args.model_dir!r} is not a model folder (no config.json)")
    protected = {p for d in (folder.resolve(), Path.cwd()) for p in (d, *d.parents)}
    if out.resolve() in protected:
        raise CommandError(f"--out {str(out)!r} would replace the model folder or the working directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CommandError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")
    try:
        new_figure(1, 1)
    except ModuleNotFoundError as err:
        raise CommandError(str(err)) from err
    datasets.disable_progress_bars()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = load_model(str(folder), device)
    if getattr(model.config, "ffn_type", None) != "kan":
        raise CommandError(f"{args.model_dir!r} has no KAN blocks to inspect")
    layers = kan_layers(model)
    block = args.block + model.config.n_layer if args.block < 0 else args.block
    if (block, args.layer) not in layers:
        raise CommandError(
            f"no KAN layer --block {args.block} --layer {args.layer}; layers: {sorted(layers)}"
        )
    stats_ids, eval_ids = _split_blocks(args, tokenizer, model.config.n_positions)

    tmp = temporary_name(out)
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        print(f"statistics of {len(layers)} KAN layers over {stats_ids.numel()} tokens")
        stats = collect_statistics(model, stats_ids, batch_size=args.batch_size, samples=args.samples)
        (tmp / "importance.json").write_text(json.dumps(importance_report(model, stats), indent=1) + "\n")
        kan, chosen = layers[block, args.layer], stats[block, args.layer]
        name = f"block {block}, layer {args.layer} ({kan.basis_name} {kan.in_features} -> {kan.out_features})"
        plot_importance(edge_importance(kan, chosen), tmp / "importance.png", title=f"importance, {name}")
        library = [s.strip() for s in args.library.split(",")] if args.library else None
        fits = auto_symbolic(
            model, chosen, block=block, layer=args.layer, top_k=args.top_k, library=library, out_dir=tmp
        )
        plot_edges(kan, chosen, tmp / "edges.png", top_k=args.top_k, fits=fits, title=name)
        if kan.sharing == "group":
            _plot_groups(kan, chosen, tmp / "groups.png")
        for e in fits:
            print(
                f"  edge {e['input']:>4} -> {e['output']:<4} importance {e['importance']:.3g}  "
                f"{e['best']['formula']}  (R² {e['best']['r2']:.4f})"
            )
        if args.prune_hidden > 0 or args.prune_edges > 0:
            _prune_and_save(args, model, tokenizer, stats, eval_ids, tmp)
        publish(tmp, out)
    except BaseException:
        remove(tmp)
        raise
    print(f"wrote {out}")
    return 0


def _check_inspect_args(args: argparse.Namespace) -> None:
    for flag, least in (("top_k", 1), ("tokens", 16), ("eval_tokens", 1), ("samples", 16), ("batch_size", 1)):
        if getattr(args, flag) < least:
            raise CommandError(f"--{flag.replace('_', '-')} must be at least {least}")
    if args.block_size is not None and args.block_size < 2:
        raise CommandError("--block-size must be at least 2")
    for flag in ("prune_hidden", "prune_edges"):
        if not 0 <= getattr(args, flag) < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be in [0, 1)")
    if args.library:
        unknown = [s.strip() for s in args.library.split(",") if s.strip() not in LIBRARY]
        if unknown:
            raise CommandError(f"unknown --library functions {unknown}; known: {', '.join(LIBRARY)}")


def _split_blocks(args, tokenizer, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks for the statistics and (disjoint) blocks for validation losses, in a seeded random order."""
    block_size = min(args.block_size or n_positions, n_positions)
    blocks = sample_blocks(tokenizer, block_size, text_file=args.text)
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
    n_stats = math.ceil(args.tokens / block_size)
    pruning = args.prune_hidden > 0 or args.prune_edges > 0
    n_eval = math.ceil(args.eval_tokens / block_size) if pruning else 0
    if n_stats + n_eval > len(blocks):
        if len(blocks) < 1 + (n_eval > 0):
            raise CommandError(f"the text holds only {len(blocks)} block(s) of {block_size} tokens")
        n_stats = max(1, round(len(blocks) * n_stats / (n_stats + n_eval)))
        n_eval = min(n_eval, len(blocks) - n_stats)
        print(
            f"note: only {len(blocks)} blocks of {block_size} tokens: {n_stats} for statistics, "
            f"{n_eval} for validation losses"
        )
    return blocks[:n_stats], blocks[n_stats : n_stats + n_eval]


def _prune_and_save(args, model, tokenizer, stats, eval_ids: torch.Tensor, folder: Path) -> None:
    pruned, report = prune(
        model,
        stats,
        hidden_fraction=args.prune_hidden,
        edge_fraction=args.prune_edges,
        scope=args.prune_scope,
    )
    losses = [validation_loss(m, eval_ids, batch_size=args.batch_size) for m in (model, pruned)]
    report["validation_loss"] = {"before": losses[0], "after": losses[1], "tokens": eval_ids.numel()}
    pruned.save_pretrained(folder / "pruned")
    tokenizer.save_pretrained(folder / "pruned")
    (folder / "pruning.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"pruned: parameters {report['parameters']['before']} -> {report['parameters']['after']}, "
        f"non-zero KAN parameters {report['nonzero_kan_parameters']['before']} -> "
        f"{report['nonzero_kan_parameters']['after']}, validation loss {losses[0]:.4f} -> {losses[1]:.4f}"
    )
