"""The settings of a KAN layer's functions in one place: the basis and its grid, how functions are
shared, and which kernels run them. ``KANLinear``, the parameter counting and ``KANGPT2Config`` all
read a :class:`KANSpec`, which checks its values when it is made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BASES = ("bspline", "rbf", "chebyshev", "rational", "symbolic")
GRIDLESS_BASES = ("rational", "symbolic")  # a formula per group: no grid, always grouped
SHARINGS = ("edge", "group")
KERNELS = ("auto", "triton", "torch")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class KANSpec:
    """What a KAN layer's edge functions are (see ``kangpt.kan.KANLinear`` for the formulas).

    Attributes:
        basis: ``"bspline"``, ``"rbf"``, ``"chebyshev"``, ``"rational"`` or ``"symbolic"`` (a formula
            per group, ``kangpt.kan_symbolic``).
        grid_size, spline_order: ``grid_size`` grid intervals; every spline-like basis has
            ``K = grid_size + spline_order`` functions (B-splines of that order, K Gaussians, or
            Chebyshev polynomials up to degree K - 1).
        grid_range: ``(low, high)``, the input interval the grid covers.
        sharing: ``"edge"``, one function per edge; ``"group"``, one per group of inputs, scaled per
            edge by the weight. ``rational`` and ``symbolic`` are always grouped (the spec says
            ``"group"``).
        groups: number of input groups of a grouped layer.
        rational_order: numerator and denominator degrees ``(m, n)`` of ``rational``.
        kernel: ``"auto"``, ``"triton"`` or ``"torch"`` (which code runs a grouped B-spline layer).

    Invalid values raise a ``ValueError`` whose message starts with the field's name.
    """

    basis: str = "bspline"
    grid_size: int = 5
    spline_order: int = 3
    grid_range: tuple[float, float] = (-2.0, 2.0)
    sharing: str = "edge"
    groups: int = 8
    rational_order: tuple[int, int] = (5, 4)
    kernel: str = "auto"

    def __post_init__(self):
        def need(ok: bool, field: str, rule: str):
            if not ok:
                raise ValueError(f"{field} {rule}, got {getattr(self, field)!r}")

        need(self.basis in BASES, "basis", f"must be one of {BASES}")
        need(_is_int(self.grid_size) and self.grid_size >= 1, "grid_size", "must be an integer >= 1")
        need(_is_int(self.spline_order) and self.spline_order >= 0, "spline_order", "must be an integer >= 0")
        need(
            len(self.grid_range) == 2 and float(self.grid_range[0]) < float(self.grid_range[1]),
            "grid_range",
            "must be (low, high) with low < high",
        )
        need(self.sharing in SHARINGS, "sharing", f"must be one of {SHARINGS}")
        need(_is_int(self.groups) and self.groups >= 1, "groups", "must be a positive integer")
        need(
            len(self.rational_order) == 2 and self.rational_order[0] >= 0 and self.rational_order[1] >= 1,
            "rational_order",
            "must be (m >= 0, n >= 1)",
        )
        need(self.kernel in KERNELS, "kernel", f"must be one of {KERNELS}")
        object.__setattr__(self, "grid_range", (float(self.grid_range[0]), float(self.grid_range[1])))
        object.__setattr__(self, "rational_order", (int(self.rational_order[0]), int(self.rational_order[1])))
        if not self.has_grid:
            object.__setattr__(self, "sharing", "group")

    def replace(self, **changes) -> KANSpec:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @property
    def has_grid(self) -> bool:
        """Whether the functions are spline-like, on a grid (not ``rational`` nor ``symbolic``)."""
        return self.basis not in GRIDLESS_BASES

    @property
    def grouped(self) -> bool:
        """Whether groups of inputs share their functions (``rational`` and ``symbolic`` always)."""
        return self.sharing == "group"

    @property
    def num_functions(self) -> int:
        """K, the functions of a spline-like basis."""
        return self.grid_size + self.spline_order

    @property
    def features_per_input(self) -> int:
        """Columns of the layer's weight per input: ``1 + K`` per edge (SiLU and K functions), 1 grouped."""
        return 1 if self.grouped else 1 + self.num_functions

    @property
    def function_parameters(self) -> int:
        """Parameters of the shared functions of a grouped layer (0 per edge): per group, the
        rational's ``m + 1 + n`` coefficients, a formula's ``a, b, c, d``, or the linear, SiLU and K
        spline coefficients."""
        if self.basis == "rational":
            return self.groups * (self.rational_order[0] + 1 + self.rational_order[1])
        if self.basis == "symbolic":
            return self.groups * 4
        return self.groups * (2 + self.num_functions) if self.grouped else 0

    def check_width(self, width: int, name: str = "in_features") -> None:
        """Raise a ``ValueError`` if a layer with ``width`` inputs cannot use this spec (a grouped
        layer's groups must divide it). The one width check: ``KANLinear`` runs it on its inputs, and
        ``KANGPT2Config``'s model on its widths, ``name`` naming the width in the message."""
        if self.grouped and width % self.groups:
            raise ValueError(f"groups must divide {name}={width}, got {self.groups!r}")

    def num_parameters(self, in_features: int, out_features: int, bias: bool = True) -> int:
        """Parameters of a ``KANLinear(in_features, out_features)`` with this spec."""
        weight = out_features * in_features * self.features_per_input
        return weight + (out_features if bias else 0) + self.function_parameters
