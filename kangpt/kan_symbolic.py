"""Formulas as the functions of a grouped KAN layer: the ``symbolic`` basis.

Every group ``g`` of inputs goes through one formula,

    phi_g(x) = c_g * f_g(a_g * x + b_g) + d_g,

``f_g`` one of :data:`FUNCTIONS`, functions defined on every real number (so that no input, however far
from those a formula was fitted on, leaves its domain). A trained grouped model becomes a symbolic one by
fitting each group function with ``kangpt.interpret.symbolic.fit_symbolic`` (see
``kangpt.interpret.symbolic_model``); the formulas travel in the model's weights: ``formulas`` holds each
group's function as its index in :data:`NAMES`, ``affine`` its ``(a, b, c, d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kan_bases import FeaturesByAutograd, _fp32_features

EXP_CAP = 80.0  # exp's argument is capped here: e^80 is finite in fp32, so no input overflows


def _exp(u: torch.Tensor) -> torch.Tensor:
    return torch.exp(u.clamp(max=EXP_CAP))


# name -> f, elementwise and differentiable. The order is the one the weights store (never reorder).
FUNCTIONS = {
    "x": lambda u: u,
    "x^2": torch.square,
    "abs": torch.abs,
    "x^3": lambda u: u**3,
    "exp": _exp,
    "sin": torch.sin,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "gaussian": lambda u: torch.exp(-u * u),
}
NAMES = tuple(FUNCTIONS)


class SymbolicBasis(FeaturesByAutograd, nn.Module):
    """One formula per group of inputs (see the module docstring); the layer's weight scales it per
    edge, as for the other grouped functions: ``phi_ij(x) = w_ij phi_g(i)(x)``. Every group starts as
    SiLU (``f = silu, a = c = 1, b = d = 0``)."""

    num_features = 1
    chunk_width = 1
    function_parameter = "affine"

    def __init__(self, in_features: int, groups: int, device=None, dtype=None):
        super().__init__()
        self.groups, self.group_size = groups, in_features // groups
        self.register_buffer("formulas", torch.zeros(groups, dtype=torch.long, device=device))
        self.affine = nn.Parameter(torch.empty(groups, 4, device=device, dtype=dtype))

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """Every group SiLU."""
        affine = torch.zeros_like(self.affine)
        affine[:, 0] = affine[:, 2] = 1.0
        return {"formulas": torch.full_like(self.formulas, NAMES.index("silu")), "affine": affine}

    def names(self) -> list[str]:
        """Each group's function, by name."""
        return [NAMES[index] for index in self.formulas.tolist()]

    @_fp32_features
    def group_functions(self, x: torch.Tensor) -> torch.Tensor:
        """(P,) -> (P, groups): every group's formula at points ``x``."""
        return self._formulas(x.unsqueeze(-1).expand(*x.shape, self.groups))

    @_fp32_features
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., 1, in): phi_g(x) of every input, differentiable."""
        xg = x.unflatten(-1, (self.groups, self.group_size)).transpose(-1, -2)  # (..., S, G)
        return self._formulas(xg).transpose(-1, -2).flatten(-2).unsqueeze(-2)

    def _formulas(self, x: torch.Tensor) -> torch.Tensor:
        """(..., G) -> (..., G): group g's formula applied to column g."""
        a, b, c, d = self.affine.to(x.dtype).unbind(-1)  # (G,) each
        u = a * x + b
        names = self.names()
        values = torch.stack([FUNCTIONS[name](u[..., g]) for g, name in enumerate(names)], -1)
        return c * values + d
