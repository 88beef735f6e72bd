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
    symbolic, fits = symbolic_model(model, stats)              # every group function a formula

or, from the shell, ``kangpt inspect MODEL_DIR`` (:mod:`kangpt.commands.inspect`).

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

from ..training.evaluation import validation_loss
from .formulas import auto_symbolic, edge_values
from .importance import edge_importance, edge_moments, importance_report, input_importance, rank_edges
from .plots import plot_edges, plot_group_functions, plot_importance
from .pruning import prune
from .statistics import LayerStats, collect_statistics, kan_layers, layer_statistics, sample_blocks
from .symbolic import fit_symbolic
from .symbolic_model import symbolic_model

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
    "plot_group_functions",
    "plot_importance",
    "prune",
    "rank_edges",
    "sample_blocks",
    "symbolic_model",
    "validation_loss",
]
