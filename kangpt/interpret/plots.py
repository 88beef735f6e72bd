"""Pictures of a KAN layer: its most important edges, its importance matrix, its group functions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io.plotting import new_figure
from ..kan import KANLinear
from .formulas import _group_values, edge_values
from .importance import edge_importance, rank_edges
from .statistics import LayerStats, _sample_mask
from .symbolic import LIBRARY

_F64 = torch.float64
_PLOT_POINTS = 200  # points per drawn edge function
_PLOT_QUANTILES = (0.001, 0.999)  # the drawn input range: these quantiles of the sample inputs


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


def plot_group_functions(layer: KANLinear, stats: LayerStats, path: str | Path) -> Path:
    """Draw the group functions ``R_g`` of a grouped layer, each over the range its inputs take (their
    pooled sample inputs), to a PNG; return its path."""
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
    return Path(path)
