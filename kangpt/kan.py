"""Kolmogorov-Arnold Network (KAN) layers in plain PyTorch.

A KAN layer maps ``in_features`` to ``out_features`` through one learnable 1-D function per edge,

    y_j = sum_i phi_ij(x_i) + bias_j,

where each edge function is a linear combination of a small set of fixed per-input features.
For the spline-like bases (``bspline``, ``rbf``, ``chebyshev``) the features of input ``x_i`` are
``[silu(x_i), B_0(x_i), ..., B_{K-1}(x_i)]`` (the KAN paper's residual SiLU plus K basis functions),
so ``phi_ij(x) = w_ij * silu(x) + sum_k c_ijk * B_k(x)``. For ``rational`` (GR-KAN) and the grouped
layers the single feature is a learnable function shared by a group of inputs.

Because the features of every input are concatenated, the whole layer is ONE matmul against a
2-D weight of shape ``(out_features, n_features * in_features)`` (:meth:`KANLinear.reference_forward`):
FSDP, weight-decay grouping and Hugging Face loading see an ordinary matrix. Features are laid out
feature-major, ``(..., F, in)`` (feature f of every input, then feature f + 1), so that the feature
kernels run over contiguous inputs; :meth:`KANLinear.coefficients` views the weight as
``(out, in, F)``: ``[j, i]`` holds the coefficients of edge i -> j (index 0 is the SiLU weight for
the spline-like bases).

Where the rest lives: the settings in ``kangpt.kan_spec`` (a ``KANSpec``, which a block builds and
checks once and hands to its layers), the bases (formulas and derivatives) in ``kangpt.kan_bases``,
the grouped B-splines' piece table and its blocked eager path in ``kangpt.kan_grouped``, the fast
paths :meth:`KANLinear.forward` takes (a custom autograd function that keeps only the input,
chunking, the compile policy, the Triton dispatch) in ``kangpt.kan_fast``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kan_bases import (
    BSplineBasis,
    ChebyshevBasis,
    GroupedBasis,
    GroupedBSplineBasis,
    RationalBasis,
    RBFBasis,
)
from .kan_fast import kan_linear, triton_kernels_apply
from .kan_spec import BASES, KERNELS, SHARINGS, KANSpec
from .kan_symbolic import SymbolicBasis

__all__ = [
    "BASES",
    "KERNELS",
    "SHARINGS",
    "KANFeedForward",
    "KANLinear",
    "KANSpec",
    "coefficient_view",
    "kan_block_hidden_size",
    "kan_linear_num_parameters",
    "split_settings",
]

# E[silu(z)^2] for z ~ N(0, 1), by quadrature; used for variance-preserving initialisation.
_z = torch.linspace(-12, 12, 48001, dtype=torch.float64, device="cpu")
_SILU_SECOND_MOMENT = float(
    torch.trapezoid(F.silu(_z) ** 2 * torch.exp(-_z * _z / 2) / math.sqrt(2 * math.pi), _z)
)
del _z


def coefficient_view(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """A KAN layer's 2-D weight (out, n_features * in) viewed as (out, in, n_features): ``[j, i]``
    holds the coefficients of edge i -> j. A view: writes go to the weight."""
    return weight.view(weight.shape[0], -1, in_features).transpose(1, 2)


class KANLinear(nn.Module):
    """A KAN layer, shape-compatible with ``nn.Linear``: acts on the last dimension of any input.

    Args:
        in_features, out_features: widths, as for ``nn.Linear``.
        spec: the layer's functions (:class:`~kangpt.kan_spec.KANSpec`, checked when it was made;
            default ``KANSpec()``): the basis (``"bspline"``, ``"rbf"``, ``"chebyshev"``,
            ``"rational"`` or ``"symbolic"``; see the basis classes in ``kangpt.kan_bases`` and
            ``kangpt.kan_symbolic`` for formulas and parameters per edge), its grid (``grid_size``
            intervals on ``grid_range``; every spline-like basis has ``K = grid_size + spline_order``
            functions per edge, so they cost the same), how functions are shared and which kernels
            run them:

            - ``sharing="edge"``: every edge has its own function, a combination of the basis's
              ``1 + K`` features (``1 + K`` coefficients per edge); ``sharing="group"``: the inputs
              are cut into ``groups`` contiguous groups (their number must divide ``in_features``)
              that share one learnable function, which the weight scales per edge (one coefficient
              per edge; see ``kangpt.kan_bases.GroupedBasis``). ``rational`` and ``symbolic`` are
              always grouped.
            - ``kernel="auto"``: the fused Triton kernels of ``kangpt.kan_triton`` for a grouped
              B-spline layer on CUDA when ``triton`` is installed, the PyTorch path otherwise;
              ``"triton"``: always the kernels (on CPU tensors only under ``TRITON_INTERPRET=1``);
              ``"torch"``: never.

            A block builds one spec and hands it to each of its layers; :meth:`from_settings` builds
            a layer from keywords instead.
        bias: add a learnable bias per output.
        spline_scale: the spline coefficients start at this fraction of the SiLU weights' scale.
        init_gain: scale of the initial outputs (e.g. 1/sqrt(2 n_layer) for a residual branch).
        chunk_size: tokens per chunk when recomputing features in backward, eager mode (default: about
            2M feature elements per chunk).

    Initialisation: the layer starts close to a SiLU MLP. The SiLU weights (or the linear map after
    the rational) are drawn from N(0, init_gain^2 / (in_features * E[silu(z)^2])), z ~ N(0, 1), so
    a standard-normal input gives outputs of about ``init_gain`` standard deviation; the spline
    coefficients are drawn with ``spline_scale`` times that standard deviation divided by sqrt(K),
    i.e. the spline part starts small.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: KANSpec | None = None,
        *,
        bias: bool = True,
        spline_scale: float = 0.1,
        init_gain: float = 1.0,
        chunk_size: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if spec is None:
            spec = KANSpec()
        elif type(spec).__name__ != "KANSpec":  # not isinstance: remote code loads kan_spec.py twice
            raise TypeError(
                f"spec must be a KANSpec (KANLinear.from_settings takes keywords), got {type(spec).__name__}"
            )
        spec.check_width(in_features)
        if spec.kernel == "triton" and not triton_kernels_apply(spec.basis, spec.sharing):
            raise ValueError(
                "kernel='triton' needs the triton package and a grouped B-spline layer "
                f"(sharing='group', basis='bspline'), got sharing={spec.sharing!r}, basis={spec.basis!r}"
            )
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.spline_scale, self.init_gain, self.chunk_size = spline_scale, init_gain, chunk_size
        self.basis = make_basis(spec, in_features, device, dtype)
        factory = {"device": device, "dtype": dtype}
        columns = self.basis.num_features * in_features  # (out, F * in): feature-major, one matmul
        self.weight = nn.Parameter(torch.empty(out_features, columns, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_settings(cls, in_features: int, out_features: int, **settings) -> KANLinear:
        """A layer from keywords: :class:`~kangpt.kan_spec.KANSpec`'s fields (``basis``,
        ``grid_size``, ``sharing``, ``groups``, ...) make its spec, the others (``bias``,
        ``init_gain``, ...) go to the constructor, e.g.
        ``KANLinear.from_settings(768, 3072, sharing="group", groups=8)``."""
        spec, layer_settings = split_settings(settings)
        return cls(in_features, out_features, spec, **layer_settings)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) by the definition: the features of every input,
        then one matmul. Autograd keeps the features; :meth:`forward` gives the same values, faster,
        keeping only ``x``."""
        feats = self.basis.features(x.reshape(-1, self.in_features)).flatten(1)  # (tokens, F * in)
        y = F.linear(feats.to(self.weight.dtype), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), by the fastest path that applies
        (``kangpt.kan_fast``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected last dimension {self.in_features}, got input of shape {tuple(x.shape)}"
            )
        out = kan_linear(self, x.reshape(-1, self.in_features))
        return out.view(*x.shape[:-1], self.out_features)

    # The settings, as attributes (read from the spec).
    basis_name = property(lambda self: self.spec.basis,
                          doc="The basis: bspline, rbf, chebyshev, rational or symbolic.")
    grid_size = property(lambda self: self.spec.grid_size, doc="Grid intervals of the spline-like bases.")
    spline_order = property(lambda self: self.spec.spline_order, doc="Order of the B-splines.")
    grid_range = property(lambda self: self.spec.grid_range, doc="(low, high) of the grid.")
    sharing = property(lambda self: self.spec.sharing, doc="edge or group (rational: group).")
    groups = property(lambda self: self.spec.groups, doc="Input groups of a grouped layer.")
    rational_order = property(lambda self: self.spec.rational_order, doc="(m, n) of the rational.")
    kernel = property(lambda self: self.spec.kernel, doc="auto, triton or torch.")

    @property
    def num_features(self) -> int:
        """Features per input: 1 + K for the spline-like bases per edge, 1 for the grouped functions."""
        return self.basis.num_features

    def reset_parameters(self):
        """Initialise as described in the class docstring."""
        with torch.no_grad():
            self.weight.copy_(self.initial_weight())
            if self.bias is not None:
                self.bias.zero_()
            for name, value in self.basis.initial_parameters().items():
                getattr(self.basis, name).copy_(value)

    def initial_weight(self) -> torch.Tensor:
        """A freshly drawn initial weight (out, n_features * in); see the class docstring."""
        std = self.init_gain / math.sqrt(self.in_features * _SILU_SECOND_MOMENT)
        w = torch.empty_like(self.weight)
        c = w.view(self.out_features, self.num_features, self.in_features)  # (out, F, in)
        c[:, :1].normal_(std=std)
        if self.num_features > 1:
            c[:, 1:].normal_(std=self.spline_scale * std / math.sqrt(self.num_features - 1))
        return w

    def coefficients(self) -> torch.Tensor:
        """The weight viewed as (out, in, n_features): ``[j, i]`` holds the coefficients of edge
        i -> j (``[j, i, 0]`` the SiLU weight for the spline-like bases). A view: writes go to the weight."""
        return coefficient_view(self.weight, self.in_features)

    def edge_functions(self, x: torch.Tensor) -> torch.Tensor:
        """Values of every edge function at points ``x``.

        ``x`` is (P,) (the same points for every input) or (P, in_features). Returns (P, out, in):
        ``result[p, j, i] = phi_ij(x[p, i])`` (bias not included).
        """
        if x.dim() == 1:
            x = x.unsqueeze(-1).expand(-1, self.in_features)
        feats = self.basis.features(x)  # (P, F, in)
        return torch.einsum("pfi,jif->pji", feats, self.coefficients().to(feats.dtype))

    def edge_magnitudes(self) -> torch.Tensor:
        """(out, in): mean absolute coefficient of each edge, a cheap proxy for its size."""
        return self.coefficients().abs().mean(-1)

    def regularization_loss(self, l1: float = 1.0, entropy: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
        """The KAN paper's sparsity regulariser, computed from the coefficients (no activations).

        With edge magnitudes ``m_ij`` from :meth:`edge_magnitudes`, returns
        ``l1 * sum_ij m_ij + entropy * H(p)``, where ``p = m / sum(m)`` and ``H(p) = -sum p log p``.
        The L1 term pushes edges to zero; the entropy term favours few large edges over many small.
        """
        m = self.edge_magnitudes()
        total = m.sum()
        p = m / (total + eps)
        return l1 * total - entropy * (p * torch.log(p + eps)).sum()

    @torch.no_grad()
    def extend_grid(self, new_grid_size: int) -> None:
        """Refine the grid to ``new_grid_size`` intervals (KAN grid extension, coarse to fine).

        The spline coefficients (per edge, or per group for a grouped layer) are refitted by least
        squares on dense points of ``grid_range`` so that every function is preserved there (exactly,
        up to rounding, when the new grid refines the old one, e.g. 5 -> 10). ``chebyshev`` raises the
        polynomial degree, which is exact everywhere. The parameter that changes shape (the weight,
        or a grouped layer's function coefficients) is replaced by a new one: hand it to the optimizer.
        """
        if not self.spec.has_grid:
            raise ValueError(f"extend_grid does not apply to basis={self.basis_name!r} (it has no grid)")
        if not isinstance(new_grid_size, int) or new_grid_size <= self.grid_size:
            raise ValueError(
                f"new_grid_size must be an integer > grid_size={self.grid_size}, got {new_grid_size!r}"
            )
        self._refit(new_grid_size, self.grid_range)

    def set_grid_range(self, low: float, high: float) -> None:
        """Move the grid to ``[low, high]`` (same number of intervals), e.g. to the range the inputs
        take; every function is refitted by least squares on dense points of the new range. As with
        :meth:`extend_grid`, the refitted parameter is a new one. Not for ``chebyshev`` (its basis
        squashes every input by tanh) nor ``rational`` and ``symbolic`` (no grid)."""
        if self.basis_name == "chebyshev" or not self.spec.has_grid:
            raise ValueError(f"set_grid_range does not apply to basis={self.basis_name!r}")
        if not float(low) < float(high):
            raise ValueError(f"the grid range must have low < high, got ({low!r}, {high!r})")
        self._refit(self.grid_size, (float(low), float(high)))

    def _refit(self, grid_size: int, grid_range: tuple[float, float]) -> None:
        """A new grid of ``grid_size`` intervals on ``grid_range``, the spline coefficients refitted."""
        grouped = self.sharing == "group"
        param = self.basis.coefficients if grouped else self.weight
        n_base = 2 if grouped else 1  # coefficients before the spline's: [x, silu] or [silu]
        old_basis = self.basis
        spec = self.spec.replace(grid_size=grid_size, grid_range=grid_range)
        new_basis = make_basis(spec, self.in_features, param.device, param.dtype)
        old_spline, new_spline = (old_basis.spline, new_basis.spline) if grouped else (old_basis, new_basis)
        k_old, k_new = old_spline.num_functions, new_spline.num_functions
        # Every function's coefficients as (out or groups, n_base + K, in or 1), the spline's last.
        coeffs = (
            param.detach().unsqueeze(-1) if grouped else param.detach().view(self.out_features, 1 + k_old, -1)
        )
        spline = coeffs[:, n_base:].transpose(0, 1).reshape(k_old, -1).double()  # (K_old, functions)
        if self.basis_name == "chebyshev":
            refit = torch.cat([spline, spline.new_zeros(k_new - k_old, spline.shape[1])])
        else:
            x = torch.linspace(*grid_range, 16 * k_new + 1, dtype=torch.float64, device=spline.device)
            old_values, new_values = old_spline.functions(x).t(), new_spline.functions(x).t()  # (P, K)
            refit = torch.linalg.lstsq(new_values, old_values @ spline).solution  # (K_new, functions)
        refit = refit.reshape(k_new, coeffs.shape[0], coeffs.shape[2]).transpose(0, 1).to(coeffs)
        new = nn.Parameter(
            torch.cat([coeffs[:, :n_base], refit], 1).reshape(param.shape[0], -1),
            requires_grad=param.requires_grad,
        )
        if grouped:
            new_basis.coefficients = new
        else:
            self.weight = new
        self.basis, self.spec = new_basis, spec

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, basis={self.basis_name!r}"
        if self.spec.has_grid:
            s += f", grid_size={self.grid_size}, spline_order={self.spline_order}"
            s += f", grid_range={self.grid_range}"
        return s + f", bias={self.bias is not None}"


class KANFeedForward(nn.Module):
    """A KAN feed-forward block: ``d_in -> hidden_size -> d_out`` with two KAN layers, or a single
    ``d_in -> d_out`` KAN layer when ``hidden_size`` is 0 or None. ``output_gain`` is the last
    layer's ``init_gain``; ``hidden_dropout`` the dropout probability on the hidden units.

    Every layer gets the same ``spec``, built and checked once here: the given one, changed by any of
    :class:`~kangpt.kan_spec.KANSpec`'s fields among ``settings`` (``sharing="edge"``, ...), or
    ``KANSpec()`` changed by them; the other ``settings`` go to every :class:`KANLinear`."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        hidden_size: int | None = None,
        output_gain: float = 1.0,
        spec: KANSpec | None = None,
        hidden_dropout: float = 0.0,
        **settings,
    ):
        super().__init__()
        # No module at 0: a dropout of 0 is still a kernel per call on a GPU.
        self.hidden_dropout = nn.Dropout(hidden_dropout) if hidden_dropout else nn.Identity()
        spec, layer_settings = split_settings(settings, spec)
        widths = [d_in, hidden_size, d_out] if hidden_size else [d_in, d_out]
        last = len(widths) - 2
        self.layers = nn.ModuleList(
            KANLinear(a, b, spec, init_gain=output_gain if i == last else 1.0, **layer_settings)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_out)."""
        for i, layer in enumerate(self.layers):
            x = layer(self.hidden_dropout(x) if i else x)
        return x


def split_settings(settings: dict, spec: KANSpec | None = None) -> tuple[KANSpec, dict]:
    """Keyword ``settings`` cut in two: the spec their :class:`~kangpt.kan_spec.KANSpec` fields make
    (``spec``, or ``KANSpec()``, with those fields replaced; checked once) and the others, as they are
    (``KANLinear``'s own: ``bias``, ``init_gain``, ...)."""
    fields = {k: v for k, v in settings.items() if k in KANSpec.__dataclass_fields__}
    others = {k: v for k, v in settings.items() if k not in fields}
    if spec is None:
        return KANSpec(**fields), others
    return (spec.replace(**fields) if fields else spec), others


def kan_linear_num_parameters(
    in_features: int, out_features: int, spec: KANSpec | None = None, **settings
) -> int:
    """Parameter count of ``KANLinear(in_features, out_features, spec)`` without building it;
    ``settings`` as for :meth:`KANLinear.from_settings` (only the spec's fields and ``bias`` count)."""
    spec, others = split_settings(settings, spec)
    return spec.num_parameters(in_features, out_features, others.get("bias", True))


def kan_block_hidden_size(
    d_in: int,
    d_out: int,
    target_params: int,
    *,
    tolerance: float = 0.01,
    multiple_of: int = 8,
    spec: KANSpec | None = None,
    **settings,
) -> int | None:
    """Hidden width of a KAN block whose parameter count matches ``target_params``.

    Returns ``None`` when a single ``d_in -> d_out`` KAN layer is within ``tolerance`` (relative) of
    the target. Otherwise returns the width ``h`` of the two-layer block ``d_in -> h -> d_out``:
    the multiple of ``multiple_of`` closest to the target if one is within ``tolerance`` (matmuls
    on such widths run markedly faster, see eval/bench_kan.py), else simply the closest width. For
    grouped layers, ``h`` is always a multiple of the groups. Parameters grow by about
    ``2 * n_features * d`` per unit of ``h``, so the match is within 1% once ``h`` is over ~50
    (GPT-2 small, per edge: h = 344, +0.7%). ``spec`` and ``settings`` are those of
    :class:`KANFeedForward` (only the spec's fields and ``bias`` count).
    """
    spec, others = split_settings(settings, spec)
    bias = others.get("bias", True)
    single = spec.num_parameters(d_in, d_out, bias)
    if abs(single - target_params) <= tolerance * target_params:
        return None
    step = spec.groups if spec.grouped else 1

    def count(h):
        return spec.num_parameters(d_in, h, bias) + spec.num_parameters(h, d_out, bias)

    def closest(unit):  # the multiple of ``unit`` whose count is closest to the target
        per_unit = count(2 * unit) - count(unit)  # the count is affine in h
        guess = round((target_params - (count(unit) - per_unit)) / per_unit) * unit
        candidates = [h for h in (guess - unit, guess, guess + unit) if h >= unit] or [unit]
        return min(candidates, key=lambda h: abs(count(h) - target_params))

    aligned = closest(math.lcm(step, multiple_of))
    return aligned if abs(count(aligned) - target_params) <= tolerance * target_params else closest(step)


def make_basis(spec: KANSpec, in_features: int, device=None, dtype=None) -> nn.Module:
    """The basis a layer with ``spec`` and ``in_features`` inputs evaluates."""
    factory = {"device": device, "dtype": dtype}
    k, rng = spec.spline_order, spec.grid_range
    if spec.basis == "rational":
        return RationalBasis(in_features, spec.groups, spec.rational_order, **factory)
    if spec.basis == "symbolic":
        return SymbolicBasis(in_features, spec.groups, **factory)
    if spec.basis == "bspline":
        basis = BSplineBasis(spec.grid_size, k, rng)
    elif spec.basis == "rbf":
        basis = RBFBasis(spec.num_functions, rng)
    else:
        basis = ChebyshevBasis(spec.num_functions, rng)
    if not spec.grouped:
        return basis
    grouped = GroupedBSplineBasis if spec.basis == "bspline" else GroupedBasis
    return grouped(basis, in_features, spec.groups, **factory)
