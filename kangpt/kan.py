"""Kolmogorov-Arnold Network (KAN) layers in plain PyTorch.

A KAN layer maps ``in_features`` to ``out_features`` through one learnable 1-D function per edge,

    y_j = sum_i phi_ij(x_i) + bias_j,

where each edge function is a linear combination of a small set of fixed per-input features.
For the spline-like bases (``bspline``, ``rbf``, ``chebyshev``) the features of input ``x_i`` are
``[silu(x_i), B_0(x_i), ..., B_{K-1}(x_i)]`` (the KAN paper's residual SiLU plus K basis functions),
so ``phi_ij(x) = w_ij * silu(x) + sum_k c_ijk * B_k(x)``. For ``rational`` (GR-KAN) the single
feature is a learnable rational function shared by a group of inputs.

Because the features of every input are concatenated, the whole layer is ONE matmul against a
2-D weight of shape ``(out_features, n_features * in_features)``: FSDP, weight-decay grouping and
Hugging Face loading see an ordinary matrix. Features are laid out feature-major, ``(..., F, in)``
(feature f of every input, then feature f + 1), so that the feature kernels run over contiguous
inputs (twice as fast as ``(..., in, F)`` on CPU); :meth:`KANLinear.coefficients` views the weight
as ``(out, in, F)``: ``[j, i]`` holds the coefficients of edge i -> j (index 0 is the SiLU weight
for the spline-like bases).

Memory: the (tokens x n_features x in) feature tensor is never kept for backward. In eager mode
the layer runs a custom autograd function that saves only its input and recomputes the features,
chunk by chunk over tokens, in backward (without grad, the same chunks run with no autograd).
Under ``torch.compile`` the plain formula runs inside a selective activation checkpoint that keeps
the matmul outputs and recomputes the features: Inductor fuses the feature computation into one
kernel each way, and again only the input is kept for backward. Inductor schedules the chunks'
buffers together, so the peak is higher than in eager mode; the chunks there keep every single
feature buffer small enough for the CPU allocator to reuse (see ``_COMPILE_CHUNK_ELEMENTS``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

BASES = ("bspline", "rbf", "chebyshev", "rational")
SHARINGS = ("edge", "group")
KERNELS = ("auto", "triton", "torch")

# Transient feature buffers are kept near this many elements per chunk of tokens.
_CHUNK_ELEMENTS = 2 << 20  # 8 MB of fp32: on CPU, faster than 1M, with a lower peak than 4M

# Under torch.compile, feature buffers are kept under this many elements (24 MiB of fp32). glibc's
# malloc hands out blocks above its mmap threshold (at most 32 MiB) as fresh pages that fault in on
# every step (measured at d=768, 2048 tokens: ~50k minor page faults per step unchunked, ~12k
# chunked, ~3k for GPT-2's MLP); below it, freed blocks are reused. Smaller chunks cost more in
# per-matmul overhead.
_COMPILE_CHUNK_ELEMENTS = 6 << 20


# E[silu(z)^2] for z ~ N(0, 1), by quadrature; used for variance-preserving initialisation.
_z = torch.linspace(-12, 12, 48001, dtype=torch.float64, device="cpu")
_SILU_SECOND_MOMENT = float(
    torch.trapezoid(F.silu(_z) ** 2 * torch.exp(-_z * _z / 2) / math.sqrt(2 * math.pi), _z)
)
del _z


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Features are evaluated in at least fp32 (bf16/fp16 inputs are upcast, fp64 is kept)."""
    return torch.promote_types(x.dtype, torch.float32)


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
        self._pieces = _cardinal_bspline_pieces(spline_order)
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

    # Sets the chunk size (the backward holds several (tokens, in) temporaries). Measured on CPU at
    # d=768: 4 runs within 5% of 2's time with a peak below the MLP's (2: above); 12 is 25% slower.
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


class GroupedBasis(nn.Module):
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

    def features_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The features of ``x`` written into ``out`` (..., 1, in)."""
        with torch.no_grad():
            return out.copy_(self.features(x))

    @_fp32_features
    def features_and_grads(self, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor):
        """Features into ``out`` and, from d(loss)/d(features) ``grad_out`` (..., 1, in), the gradients
        of the input and of ``coefficients``: ``(out, grad_x, (grad_coefficients,))``, by autograd
        through :meth:`features` (:class:`GroupedBSplineBasis` has a faster path)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            feats = self.features(x)
            grad_x, grad_coefficients = torch.autograd.grad(feats, (x, self.coefficients), grad_out)
        out.copy_(feats.detach())
        return out, grad_x, (grad_coefficients,)


class GroupedBSplineBasis(GroupedBasis):
    """:class:`GroupedBasis` over B-splines, evaluated by their local support (cost independent of K).

    On the uniform grid, ``phi_g`` is one polynomial of degree k per grid interval: with
    ``z = (x - a) / h + k``, ``c = floor(z)`` and ``t = z - c``, the spline part is
    ``sum_p E[g, c, p] t^p``, where the piece table ``E = a_g @ T`` follows from the coefficients by a
    fixed linear map ``T`` (the k + 1 B-spline pieces active on each interval). Evaluating it is one
    gather of a table row and a Horner step per input, whatever the number of B-splines; the
    gradient of the table is a histogram of ``grad * t^p`` over (group, interval), mapped back by
    ``T``. This is the eager path; ``features`` (the pointwise formula) is what ``torch.compile``
    fuses. Work is done in blocks of rows whose temporaries stay in the CPU's cache.
    """

    # Elements per block: larger blocks cost fewer op calls, smaller ones keep their temporaries in
    # the CPU's caches (tuned with eval/bench_kan.py).
    _BLOCK_ELEMENTS = 1 << 18

    def __init__(self, basis: BSplineBasis, in_features: int, groups: int, device=None, dtype=None):
        super().__init__(basis, in_features, groups, device=device, dtype=dtype)
        self._cache = {}
        self._inference, self._inference_key, self._inference_source = None, None, None

    @property
    def rows(self) -> int:
        """Table rows per group: the intervals c = -1 .. K + k (the first and last hold zeros)."""
        return self.spline.num_functions + self.spline.spline_order + 2

    def _constants(self, x):
        """``T`` (K, rows, k + 1) and every input's first table row (in,), per device and dtype (built
        once, not under ``torch.compile``: a tensor stored while tracing would escape the graph)."""
        key = (x.device, x.dtype)
        if key not in self._cache or torch.compiler.is_compiling():
            k, n_fun = self.spline.spline_order, self.spline.num_functions
            pieces = torch.tensor(_cardinal_bspline_pieces(k), dtype=torch.float64)  # (m, power)
            transform = torch.zeros(n_fun, self.rows, k + 1, dtype=torch.float64)
            for j in range(n_fun):  # B_j is piece m on interval c = j + m, which is table row c + 1
                transform[j, j + 1 : j + k + 2] = pieces
            first_row = torch.arange(self.groups).repeat_interleave(self.group_size) * self.rows
            constants = (transform.to(x.device, x.dtype), first_row.to(x.device))
            if torch.compiler.is_compiling():
                return constants
            self._cache[key] = constants
        return self._cache[key]

    def _tables(self, coefficients, x):
        """The piece table (groups * rows, k + 1): the polynomial of every interval of every group, by
        power; every input's linear and SiLU weights (in,) each; its group's first table row (in,)."""
        transform, first_row = self._constants(x)
        a = coefficients.to(x.dtype)  # (G, 2 + K)
        table = torch.einsum("gj,jrp->grp", a[:, 2:], transform).flatten(0, 1)  # (G * rows, k + 1)
        linear, silu = (a[:, i].repeat_interleave(self.group_size) for i in (0, 1))
        return table, linear, silu, first_row

    def _inference_tables(self, x):
        """:meth:`_tables` of the forward-only path, kept while the coefficients hold the same values
        (compared, not tracked: ``.data`` writes bump no version) and the input's device and dtype
        stay: generation calls the layer once per new token."""
        c = self.coefficients.detach()
        if isinstance(c, FakeTensor):  # shapes only (memory estimates): no values to compare
            return self._tables(c, x)
        key = (x.device, x.dtype)
        if self._inference_key != key or not torch.equal(c, self._inference_source):
            self._inference = self._tables(c, x)
            self._inference_key, self._inference_source = key, c.clone()
        return self._inference

    def _locate(self, x, first_row):
        """(..., in) -> the table row of every input (int64) and its position ``t`` in the interval.

        Row ``c + 1`` of its group holds interval ``c = floor(z)``; ``z + 1`` is clamped to
        ``[0, K + k + 1]`` (beyond: the zero rows), where the cast to an integer is the floor and the
        fractional part is ``t``."""
        spline = self.spline
        z = x.mul(1 / spline.step).add_(spline.spline_order + 1 - spline.grid_range[0] / spline.step)
        z.clamp_(0.0, float(spline.num_functions + spline.spline_order + 1))
        row = z.to(torch.int64)
        return row.add_(first_row), z.frac_()

    @staticmethod
    def _piece(t, e):
        """``sum_p e[p] t^p`` by Horner's rule: the spline part of phi_g, from the pieces ``e`` (k + 1
        tensors, the columns of the gathered table rows)."""
        value = e[-1]
        for c in e[-2::-1]:
            value = torch.addcmul(c, value, t)
        return value

    @staticmethod
    def _piece_slope(t, e):
        """``sum_p p e[p] t^(p-1)``, the derivative of :meth:`_piece` in ``t`` (divide by the grid step
        for the derivative in x), from the same pieces: ``e_1 + 2 t (e_2 + 3/2 t (e_3 + ...))``."""
        if len(e) < 2:
            return torch.zeros_like(t)
        slope = e[-1]
        for p in range(len(e) - 2, 0, -1):
            slope = torch.addcmul(e[p], slope, t, value=(p + 1) / p)
        return slope

    def _blocks(self, x):
        rows = max(1, self._BLOCK_ELEMENTS // x.shape[-1])
        return [slice(s, s + rows) for s in range(0, x.shape[0], rows)]

    def compiled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., 1, in): the features as ``torch.compile`` computes them (see
        :class:`_GroupedSplineFunction`); the same values as :meth:`features`."""
        return _GroupedSplineFunction.apply(x, self.coefficients, self).unsqueeze(-2)

    def _values(self, x: torch.Tensor, coefficients: torch.Tensor, slopes: bool):
        """phi_g(x) of every input of ``x`` (..., in) from the piece table, and its derivative if asked."""
        table, linear, silu_weight, first_row = self._tables(coefficients, x)
        index, t = self._locate(x, first_row)
        e = table[index].unbind(-1)  # k + 1 of (..., in): the pieces of every input's interval
        value = self._piece(t, e) + linear * x + silu_weight * F.silu(x)
        if not slopes:
            return value, None
        sigmoid = torch.sigmoid(x)
        silu_slope = sigmoid * (1 + x * (1 - sigmoid))
        return value, self._piece_slope(t, e) / self.spline.step + linear + silu_weight * silu_slope

    def _phi_into(self, x, tables, out):
        """phi_g(x) of a (rows, in) block ``x`` written into ``out``; returns the row index, ``t``, the
        gathered pieces and ``silu(x)`` for the backward."""
        table, linear, a_silu, first_row = tables
        index, t = self._locate(x, first_row)
        e = F.embedding(index, table).unbind(-1)  # k + 1 of (rows, in): a row gather, fastest on CPU
        silu = F.silu(x)
        torch.addcmul(self._piece(t, e).addcmul_(x, linear), silu, a_silu, out=out)
        return index, t, e, silu

    @_fp32_features
    def features_into(self, x, out):
        with torch.no_grad():
            tables = self._inference_tables(x)
            x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
            if x2.numel() <= self._BLOCK_ELEMENTS:  # a decoding step: one block
                self._phi_into(x2, tables, out2)
                return out
            for rows in self._blocks(x2):
                self._phi_into(x2[rows], tables, out2[rows])
        return out

    @_fp32_features
    def features_and_grads(self, x, out, grad_out):
        with torch.no_grad():
            tables = self._tables(self.coefficients, x)
            _, linear, a_silu, _ = tables
            k, bins = self.spline.spline_order, self.groups * self.rows
            x2, out2, g2 = (
                x.reshape(-1, x.shape[-1]),
                out.view(-1, x.shape[-1]),
                grad_out.reshape(-1, x.shape[-1]),
            )
            blocks = self._blocks(x2)
            grad_x = torch.empty_like(x2)
            # sum of grad * t^p per table row, one histogram per row of the block (a scatter along the
            # last dimension runs its rows in parallel; one shared histogram would run on one thread)
            histograms = x2.new_empty(len(x2[blocks[0]]), k + 1, bins)
            histogram = x2.new_zeros(k + 1, bins)
            term_sums = x2.new_zeros(2, x.shape[-1])  # sums of grad * x and grad * silu(x) per input
            for rows in blocks:
                xb, gb = x2[rows], g2[rows]
                index, t, e, silu = self._phi_into(xb, tables, out2[rows])
                grad = torch.ops.aten.silu_backward(gb * a_silu, xb).addcmul_(gb, linear)
                torch.addcmul(grad, gb, self._piece_slope(t, e), value=1 / self.spline.step, out=grad_x[rows])
                term_sums[0] += (gb * xb).sum(0)
                term_sums[1] += (gb * silu).sum(0)
                block = histograms[: len(xb)].zero_()
                weight = gb
                for p in range(k + 1):
                    block[:, p].scatter_add_(1, index, weight)
                    if p < k:
                        weight = weight * t
                histogram += block.sum(0)
            transform, _ = self._constants(x)
            grad_spline = torch.einsum(
                "pgr,jrp->gj", histogram.view(k + 1, self.groups, self.rows), transform
            )
            grad_a = torch.cat([term_sums.view(2, self.groups, -1).sum(-1).t(), grad_spline], 1)
        return out, grad_x.view(x.shape), (grad_a,)


class _GroupedSplineFunction(torch.autograd.Function):
    """Grouped B-spline values for ``torch.compile``: the value and its slope come from the piece
    table (a gather, which Inductor fuses as an indirect load); the gradient of the coefficients is a
    reduction of ``grad * term`` over the inputs of each group, with every B-spline written densely
    (the histogram of the eager path would become atomic adds). Saves ``x`` and the coefficients."""

    @staticmethod
    def forward(ctx, x, coefficients, basis):
        ctx.save_for_backward(x, coefficients)
        ctx.basis = basis
        return basis._values(x, coefficients, slopes=False)[0]

    @staticmethod
    def backward(ctx, grad):
        x, coefficients = ctx.saved_tensors
        basis = ctx.basis
        _, slope = basis._values(x, coefficients, slopes=True)
        shape = (*x.shape[:-1], basis.groups, basis.group_size)
        xg, gg = x.reshape(shape), grad.reshape(shape)
        dims = (*range(xg.dim() - 2), xg.dim() - 1)  # everything but the group
        terms = [xg, F.silu(xg), *basis.spline.each_function(xg)]
        grad_coefficients = torch.stack([(gg * term).sum(dims) for term in terms], 1)  # (G, 2 + K)
        return grad * slope, grad_coefficients.to(coefficients.dtype), None


def _feature_buffer(x: torch.Tensor, basis: nn.Module, chunk: int) -> torch.Tensor:
    """One (chunk, F, in) buffer reused by every chunk (no allocator churn)."""
    return torch.empty(
        min(chunk, x.shape[0]), basis.num_features, x.shape[1], device=x.device, dtype=_compute_dtype(x)
    )


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: matmul outputs are kept, every feature op is recomputed."""
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_features():
    return create_selective_checkpoint_contexts(_keep_matmuls)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_kernels_apply(basis: str, sharing: str) -> bool:
    """Whether the fused Triton kernels (``kangpt.kan_triton``) can run a layer of this design: grouped
    B-splines only, with ``triton`` installed."""
    return sharing == "group" and basis == "bspline" and _triton_available()


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on (as ``nn.Linear`` would use), else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _forward_chunks(x, weight, bias, basis, chunk, dtype) -> torch.Tensor:
    """(tokens, in) -> (tokens, out): features of ``chunk`` tokens at a time, one matmul each.

    The matmul is ``F.linear``: weight-only quantised weights (torchao's tensor subclasses)
    implement it, not ``matmul(out=...)`` or a transposed view.
    """
    w = weight if weight.dtype == dtype else weight.to(dtype)
    b = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    buf = _feature_buffer(x, basis, chunk)
    if x.shape[0] <= chunk:  # one chunk (e.g. a decoding step): no split, no cat
        feats = basis.features_into(x, buf).flatten(1)
        return F.linear(feats if feats.dtype == dtype else feats.to(dtype), w, b)
    outs = [
        F.linear(basis.features_into(xc, buf[: len(xc)]).flatten(1).to(dtype), w, b)  # (n, out)
        for xc in x.split(chunk)
    ]
    return torch.cat(outs)


class _KANLinearFunction(torch.autograd.Function):
    """``y = features(x) @ weight.T + bias``, saving only ``x``; features are recomputed in backward.

    Works on 2-D ``x`` (tokens, in) in chunks of ``chunk`` tokens, so the transient feature buffers
    are (chunk, n_features, in) whatever the number of tokens.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, basis, chunk, *basis_params):
        dtype = _matmul_dtype(x, weight)
        ctx.save_for_backward(x, weight, bias, *basis_params)
        ctx.basis, ctx.chunk, ctx.dtype = basis, chunk, dtype
        return _forward_chunks(x, weight, bias, basis, chunk, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, *basis_params = ctx.saved_tensors
        basis, chunk, dtype = ctx.basis, ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        grad_out = grad_out.to(dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        grad_params = [torch.zeros_like(p, dtype=grad_w.dtype) for p in basis_params]
        buf = _feature_buffer(x, basis, chunk)
        for s in range(0, x.shape[0], chunk):
            g = grad_out[s : s + chunk]  # (n, out)
            xc, fc = x[s : s + chunk], buf[: len(g)]
            if need_x or basis_params:
                grad_feats = (g @ w).view(fc.shape).to(fc.dtype)  # (n, F, in)
                feats, gx, gp = basis.features_and_grads(xc, fc, grad_feats)
                if need_x:
                    grad_x[s : s + chunk] = gx
                for acc, p in zip(grad_params, gp, strict=True):
                    acc += p
            else:
                feats = basis.features_into(xc, fc)  # (n, F, in)
            if need_w and grad_w.dtype == dtype:
                grad_w.addmm_(g.t(), feats.flatten(1))
            elif need_w:  # low-precision matmul, fp32 accumulation across chunks
                grad_w += (g.t() @ feats.flatten(1).to(dtype)).to(grad_w.dtype)
        grad_b = grad_out.sum(0).to(bias.dtype) if (bias is not None and need_b) else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_params = [gp.to(p.dtype) for gp, p in zip(grad_params, basis_params, strict=True)]
        return (grad_x, grad_w, grad_b, None, None, *grad_params)


def _check_kan_args(
    in_features, out_features, basis, grid_size, spline_order, grid_range, rational_order, sharing, groups
):
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be an integer >= 1, got {grid_size!r}")
    if not isinstance(spline_order, int) or spline_order < 0:
        raise ValueError(f"spline_order must be an integer >= 0, got {spline_order!r}")
    if len(grid_range) != 2 or not float(grid_range[0]) < float(grid_range[1]):
        raise ValueError(f"grid_range must be (low, high) with low < high, got {tuple(grid_range)!r}")
    if sharing not in SHARINGS:
        raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")
    if basis == "rational" and (len(rational_order) != 2 or rational_order[0] < 0 or rational_order[1] < 1):
        raise ValueError(f"rational_order must be (m >= 0, n >= 1), got {tuple(rational_order)!r}")
    if (basis == "rational" or sharing == "group") and (
        not isinstance(groups, int) or groups < 1 or in_features % groups
    ):
        raise ValueError(f"groups must divide in_features={in_features}, got {groups!r}")


def coefficient_view(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """A KAN layer's 2-D weight (out, n_features * in) viewed as (out, in, n_features): ``[j, i]``
    holds the coefficients of edge i -> j. A view: writes go to the weight."""
    return weight.view(weight.shape[0], -1, in_features).transpose(1, 2)


class KANLinear(nn.Module):
    """A KAN layer, shape-compatible with ``nn.Linear``: acts on the last dimension of any input.

    Args:
        in_features, out_features: widths, as for ``nn.Linear``.
        basis: ``"bspline"`` (default), ``"rbf"``, ``"chebyshev"`` or ``"rational"``; see the basis
            classes in this module for formulas and parameters per edge.
        grid_size, spline_order: the grid has ``grid_size`` intervals; every spline-like basis has
            ``K = grid_size + spline_order`` functions per edge (B-splines of order ``spline_order``,
            K Gaussians, or Chebyshev degree K - 1), so they cost the same.
        grid_range: the input interval the grid (or the RBF centres) covers.
        bias: add a learnable bias per output.
        sharing: ``"edge"`` (default): every edge has its own function, a combination of the basis's
            ``1 + K`` features (``1 + K`` coefficients per edge); ``"group"``: the inputs are cut into
            ``groups`` contiguous groups that share one learnable function, which the weight scales
            per edge (one coefficient per edge; see :class:`GroupedBasis`). ``rational`` is always
            grouped.
        groups: number of input groups of a grouped layer (it must divide ``in_features``).
        rational_order: numerator/denominator degrees of the ``rational`` basis.
        kernel: ``"auto"`` (default): the fused Triton kernels of ``kangpt.kan_triton`` for a grouped
            B-spline layer on CUDA when ``triton`` is installed, the PyTorch path otherwise;
            ``"triton"``: always the kernels (on CPU tensors only under ``TRITON_INTERPRET=1``);
            ``"torch"``: never.
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
        *,
        basis: str = "bspline",
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-2.0, 2.0),
        bias: bool = True,
        sharing: str = "edge",
        groups: int = 8,
        rational_order: tuple[int, int] = (5, 4),
        kernel: str = "auto",
        spline_scale: float = 0.1,
        init_gain: float = 1.0,
        chunk_size: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_kan_args(
            in_features,
            out_features,
            basis,
            grid_size,
            spline_order,
            grid_range,
            rational_order,
            sharing,
            groups,
        )
        self.in_features, self.out_features = in_features, out_features
        self.basis_name = basis
        self.grid_size, self.spline_order = grid_size, spline_order
        self.grid_range = (float(grid_range[0]), float(grid_range[1]))
        self.spline_scale = spline_scale
        self.init_gain = init_gain
        self.chunk_size = chunk_size
        self.sharing = "group" if basis == "rational" else sharing
        self.groups, self.rational_order = groups, tuple(rational_order)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "triton" and not triton_kernels_apply(basis, sharing):
            raise ValueError("kernel='triton' needs the triton package and a grouped B-spline layer "
                             f"(sharing='group', basis='bspline'), got sharing={sharing!r}, basis={basis!r}")
        self.kernel = kernel
        self.basis = self._make_basis(grid_size, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_features, self.basis.num_features * in_features, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def _make_basis(self, grid_size, device=None, dtype=None):
        k, rng, factory = self.spline_order, self.grid_range, {"device": device, "dtype": dtype}
        if self.basis_name == "rational":
            return RationalBasis(self.in_features, self.groups, self.rational_order, **factory)
        if self.basis_name == "bspline":
            basis = BSplineBasis(grid_size, k, rng)
        elif self.basis_name == "rbf":
            basis = RBFBasis(grid_size + k, rng)
        else:
            basis = ChebyshevBasis(grid_size + k, rng)
        if self.sharing == "edge":
            return basis
        grouped = GroupedBSplineBasis if self.basis_name == "bspline" else GroupedBasis
        return grouped(basis, self.in_features, self.groups, **factory)

    @property
    def num_features(self) -> int:
        """Features per input: 1 + K for the spline-like bases, 1 for ``rational``."""
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

    def _chunk(self, tokens: int) -> int:
        """Tokens per chunk: at most ``chunk_size`` (or about ``_CHUNK_ELEMENTS`` transient feature
        elements), the chunks of ``tokens`` as equal as possible (no small last chunk to matmul)."""
        chunk = self.chunk_size or max(16, _CHUNK_ELEMENTS // (self.in_features * self.basis.chunk_width))
        if tokens <= chunk:
            return chunk
        chunks = math.ceil(tokens / chunk)
        return math.ceil(tokens / chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected last dimension {self.in_features}, got input of shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        # Read the weight once, and decide on the tensors used, not on the module's parameters: under
        # a parametrization (PEFT's LoRA on the weight: W + BA) ``self.weight`` is computed, and its
        # gradient flows to parameters that live elsewhere.
        weight, bias = self.weight, self.bias
        basis_params = tuple(self.basis.parameters()) if torch.is_grad_enabled() else ()
        dtype = _matmul_dtype(x, weight)
        if self._fused_kernel(x):  # Triton: phi(x) evaluated inside the matmuls, never written
            from .kan_triton import grouped_linear

            b = None if bias is None else bias.to(dtype)
            out = grouped_linear(x2d, weight.to(dtype), b, self.basis)
        elif torch.compiler.is_compiling():  # plain ops that Inductor fuses, recomputed in backward
            out = checkpoint(
                self._formula, x2d, weight, bias, dtype, use_reentrant=False, context_fn=_recompute_features
            )
        elif torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, *basis_params)
        ):
            chunk = self._chunk(len(x2d))
            out = _KANLinearFunction.apply(x2d, weight, bias, self.basis, chunk, *basis_params)
        else:  # inference: the same computation without autograd bookkeeping
            out = _forward_chunks(x2d, weight, bias, self.basis, self._chunk(len(x2d)), dtype)
        return out.view(*lead, self.out_features)

    def _fused_kernel(self, x: torch.Tensor) -> bool:
        """Whether this call runs the Triton kernels (``kernel``: "triton" always, "auto" on CUDA when
        Triton is installed, "torch" never); only grouped B-spline layers have them."""
        if self.kernel == "torch" or not isinstance(self.basis, GroupedBSplineBasis):
            return False
        return self.kernel == "triton" or (x.is_cuda and _triton_available())

    def _formula(self, x: torch.Tensor, weight, bias, dtype: torch.dtype) -> torch.Tensor:
        """(tokens, in) -> (tokens, out) as plain differentiable ops (compile path), in equal
        chunks of tokens whose feature buffers stay under ``_COMPILE_CHUNK_ELEMENTS``. A symbolic
        token count (dynamic shapes) is not chunked: the chunk count would specialise it."""
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        n = x.shape[0]
        chunks = 1
        if isinstance(n, int):
            width = self.in_features * self.num_features
            chunks = max(1, min(n, math.ceil(n * width / _COMPILE_CHUNK_ELEMENTS)))
        features = getattr(self.basis, "compiled_features", self.basis.features)
        outs = [F.linear(features(xc).flatten(1).to(dtype), w, b) for xc in x.tensor_split(chunks)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]  # (tokens, out)

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
        if self.basis_name == "rational":
            raise ValueError("extend_grid does not apply to basis='rational' (it has no grid)")
        if not isinstance(new_grid_size, int) or new_grid_size <= self.grid_size:
            raise ValueError(
                f"new_grid_size must be an integer > grid_size={self.grid_size}, got {new_grid_size!r}"
            )
        self._refit(new_grid_size, self.grid_range)

    def set_grid_range(self, low: float, high: float) -> None:
        """Move the grid to ``[low, high]`` (same number of intervals), e.g. to the range the inputs
        take; every function is refitted by least squares on dense points of the new range. As with
        :meth:`extend_grid`, the refitted parameter is a new one. Not for ``chebyshev`` (its basis
        squashes every input by tanh) nor ``rational`` (no grid)."""
        if self.basis_name in ("chebyshev", "rational"):
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
        self.grid_range = grid_range
        new_basis = self._make_basis(grid_size, param.device, param.dtype)
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
        self.basis, self.grid_size = new_basis, grid_size

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, basis={self.basis_name!r}"
        if self.basis_name != "rational":
            s += f", grid_size={self.grid_size}, spline_order={self.spline_order}"
            s += f", grid_range={self.grid_range}"
        return s + f", bias={self.bias is not None}"


class KANFeedForward(nn.Module):
    """A KAN feed-forward block: ``d_in -> hidden_size -> d_out`` with two KAN layers, or a single
    ``d_in -> d_out`` KAN layer when ``hidden_size`` is 0 or None. ``output_gain`` is the last
    layer's ``init_gain``; extra arguments go to :class:`KANLinear`."""

    def __init__(
        self, d_in: int, d_out: int, hidden_size: int | None = None, output_gain: float = 1.0, **kan_kwargs
    ):
        super().__init__()
        widths = [d_in, hidden_size, d_out] if hidden_size else [d_in, d_out]
        last = len(widths) - 2
        self.layers = nn.ModuleList(
            KANLinear(a, b, init_gain=output_gain if i == last else 1.0, **kan_kwargs)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_out)."""
        for layer in self.layers:
            x = layer(x)
        return x


def kan_linear_num_parameters(
    in_features: int,
    out_features: int,
    *,
    basis: str = "bspline",
    grid_size: int = 5,
    spline_order: int = 3,
    bias: bool = True,
    sharing: str = "edge",
    groups: int = 8,
    rational_order: tuple[int, int] = (5, 4),
    **_ignored,
) -> int:
    """Parameter count of ``KANLinear(in_features, out_features, ...)`` without building it."""
    if basis == "rational":
        per_input = 1
        extra = groups * (rational_order[0] + 1 + rational_order[1])
    elif sharing == "group":
        per_input = 1
        extra = groups * (2 + grid_size + spline_order)
    else:
        per_input = 1 + grid_size + spline_order
        extra = 0
    return out_features * in_features * per_input + (out_features if bias else 0) + extra


def kan_block_hidden_size(
    d_in: int, d_out: int, target_params: int, *, tolerance: float = 0.01, multiple_of: int = 8, **kan_kwargs
) -> int | None:
    """Hidden width of a KAN block whose parameter count matches ``target_params``.

    Returns ``None`` when a single ``d_in -> d_out`` KAN layer is within ``tolerance`` (relative) of
    the target. Otherwise returns the width ``h`` of the two-layer block ``d_in -> h -> d_out``:
    the multiple of ``multiple_of`` closest to the target if one is within ``tolerance`` (matmuls
    on such widths run markedly faster: 342 vs 344 costs ~15% at GPT-2 small), else simply the
    closest width. For ``rational``, ``h`` is always a multiple of the groups. Parameters grow by
    about ``2 * n_features * d`` per unit of ``h``, so the match is within 1% once ``h`` is over ~50
    (GPT-2 small: h = 344, +0.7%). ``kan_kwargs`` are those of :class:`KANLinear`.
    """
    single = kan_linear_num_parameters(d_in, d_out, **kan_kwargs)
    if abs(single - target_params) <= tolerance * target_params:
        return None
    grouped = kan_kwargs.get("basis") == "rational" or kan_kwargs.get("sharing") == "group"
    step = kan_kwargs.get("groups", 8) if grouped else 1

    def count(h):
        return kan_linear_num_parameters(d_in, h, **kan_kwargs) + kan_linear_num_parameters(
            h, d_out, **kan_kwargs
        )

    def closest(unit):  # the multiple of ``unit`` whose count is closest to the target
        per_unit = count(2 * unit) - count(unit)  # the count is affine in h
        guess = round((target_params - (count(unit) - per_unit)) / per_unit) * unit
        candidates = [h for h in (guess - unit, guess, guess + unit) if h >= unit] or [unit]
        return min(candidates, key=lambda h: abs(count(h) - target_params))

    aligned = closest(math.lcm(step, multiple_of))
    return aligned if abs(count(aligned) - target_params) <= tolerance * target_params else closest(step)
