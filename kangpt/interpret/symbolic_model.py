"""A symbolic KAN-GPT-2: every group function of a trained grouped model replaced by its fitted formula.

The new model is the same network with the ``symbolic`` basis (``kangpt.kan_symbolic``): the weights,
biases and everything outside the KAN functions are copied, and each group's function becomes the best
formula :func:`~kangpt.interpret.symbolic.fit_symbolic` finds for it on the layer's sample inputs, among
the functions defined on every real number (:data:`kangpt.kan_symbolic.NAMES`). It saves and loads as
any KAN-GPT-2 (``save_pretrained``, ``AutoModelForCausalLM.from_pretrained``).
"""

from __future__ import annotations

import copy

from torch import nn

from ..kan_symbolic import NAMES
from .formulas import fit_group
from .statistics import LayerStats, kan_layers


def symbolic_model(model: nn.Module,
                   stats: dict[tuple[int, int], LayerStats]) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` (grouped KAN layers) with formulas for functions, and what was fitted.

    ``stats`` are the model's :func:`~kangpt.interpret.collect_statistics`. Returns the new model (in
    eval mode, on the model's device) and one record per group function: ``block``, ``layer``,
    ``group``, the formula (``name``, ``a``, ``b``, ``c``, ``d``, ``formula``) and its ``r2`` on the
    group's sample inputs.
    """
    layers = kan_layers(model)
    per_edge = sorted(key for key, layer in layers.items() if layer.sharing != "group")
    if per_edge:
        raise ValueError(f"KAN layer {per_edge[0]} has a function per edge: only grouped layers have "
                         "one per group to replace")
    config = copy.deepcopy(model.config)
    config.kan_basis = "symbolic"
    symbolic = type(model)(config).to(next(model.parameters()).device).eval()
    _copy_all_but_functions(model, symbolic)
    records = []
    for key, basis in ((key, layer.basis) for key, layer in kan_layers(symbolic).items()):
        for g in range(basis.groups):
            fit = fit_group(layers[key], stats[key], g, list(NAMES))[0]
            basis.formulas[g] = NAMES.index(fit.name)
            basis.affine.data[g] = basis.affine.new_tensor([fit.a, fit.b, fit.c, fit.d])
            records.append({"block": key[0], "layer": key[1], "group": g, **fit.to_dict()})
    return symbolic, records


def _copy_all_but_functions(model: nn.Module, symbolic: nn.Module) -> None:
    """Load ``model``'s state into ``symbolic`` but for the KAN layers' functions (``.basis.``)."""
    kept = {name: value for name, value in model.state_dict().items() if ".basis." not in name}
    missing, unexpected = symbolic.load_state_dict(kept, strict=False)
    left = [name for name in missing if ".basis." not in name]
    if left or unexpected:  # the two models differ elsewhere than in their functions: a bug
        raise RuntimeError(f"the symbolic model's parameters differ from the model's: {left or unexpected}")
