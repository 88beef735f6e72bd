"""The functions of KAN layers: the spline-like bases (B-splines, Gaussian RBFs, Chebyshev
polynomials of a squashed input), the group-rational function of GR-KAN, and the grouped functions
(one learnable function per group of inputs) built on the spline-like bases.

Every basis has the interface of :class:`Basis`: its features of an input ``x`` (..., in) are
(..., F, in), a plain differentiable formula (``features``, what ``torch.compile`` fuses and what
plots and fits read) and an eager fast path that writes them into a buffer and, for the backward,
returns the input's gradient from the hand-derived derivative (``features_and_grads``; by autograd,
:class:`FeaturesByAutograd`, for the grouped functions that have none). Each class holds its formula
and its derivative side by side. See ``kangpt.kan`` for how a layer uses them,
and ``kangpt.kan_grouped`` for how the grouped B-splines' fast paths run (their table of polynomial
pieces, evaluated in blocks of rows, and their autograd function for ``torch.compile``).
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .kan_grouped import PieceTableEvaluation

_UPCAST = (torch.float16, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Features are evaluated in at least fp32 (bf16/fp16 inputs are upcast, fp64 is kept). A lookup,
    not ``torch.promote_types``: every layer asks at every decoding step, and an op costs a dispatch."""
    return torch.float32 if x.dtype in _UPCAST else x.dtype


def _fp32_features(method):
    """Run a feature method in at least fp32 with autocast off (matmuls inside stay exact)."""

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        if x.dtype != _compute_dtype(x):  # a no-op .to() still costs a dispatch per call (decoding)
            x = x.to(_compute_dtype(x))
        if not torch.is_autocast_enabled(x.device.type):
            return method(self, x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return method(self, x, *args, **kwargs)

    return wrapper


def _horner(x: torch.Tensor, coefs, inplace: bool = False) -> torch.Tensor:
    """``sum_p coefs[p] * x**p`` by Horner's rule; every ``coefs[p]`` broadcasts against ``x``.

    With ``inplace`` the running value is updated in place (fewer allocations, not differentiable).
    """
    shape = torch.broadcast_shapes(x.shape, *(c.shape for c in coefs))
    if len(coefs) < 2:
        return coefs[0].expand(shape).clone() if coefs else x.new_zeros(shape)
    y = torch.addcmul(coefs[-2], x, coefs[-1])  # one fused multiply-add per power
    for c in coefs[-3::-1]:
        y = torch.addcmul(c, y, x, out=y) if inplace else torch.addcmul(c, y, x)
    return y


class Basis(Protocol):
    """What a KAN layer needs of its basis. ``F = num_features`` features per input; the layer's
    weight has ``F * in_features`` columns, feature-major (feature f of every input, then f + 1)."""

    num_features: int
    chunk_width: int  # values per input held while a chunk of tokens is processed (sets the chunk size)

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """The basis's own parameters at initialisation, by attribute name (none for most)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., F, in) in at least fp32, differentiable (the reference formula)."""

    def features_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The features of ``x`` written into ``out`` (..., F, in), without autograd (fast path)."""

    def features_and_grads(self, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor):
        """Features into ``out`` and, from d(loss)/d(features) ``grad_out`` (..., F, in), the gradients
        of the input and of the basis's parameters: ``(out, grad_x, (grad_param, ...))``."""


class SplineBasis(nn.Module):
    """Base class of the spline-like bases: features ``[silu(x), B_0(x), ..., B_{K-1}(x)]``.

    Two evaluation paths compute the same values: :meth:`functions`, a plain differentiable
    formula (pointwise, so that ``torch.compile`` fuses it and can recompute it in backward), and
    :meth:`_write`, the eager fast path of the layer's custom autograd function, which fills a
    reusable buffer and returns a hand-written vector-Jacobian product. The basis holds no
    parameters: the coefficients live in the layer's weight.
    """

    def __init__(self, num_functions: int, grid_range: tuple[float, float]):
        super().__init__()
        self.num_functions = num_functions
        self.grid_range = (float(grid_range[0]), float(grid_range[1]))

    @property
    def num_features(self) -> int:
        return 1 + self.num_functions

    @property
    def chunk_width(self) -> int:
        """Values per input held while a chunk is processed (sets the chunk size)."""
        return self.num_features

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """The basis's own parameters at initialisation: none (the coefficients are the layer's)."""
        return {}

    def each_function(self, x: torch.Tensor):
        """The K basis functions of ``x``, one tensor of ``x``'s shape after the other (differentiable,
        pointwise: ``torch.compile`` fuses a weighted sum of them into one kernel)."""
        raise NotImplementedError

    def _functions(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., K, in), differentiable; ``x`` is already fp32 or fp64."""
        return torch.stack(list(self.each_function(x)), dim=-2)

    def _vjp(self, x: torch.Tensor, values: torch.Tensor):
        """A function mapping d(loss)/d(values) (..., K, in) to d(loss)/dx (..., in)."""
        raise NotImplementedError

    def _write(self, x: torch.Tensor, out: torch.Tensor, vjp: bool):
        """Write the K basis values of ``x`` into ``out`` (..., K, in); return :meth:`_vjp` if asked."""
        out.copy_(self._functions(x))
        return self._vjp(x, out) if vjp else None

    @_fp32_features
    def functions(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., K, in) basis values, in fp32 (or fp64)."""
        return self._functions(x)

    @_fp32_features
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., 1 + K, in) features in fp32 (or fp64), differentiable."""
        return torch.cat([F.silu(x).unsqueeze(-2), self._functions(x)], dim=-2)

    @_fp32_features
    def features_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The features of ``x`` written into ``out`` (..., 1 + K, in) by the fast path."""
        out[..., 0, :] = F.silu(x)
        self._write(x, out[..., 1:, :], vjp=False)
        return out

    @_fp32_features
    def features_and_vjp(self, x: torch.Tensor, out: torch.Tensor):
        """:meth:`features_into`, plus a function mapping d(loss)/d(features) to (d(loss)/dx, ())."""
        out[..., 0, :] = F.silu(x)
        spline_vjp = self._write(x, out[..., 1:, :], vjp=True)

        def vjp(grad_feats):  # (..., 1 + K, in) -> (..., in)
            silu_grad = torch.ops.aten.silu_backward(grad_feats[..., 0, :], x)
            return silu_grad + spline_vjp(grad_feats[..., 1:, :]), ()

        return out, vjp

    def features_and_grads(self, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor):
        """Features into ``out`` and the input's gradient from d(loss)/d(features) ``grad_out``:
        ``(out, grad_x, ())`` (the basis has no parameters)."""
        out, vjp = self.features_and_vjp(x, out)
        return (out, *vjp(grad_out))


class BSplineBasis(SplineBasis):
    """B-splines of order (degree) ``k`` on a uniform grid, in closed form.

    The range ``[a, b]`` is cut into ``G = grid_size`` intervals of width ``h``; the knot vector is
    extended by ``k`` knots on each side, ``t_j = a + (j - k) h``, which gives ``K = G + k`` basis
    functions, each a shifted cardinal B-spline ``B_j(x) = N_k((x - t_j) / h)`` with the
    truncated-power formula ``N_k(u) = 1/k! sum_r (-1)^r C(k+1, r) (u - r)_+^k``. No Cox-de Boor
    recursion runs. Parameters per edge: K coefficients + 1 SiLU weight.

    - Eager fast path: with ``z = (x - a) / h + k``, ``c = floor(z)``, ``t = z - c``, exactly the
      k + 1 functions ``B_{c-m}`` (m = 0..k) are non-zero, and ``B_{c-m}(x) = P_m(t)``, the m-th
      polynomial piece of ``N_k`` (coefficients precomputed). k + 1 polynomials in ``t in [0, 1)``
      and one scatter per input; backward gathers the k + 1 matching gradients.
    - Pointwise formula (compile, plotting): ``N_k`` folded at its centre, ``v = min(u, k + 1 - u)``,
      ``N_k = 1/k! sum_{m < (k+1)/2} (-1)^m C(k+1, m) max(v - m, 0)^k`` for every j: no
      scatter, every term bounded by ``((k+1)/2)^k``.

    Inputs outside the grid: the B-splines near the ends fade to zero across the ``k`` extra knots
    ``[a - k h, a)`` and ``(b, b + k h]``, and are exactly zero beyond; there only the SiLU term of
    each edge acts (as in the KAN paper). Inside ``[a, b]`` the K functions sum to one. At a knot,
    values are those of the half-open convention ``[t_j, t_{j+1})`` (it matters only for k = 0).
    """

    def __init__(self, grid_size: int, spline_order: int, grid_range: tuple[float, float]):
        super().__init__(grid_size + spline_order, grid_range)
        self.grid_size = grid_size
        self.spline_order = spline_order
        self.step = (self.grid_range[1] - self.grid_range[0]) / grid_size
        self._pieces = _cardinal_bspline_pieces(spline_order)  # kan_grouped's piece table reads them too
        self._cache = {}
        k = spline_order
        self._folded = [(-1) ** m * math.comb(k + 1, m) / math.factorial(k) for m in range((k + 2) // 2)]

    def each_function(self, x):
        k = self.spline_order
        z = x * (1 / self.step) + (k - self.grid_range[0] / self.step)  # (x - a) / h + k, no division
        for j in range(self.num_functions):
            u = z - j  # (x - t_j) / h
            if k == 0:  # indicator of [t_j, t_{j+1})
                yield ((u >= 0) & (u < 1)).to(x.dtype)
                continue
            v = (k + 1) / 2 - (u - (k + 1) / 2).abs()  # min(u, k + 1 - u), with a cheaper gradient
            yield sum(coef * (v - m).clamp(min=0).pow(k) for m, coef in enumerate(self._folded))

    def _constants(self, x):
        """Small per-(device, dtype) tensors of the fast path, built once: the shifts m = 0..k,
        the coefficients of every piece by power, ``pieces[p][m]``, and those of ``P_m' / h``, each
        with a trailing unit dimension (against (..., k + 1, in))."""
        key = (x.device, x.dtype)
        if key not in self._cache:
            k = self.spline_order
            pieces = torch.tensor(self._pieces, device=x.device, dtype=x.dtype).t()  # (power, m)
            slopes = pieces[1:] * torch.arange(1, k + 1, device=x.device, dtype=x.dtype).unsqueeze(-1)
            shifts = torch.arange(k + 1, device=x.device, dtype=x.dtype)
            self._cache[key] = tuple(
                c.unsqueeze(-1).contiguous() for c in (shifts, pieces, slopes / self.step)
            )
        return self._cache[key]

    def _write(self, x, out, vjp):
        k, n_fun = self.spline_order, self.num_functions
        shifts, pieces, slopes = self._constants(x)
        z = (x * (1 / self.step)).add_(k - self.grid_range[0] / self.step)  # (..., in): (x - a) / h + k
        c = z.clamp_(-1.0, n_fun + k).floor()  # beyond these bounds every function is zero anyway
        t = z.sub_(c)  # (..., in) in [0, 1)
        rows = c.unsqueeze(-2) - shifts  # (..., k + 1, in): row of B_{c-m}
        clamped = rows.clamp(0, n_fun - 1)
        invalid = clamped != rows
        index = clamped.to(torch.int64)
        t = t.unsqueeze(-2)  # against (power, k + 1, 1) coefficients: the k + 1 pieces at once
        values = _horner(t, pieces.unbind(0), inplace=True).masked_fill_(invalid, 0.0)  # B_{c-m}(x)
        out.zero_().scatter_add_(-2, index, values)  # invalid entries add 0 to a clamped row
        if not vjp:
            return None
        dvalues = _horner(t, slopes.unbind(0), inplace=True).masked_fill_(invalid, 0.0)

        def spline_vjp(grad_values):  # (..., K, in) -> (..., in)
            return (grad_values.gather(-2, index) * dvalues).sum(-2)

        return spline_vjp


def _cardinal_bspline_pieces(k: int) -> list[list[float]]:
    """Coefficients ``C[m][p]`` with ``N_k(t + m) = sum_p C[m][p] t^p`` for t in [0, 1), m = 0..k."""
    pieces = []
    for m in range(k + 1):
        coefs = [0.0] * (k + 1)
        for r in range(m + 1):  # terms (t + m - r)^k of the truncated-power formula that are active
            w = (-1) ** r * math.comb(k + 1, r) / math.factorial(k)
            for p in range(k + 1):
                coefs[p] += w * math.comb(k, p) * (m - r) ** (k - p)
        pieces.append(coefs)
    return pieces


class RBFBasis(SplineBasis):
    """Gaussian radial basis functions (FastKAN): ``B_k(x) = exp(-((x - c_k) / h)^2)``.

    The K centres ``c_k`` are spread evenly over ``grid_range`` (ends included) and ``h`` is their
    spacing. Parameters per edge: K coefficients + 1 SiLU weight. Far outside the range every
    Gaussian underflows to zero and only the SiLU term acts.
    """

    def __init__(self, num_functions: int, grid_range: tuple[float, float]):
        super().__init__(num_functions, grid_range)
        a, b = self.grid_range
        self.step = (b - a) / max(num_functions - 1, 1)

    def _distances(self, x):
        centres = torch.linspace(*self.grid_range, self.num_functions, device=x.device, dtype=x.dtype)
        return (x.unsqueeze(-2) - centres.unsqueeze(-1)) * (1 / self.step)  # (..., K, in)

    def each_function(self, x):
        for centre in torch.linspace(*self.grid_range, self.num_functions, dtype=torch.float64).tolist():
            d = (x - centre) * (1 / self.step)
            yield torch.exp(-d * d)

    def _vjp(self, x, values):
        def spline_vjp(grad_values):  # d/dx exp(-d^2) = -2 d exp(-d^2) / h
            return (grad_values * values * self._distances(x)).sum(-2) * (-2.0 / self.step)

        return spline_vjp


class ChebyshevBasis(SplineBasis):
    """Chebyshev polynomials of a squashed input: ``B_k(x) = T_k(tanh(x))``, ``k = 0..K-1``.

    ``T_k`` comes from the recurrence ``T_{k+1}(s) = 2 s T_k(s) - T_{k-1}(s)`` (no ``acos``, so no
    infinite slope at ``s = +-1`` and nothing unsafe in bf16); ``tanh`` keeps ``s`` in [-1, 1] for
    any input, so large inputs saturate instead of blowing up. Derivatives use
    ``T_k' = k U_{k-1}`` with the Chebyshev polynomials of the second kind ``U``. Parameters per
    edge: K coefficients (degree K - 1) + 1 SiLU weight.
    """

    def each_function(self, x):
        s = torch.tanh(x)
        previous, current = torch.ones_like(s), s
        yield previous
        for _ in range(1, self.num_functions):
            yield current
            previous, current = current, 2 * s * current - previous

    def _vjp(self, x, values):
        s = values[..., 1, :] if self.num_functions > 1 else torch.tanh(x)

        def spline_vjp(grad_values):  # sum_k g_k T_k'(s) ds/dx
            grad_s = torch.zeros_like(s)
            u_prev, u = torch.zeros_like(s), torch.ones_like(s)  # U_{-1}, U_0
            for k in range(1, self.num_functions):
                grad_s += grad_values[..., k, :] * (k * u)
                u_prev, u = u, 2 * s * u - u_prev
            return grad_s * (1 - s * s)

        return spline_vjp


@functools.cache
def _rational_silu_coefficients(
    num_order: int, den_order: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients of P/(1 + |Q|) approximating SiLU on [-4, 4] (linearised least squares, fp64)."""
    x = torch.linspace(-4, 4, 801, dtype=torch.float64, device="cpu")
    y = F.silu(x)
    # P(x) - y Q(x) = y with Q assumed positive on the fit range.
    design = torch.cat(
        [
            torch.stack([x**p for p in range(num_order + 1)], -1),
            torch.stack([-y * x**q for q in range(1, den_order + 1)], -1),
        ],
        dim=-1,
    )
    sol = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
    return tuple(sol[: num_order + 1].tolist()), tuple(sol[num_order + 1 :].tolist())


class RationalBasis(nn.Module):
    """Group-rational activation (GR-KAN, from the Kolmogorov-Arnold Transformer).

    Inputs are split into ``groups`` contiguous groups; every input of group g goes through

        R_g(x) = (a_g0 + a_g1 x + ... + a_gm x^m) / (1 + |b_g1 x + ... + b_gn x^n|),

    whose denominator is at least 1, so it never vanishes. The layer then applies its linear map:
    ``phi_ij(x) = w_ij R_g(i)(x)``. Parameters: one weight per edge, plus ``groups * (m + 1 + n)``
    rational coefficients per layer. ``(m, n) = rational_order``, (5, 4) by default. The
    coefficients start as a fit of SiLU.
    """

    num_features = 1

    # Sets the chunk size (the backward holds several (tokens, in) temporaries): smaller values
    # give longer chunks, faster but with a higher peak (tuned with eval/bench_kan.py).
    chunk_width = 4

    def __init__(self, in_features: int, groups: int, order: tuple[int, int], device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.order = (int(order[0]), int(order[1]))
        self.numerator = nn.Parameter(torch.empty(groups, self.order[0] + 1, device=device, dtype=dtype))
        self.denominator = nn.Parameter(torch.empty(groups, self.order[1], device=device, dtype=dtype))
        self.group_size = in_features // groups

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """Every group starts as the same rational fit of SiLU."""
        num, den = _rational_silu_coefficients(*self.order)
        factory = {"device": self.numerator.device, "dtype": self.numerator.dtype}
        return {
            "numerator": torch.tensor(num, **factory).expand_as(self.numerator),
            "denominator": torch.tensor(den, **factory).expand_as(self.denominator),
        }

    def _coefficients(self, x):
        """Per-power coefficients of P, Q, P' and Q' in ``x``'s dtype, each (G, 1) (against (..., G, S))."""
        a, b = self.numerator.to(x.dtype), self.denominator.to(x.dtype)  # (G, m + 1), (G, n)
        m, n = self.order
        da = a[:, 1:] * torch.arange(1, m + 1, device=x.device, dtype=x.dtype)  # P' (G, m)
        db = b * torch.arange(1, n + 1, device=x.device, dtype=x.dtype)  # Q' (G, n)
        return [c.unsqueeze(-1).unbind(1) for c in (a, b, da, db)]

    def _groups(self, x):
        return x.unflatten(-1, (self.groups, self.group_size))  # (..., in) -> (..., G, S)

    @staticmethod
    def _rational(xg, a, b):
        """Q(x), 1 + |Q(x)| and R(x) = P(x) / (1 + |Q(x)|), each (..., G, S)."""
        q = xg * _horner(xg, b)  # Q(x) = b_1 x + ... + b_n x^n
        den = 1 + q.abs()
        return q, den, _horner(xg, a) / den

    @_fp32_features
    def features(self, x):
        """(..., in) -> (..., 1, in): R_g(x) of every input, differentiable."""
        xg = self._groups(x)
        a, b, _, _ = self._coefficients(x)
        return self._rational(xg, a, b)[2].flatten(-2).unsqueeze(-2)

    def features_into(self, x, out):
        """The features of ``x`` written into ``out`` (..., 1, in)."""
        return out.copy_(self.features(x))

    @_fp32_features
    def features_and_vjp(self, x, out):
        """:meth:`features_into`, plus a function mapping d(loss)/d(features) to (d/dx, (d/da, d/db))."""
        xg = self._groups(x)  # (..., G, S)
        a, b, da, db = self._coefficients(x)
        q, den, r = self._rational(xg, a, b)
        out.copy_(r.flatten(-2).unsqueeze(-2))
        sums = [d for d in range(xg.dim()) if d != xg.dim() - 2]  # every dimension but the group's

        def power_sums(g, first, last):  # (G, last - first + 1): sum of g x^i for i = first..last
            t = g * xg if first else g
            cols = [t.sum(sums)]
            for _ in range(first, last):
                t = t * xg
                cols.append(t.sum(sums))
            return torch.stack(cols, -1)

        def vjp(grad_feats):  # (..., 1, in) -> (..., in), ((G, m + 1), (G, n))
            g = self._groups(grad_feats.squeeze(-2))
            g_num = g / den  # dL/dP
            g_q = -g_num * r * torch.sign(q)  # dL/dQ
            grad_x = g_num * _horner(xg, da) + g_q * _horner(xg, db)
            m, n = self.order
            return grad_x.flatten(-2), (power_sums(g_num, 0, m), power_sums(g_q, 1, n))

        return out, vjp

    def features_and_grads(self, x, out, grad_out):
        """Features into ``out`` and, from d(loss)/d(features) ``grad_out``, the gradients of the input
        and of the coefficients: ``(out, grad_x, (grad_numerator, grad_denominator))``."""
        out, vjp = self.features_and_vjp(x, out)
        return (out, *vjp(grad_out))


class FeaturesByAutograd:
    """``features_into`` and ``features_and_grads`` of a grouped basis from its differentiable
    ``features``, by autograd: for functions with no hand-derived derivative. ``function_parameter``
    names the basis's one parameter."""

    function_parameter: str

    def features_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The features of ``x`` written into ``out`` (..., 1, in)."""
        with torch.no_grad():
            return out.copy_(self.features(x))

    @_fp32_features
    def features_and_grads(self, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor):
        """Features into ``out`` and, from d(loss)/d(features) ``grad_out`` (..., 1, in), the gradients
        of the input and of the function parameter: ``(out, grad_x, (grad_parameter,))``."""
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            feats = self.features(x)
            parameter = getattr(self, self.function_parameter)
            grad_x, grad_parameter = torch.autograd.grad(feats, (x, parameter), grad_out)
        out.copy_(feats.detach())
        return out, grad_x, (grad_parameter,)


class GroupedBasis(FeaturesByAutograd, nn.Module):
    """One learnable function per group of inputs over a spline-like basis (GR-KAN's sharing).

    Inputs are split into ``groups`` contiguous groups; every input ``i`` of group ``g`` goes through

        phi_g(x) = a_g0 x + a_g1 silu(x) + sum_k a_g,k+2 B_k(x),

    a linear term, the KAN residual SiLU and the spline-like basis, weighted by the group's
    coefficients ``a_g`` (the ``coefficients`` parameter, (groups, 2 + K)); the layer's weight
    scales it per edge: ``phi_ij(x) = w_ij phi_g(i)(x)``. The layer is then as wide as an MLP for the
    parameters of one: one weight per edge plus ``groups * (2 + K)`` function coefficients per layer.
    The linear term makes the identity exact everywhere, and with the SiLU term the tails of the
    usual activations (GELU - SiLU vanishes on both sides), which converting an MLP needs. Every
    group starts as SiLU (``a_g = [0, 1, 0, ..., 0]``).

    This class evaluates the K basis functions of every input densely; :class:`GroupedBSplineBasis`
    uses the B-splines' local support instead.
    """

    num_features = 1
    chunk_width = 1  # the features are as large as the input: chunks only bound the matmuls
    function_parameter = "coefficients"  # (GroupedBSplineBasis derives its gradients, faster)

    def __init__(self, basis: SplineBasis, in_features: int, groups: int, device=None, dtype=None):
        super().__init__()
        self.spline = basis
        self.groups = groups
        self.group_size = in_features // groups
        self.coefficients = nn.Parameter(
            torch.empty(groups, 1 + basis.num_features, device=device, dtype=dtype)
        )

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """Every group starts as SiLU."""
        a = torch.zeros_like(self.coefficients)
        a[:, 1] = 1.0
        return {"coefficients": a}

    @_fp32_features
    def terms(self, x: torch.Tensor) -> torch.Tensor:
        """(P,) -> (P, 2 + K): the terms ``[x, silu(x), B_0(x), ...]`` every group function combines."""
        return torch.cat([x.unsqueeze(-1), self.spline.features(x.unsqueeze(-1)).squeeze(-1)], -1)

    @_fp32_features
    def group_functions(self, x: torch.Tensor) -> torch.Tensor:
        """(P,) -> (P, groups): every group function at points ``x``."""
        return self.terms(x) @ self.coefficients.to(x.dtype).t()

    @_fp32_features
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., 1, in): phi_g(x) of every input, differentiable (the reference formula,
        pointwise: one term per basis function, each group's coefficient broadcast over its inputs)."""
        xg = x.unflatten(-1, (self.groups, self.group_size))  # (..., G, S)
        a = self.coefficients.to(x.dtype).unsqueeze(-1)  # (G, 2 + K, 1)
        phi = a[:, 0] * xg + a[:, 1] * F.silu(xg)
        for k, values in enumerate(self.spline.each_function(xg), start=2):
            phi = phi + a[:, k] * values
        return phi.flatten(-2).unsqueeze(-2)


class GroupedBSplineBasis(PieceTableEvaluation, GroupedBasis):
    """:class:`GroupedBasis` over B-splines, evaluated by their local support (cost independent of K).

    The same functions, with the same reference formula (``features``, what ``torch.compile`` fuses
    through ``compiled_features``), but the eager path never writes the K B-splines: ``phi_g`` is one
    polynomial of degree k per grid interval, so every input needs one row of a table of polynomial
    pieces and a Horner step. The table, its blocks of rows and its autograd function are
    ``kangpt.kan_grouped.PieceTableEvaluation``'s.
    """

    def __init__(self, basis: BSplineBasis, in_features: int, groups: int, device=None, dtype=None):
        super().__init__(basis, in_features, groups, device=device, dtype=dtype)
        self._init_piece_tables()

    @_fp32_features
    def features_into(self, x, out):
        """phi_g(x) of every input written into ``out`` (..., 1, in), from the piece table."""
        return self._blocked_features_into(x, out)

    @_fp32_features
    def inference_values(self, x):
        """(tokens, in) -> (tokens, in): phi_g(x) of every input, from the piece table, without autograd
        or buffers: a decoding step's few tokens in the fewest ops."""
        return self._inference_values(x)

    @_fp32_features
    def features_and_grads(self, x, out, grad_out):
        """Features into ``out`` and, from d(loss)/d(features) ``grad_out`` (..., 1, in), the gradients
        of the input and of ``coefficients``: ``(out, grad_x, (grad_coefficients,))``, from the piece
        table (the coefficients' gradient as per-interval sums)."""
        return self._blocked_features_and_grads(x, out, grad_out)
