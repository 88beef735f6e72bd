"""Name a learned 1-D function with a formula (symbolic regression against a small library).

For every candidate function ``f`` of a library, :func:`fit_symbolic` fits

    y ~= c * f(a * x + b) + d

to samples ``(x, y)`` (for a KAN, the values of one edge function ``phi_ij``) and ranks the fits.

Fitting, per candidate, in float64 torch on standardised x and y:

1. grid search over the nonlinear pair ``(a, b)``; at every grid point ``(c, d)`` is the exact linear
   least-squares solution, so the grid only spans ``(a, b)``;
2. Levenberg-Marquardt on ``(a, b)`` from the best grid points, with ``(c, d)`` re-solved exactly
   at every step (variable projection);
3. the parameters are mapped back to the original x and y, put in canonical form, and ``(c, d)``
   solved once more. R^2 is computed on the data as given.

Canonical parameters. Redundant parameters are fixed, so the reported ones are identifiable:

- ``scale_free`` candidates (x, x^2, x^3, abs, sqrt, log, 1/x): ``f(s * u)`` is an affine image of
  ``f(u)`` for ``s > 0``, so ``|a| = 1`` and c, d absorb the scale: x^2 is reported as
  ``c * (x + b)^2 + d``.
- ``shift_free`` candidates (x, exp): ``f(u + t)`` is an affine image of ``f(u)``, so ``b = 0``:
  exp is reported as ``c * exp(a * x) + d``, its c being ``c * e^b`` of any equivalent form.
- sin has ``b`` in ``[-pi/2, pi/2)`` (``sin(u + pi) = -sin(u)``; c takes the sign).
- Candidates for which ``f(-u)`` is an affine image of ``f(u)`` (odd or even functions, sigmoid)
  are fitted with ``a > 0`` only (``signs=(1,)``); the others also with negative a.

Domains. sqrt, log and 1/x are only used on ``u = a * x + b > 0`` (1/x with ``a = -1`` covers
negative u). Their fits are restricted to parameters that keep every sample at least a small
margin inside the domain: the grid holds only such ``(a, b)`` and Levenberg-Marquardt steps are
clamped back into it. A fit never relies on the invalid region, so its R^2 is always finite. A
candidate whose best fit is still not finite (e.g. exp overflowing) is left out of the results.

Ranking. R^2 first, but simpler functions win near-ties: repeatedly take, among the remaining fits
whose R^2 is within ``r2_margin`` (default 1e-3) of the best remaining R^2, the simplest one:
lowest complexity, then fewest fitted parameters (``num_params``), then highest R^2, then earliest
in the library. So a straight line is named ``x``, not a far-away log that fits it as well, and
exp data is named ``exp`` (3 parameters), not ``tanh`` (4), which tends to exp as its centre
recedes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import sympy
import torch

from ..kan_symbolic import FUNCTIONS

__all__ = ["Candidate", "LIBRARY", "SymbolicFit", "fit_symbolic"]

_F64 = torch.float64
_MIN_POINTS = 5
# The grid search and the local optimiser run on at most this many samples (evenly spaced
# quantiles of x); the final (c, d) and R^2 use all of them.
_GRID_SAMPLES = 256
_REFINE_SAMPLES = 2048
_CHUNK_ELEMENTS = 1 << 16  # grid points are evaluated in chunks of at most this many (point, sample) pairs
_STARTS = 8  # best grid points refined by Levenberg-Marquardt
# |a| on the grid, in units of 1 / std(x): log-spaced below 1, then linear so that sin's phase
# error across the data stays small between neighbouring grid points.
_A_MAGNITUDES = torch.cat(
    [torch.logspace(-1.3, 0, 7, dtype=_F64), torch.arange(1.25, 16.01, 0.25, dtype=_F64)]
)
_B_STEP = 0.5  # b on the grid: steps of 0.5 over +-(2 + 1.5 |a| max|x|) (standardised x)
# Restricted domains: distance of the boundary (u = 0) from the nearest sample, in std(x).
_DOMAIN_OFFSETS = torch.logspace(-3, 2, 26, dtype=_F64)
_DOMAIN_MARGIN = 1e-9  # smallest u allowed on the samples, per unit |a| (standardised x)


@dataclass(frozen=True)
class Candidate:
    """A library function ``f``, fitted as ``c * f(a * x + b) + d``.

    Args:
        fn: elementwise torch implementation, differentiable by autograd (float64 in and out).
        sympy_fn: builds the sympy expression ``f(u)`` from a sympy expression ``u``.
        complexity: simplicity score used to break near-ties in R^2 (lower is simpler).
        signs: signs of ``a`` searched; ``(1,)`` when ``f(-u)`` is an affine image of ``f(u)``.
        scale_free: ``f(s * u)`` is an affine image of ``f(u)`` for ``s > 0``; ``|a|`` is fixed to 1.
        shift_free: ``f(u + t)`` is an affine image of ``f(u)``; ``b`` is fixed to 0.
        positive: ``f`` is only used for ``u > 0``; fits keep ``a * x + b > 0`` on every sample.
        half_period: if > 0, ``f(u + half_period) = -f(u)``; b is reported in
            ``[-half_period / 2, half_period / 2)``.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    sympy_fn: Callable[[sympy.Expr], sympy.Expr]
    complexity: int
    signs: tuple[int, ...] = (1, -1)
    scale_free: bool = False
    shift_free: bool = False
    positive: bool = False
    half_period: float = 0.0

    def __post_init__(self):
        if not self.signs or not set(self.signs) <= {1, -1}:
            raise ValueError(f"signs must be a non-empty subset of (1, -1), got {self.signs!r}")
        if self.positive and self.shift_free:
            raise ValueError("a positive-domain candidate needs a fitted shift (shift_free=False)")

    @property
    def num_params(self) -> int:
        """Fitted parameters: c, d, plus a unless scale_free, plus b unless shift_free."""
        return 4 - self.scale_free - self.shift_free


def _sympy_sigmoid(u):
    return 1 / (1 + sympy.exp(-u))


# Complexity: about the number of elementary operations in the formula beyond the affine maps:
# x 1; x^2, abs 2; x^3, sqrt, log, 1/x, exp, sin, tanh 3; sigmoid, silu, gaussian 4. sigmoid is an
# affine image of tanh (sigmoid(u) = (1 + tanh(u / 2)) / 2): with 4 it ranks after tanh on their
# (equal) fits instead of by round-off.
# The functions defined on every real number are the symbolic basis's own (what a symbolic model
# evaluates); sqrt, log and 1/x are fitted only, on their domain.
_F = FUNCTIONS
LIBRARY: dict[str, Candidate] = {
    "x": Candidate(_F["x"], lambda u: u, 1, signs=(1,), scale_free=True, shift_free=True),
    "x^2": Candidate(_F["x^2"], lambda u: u**2, 2, signs=(1,), scale_free=True),
    "abs": Candidate(_F["abs"], sympy.Abs, 2, signs=(1,), scale_free=True),
    "x^3": Candidate(_F["x^3"], lambda u: u**3, 3, signs=(1,), scale_free=True),
    "sqrt": Candidate(torch.sqrt, sympy.sqrt, 3, scale_free=True, positive=True),
    "log": Candidate(torch.log, sympy.log, 3, scale_free=True, positive=True),
    "1/x": Candidate(torch.reciprocal, lambda u: 1 / u, 3, scale_free=True, positive=True),
    "exp": Candidate(_F["exp"], sympy.exp, 3, shift_free=True),
    "sin": Candidate(_F["sin"], sympy.sin, 3, signs=(1,), half_period=math.pi),
    "tanh": Candidate(_F["tanh"], sympy.tanh, 3, signs=(1,)),
    "sigmoid": Candidate(_F["sigmoid"], _sympy_sigmoid, 4, signs=(1,)),
    "silu": Candidate(_F["silu"], lambda u: u * _sympy_sigmoid(u), 4),
    "gaussian": Candidate(_F["gaussian"], lambda u: sympy.exp(-(u**2)), 4, signs=(1,)),
}


def _number(v: float) -> sympy.Expr:
    """A sympy number; 0 and +-1 (the fixed canonical values) are Integers, so ``1*x + 0`` prints as ``x``."""
    return sympy.Integer(int(v)) if v in (-1.0, 0.0, 1.0) else sympy.Float(v)


@dataclass(frozen=True)
class SymbolicFit:
    """A fitted candidate: ``y ~= c * f(a * x + b) + d`` with R^2 ``r2`` on the fitted samples."""

    name: str
    a: float
    b: float
    c: float
    d: float
    r2: float
    complexity: int
    candidate: Candidate = field(repr=False, compare=False)

    @property
    def formula(self) -> sympy.Expr:
        """The fit as a sympy expression in the symbol ``x`` (use ``.evalf(4)`` for short numbers)."""
        x = sympy.Symbol("x")
        inner = _number(self.a) * x + _number(self.b)
        return _number(self.c) * self.candidate.sympy_fn(inner) + _number(self.d)

    def __call__(self, x) -> torch.Tensor:
        """Evaluate the fitted formula at ``x`` (anything ``torch.as_tensor`` takes) in float64.

        Like the formula, the result is NaN where ``a * x + b`` leaves the domain of sqrt or log.
        """
        x = torch.as_tensor(x).detach().to(_F64)
        return self.c * self.candidate.fn(self.a * x + self.b) + self.d

    def to_dict(self) -> dict:
        """JSON-ready summary: name, parameters, r2, complexity and the formula as a string."""
        return {
            "name": self.name,
            "a": self.a,
            "b": self.b,
            "c": self.c,
            "d": self.d,
            "r2": self.r2,
            "complexity": self.complexity,
            "formula": str(self.formula),
        }


def _points(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach()
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    t = t.to("cpu", _F64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _resolve_library(library) -> dict[str, Candidate]:
    if library is None:
        return dict(LIBRARY)
    if isinstance(library, Mapping):
        chosen = dict(library)
        bad = [name for name, cand in chosen.items() if not isinstance(cand, Candidate)]
        if bad:
            raise TypeError(f"library values must be Candidate objects, not for {bad}")
    else:
        names = [library] if isinstance(library, str) else list(library)
        unknown = [name for name in names if name not in LIBRARY]
        if unknown:
            raise ValueError(f"unknown library functions {unknown}; known: {list(LIBRARY)}")
        chosen = {name: LIBRARY[name] for name in names}
    if not chosen:
        raise ValueError("library is empty")
    return chosen


def _linear_fit(f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (c, d) of ``y ~= c * f + d`` for every row of f (G, N); c = 0 for constant rows."""
    f_mean = f.mean(-1)
    fc = f - f_mean[:, None]
    var = (fc * fc).sum(-1)
    c = (fc * (y - y.mean())).sum(-1) / var
    c = torch.where(var > 1e-20 * (f * f).sum(-1), c, 0.0)
    return c, y.mean() - c * f_mean


def _sse(cand: Candidate, x, y, a, b) -> torch.Tensor:
    """Sum of squared residuals of the best (c, d) for every (a, b); inf where f is not finite."""
    f = cand.fn(a[:, None] * x + b[:, None])
    c, d = _linear_fit(f, y)
    sse = (y - c[:, None] * f - d[:, None]).square().sum(-1)
    return torch.nan_to_num(sse, nan=math.inf)


def _b_floor(a, lo, hi):
    """Smallest b with ``a * x + b >= 0`` on [lo, hi]."""
    return -torch.minimum(a * lo, a * hi)


def _grid(cand: Candidate, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Start values (a, b) for x standardised to [lo, hi]."""
    mags = torch.ones(1, dtype=_F64) if cand.scale_free else _A_MAGNITUDES
    a = torch.cat([sign * mags for sign in cand.signs])
    if cand.shift_free:
        return a, torch.zeros_like(a)
    if cand.positive:
        offsets = _DOMAIN_OFFSETS.repeat(len(a))
        a = a.repeat_interleave(len(_DOMAIN_OFFSETS))
        return a, _b_floor(a, lo, hi) + a.abs() * offsets
    # Centres -b/a across and beyond the data, plus a couple of units of phase for small |a|.
    steps = torch.ceil((2 + 1.5 * a.abs() * max(-lo, hi)) / _B_STEP).long()
    b = torch.cat([torch.arange(-k, k + 1, dtype=_F64) for k in steps.tolist()]) * _B_STEP
    return a.repeat_interleave(2 * steps + 1), b


def _project_out(v, f):
    """Remove from every row of v (starts, N) its least-squares fit by ``c * f + d`` (same rows)."""
    fc = f - f.mean(-1, keepdim=True)
    vc = v - v.mean(-1, keepdim=True)
    var = (fc * fc).sum(-1, keepdim=True)
    coef = torch.where(var > 0, (vc * fc).sum(-1, keepdim=True) / var, 0.0)
    return vc - coef * fc


def _refine(cand: Candidate, x, y, a, b, iterations: int):
    """Levenberg-Marquardt on (a, b) from several starts at once; returns (a, b, sse).

    Variable projection (Kaufman's form): (c, d) are solved exactly for the current (a, b), and
    the step for (a, b) uses the Jacobian of the model with the span of ``[f, 1]`` projected out.
    The systems are 1x1 or 2x2 and solved in closed form (no BLAS/LAPACK calls for tiny sizes).
    """
    lo, hi = x.min(), x.max()
    sse = _sse(cand, x, y, a, b)
    fit_a, fit_b = not cand.scale_free, not cand.shift_free
    if not (fit_a or fit_b):
        return a, b, sse
    damping = torch.full_like(a, 1e-3)
    for _ in range(iterations):
        with torch.enable_grad():
            u = (a[:, None] * x + b[:, None]).requires_grad_()
            f = cand.fn(u)
            (df,) = torch.autograd.grad(f.sum(), u)
        f = f.detach()
        c, d = _linear_fit(f, y)
        residual = y - c[:, None] * f - d[:, None]
        slope = c[:, None] * df  # d(model)/du
        cols = [_project_out(col, f) for col in ([slope * x] if fit_a else []) + ([slope] if fit_b else [])]
        jtj = [[(p * q).sum(-1) for q in cols] for p in cols]
        grad = [(p * residual).sum(-1) for p in cols]
        diag = [(1 + damping) * jtj[i][i] + damping * 1e-9 for i in range(len(cols))]
        if len(cols) == 1:
            step = [grad[0] / diag[0]]
        else:
            det = diag[0] * diag[1] - jtj[0][1] ** 2
            step = [
                (diag[1] * grad[0] - jtj[0][1] * grad[1]) / det,
                (diag[0] * grad[1] - jtj[0][1] * grad[0]) / det,
            ]
        new_a = a + step[0] if fit_a else a
        new_b = b + step[-1] if fit_b else b
        if cand.positive:
            new_b = torch.maximum(new_b, _b_floor(new_a, lo, hi) + _DOMAIN_MARGIN * new_a.abs())
        new_sse = _sse(cand, x, y, new_a, new_b)
        better = new_sse < sse  # False for NaN steps
        a, b, sse = (
            torch.where(better, new_a, a),
            torch.where(better, new_b, b),
            torch.where(better, new_sse, sse),
        )
        damping = torch.where(better, damping / 3, damping * 4)
    return a, b, sse


def _quantiles(x: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of at most ``count`` samples at evenly spaced quantiles of x."""
    return torch.argsort(x)[torch.linspace(0, len(x) - 1, min(len(x), count)).round().long()]


def _fit_one(name, cand, x, y, stats, iterations) -> SymbolicFit | None:
    """Fit one candidate to standardised (x, y); stats = (mean x, std x, mean y, std y, original x)."""
    mx, sx, my, sy, x_orig = stats
    a0, b0 = _grid(cand, x.min().item(), x.max().item())
    grid_idx, refine_idx = _quantiles(x, _GRID_SAMPLES), _quantiles(x, _REFINE_SAMPLES)
    xg, yg = x[grid_idx], y[grid_idx]
    rows = max(1, _CHUNK_ELEMENTS // len(xg))
    sse = torch.cat([_sse(cand, xg, yg, a0[i : i + rows], b0[i : i + rows]) for i in range(0, len(a0), rows)])
    starts = torch.topk(sse, min(_STARTS, len(sse)), largest=False).indices
    a, b, sse = _refine(cand, x[refine_idx], y[refine_idx], a0[starts], b0[starts], iterations)
    best = int(torch.argmin(sse))
    # Back to the original x, then canonical form.
    a_x = a[best].item() / sx
    b_x = b[best].item() - a_x * mx
    if cand.scale_free:
        a_x, b_x = math.copysign(1.0, a_x), b_x / abs(a_x)
    if cand.shift_free:
        b_x = 0.0
    if cand.half_period > 0:
        b_x -= cand.half_period * math.floor(b_x / cand.half_period + 0.5)
    f = cand.fn(a_x * x_orig + b_x)[None]
    c, d = _linear_fit(f, y)
    sse = (y - c * f[0] - d).square().sum().item()
    sst = y.square().sum().item()
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    if not math.isfinite(r2):
        return None
    return SymbolicFit(name, a_x, b_x, c.item() * sy, d.item() * sy + my, r2, cand.complexity, cand)


def _rank(fits: list[SymbolicFit], r2_margin: float) -> list[SymbolicFit]:
    """Order fits by R^2, preferring simpler fits within ``r2_margin`` (see the module docstring)."""
    remaining, ranked = list(fits), []
    while remaining:
        best = max(fit.r2 for fit in remaining)
        near = [fit for fit in remaining if fit.r2 >= best - r2_margin]
        pick = min(near, key=lambda fit: (fit.complexity, fit.candidate.num_params, -fit.r2))
        remaining.remove(pick)
        ranked.append(pick)
    return ranked


def fit_symbolic(
    x,
    y,
    library: Sequence[str] | Mapping[str, Candidate] | None = None,
    *,
    top_k: int | None = None,
    r2_margin: float = 1e-3,
    iterations: int = 30,
) -> list[SymbolicFit]:
    """Fit ``y ~= c * f(a * x + b) + d`` for every library function f and rank the fits.

    Args:
        x, y: 1-D samples of equal length (tensors, arrays or sequences), at least 5 points,
            finite, with at least two distinct x values.
        library: candidate names from :data:`LIBRARY` (restrict), or a mapping name -> Candidate
            used as the whole library (extend with ``{**LIBRARY, "name": Candidate(...)}``).
        top_k: return only the best ``top_k`` fits (default: all).
        r2_margin: fits whose R^2 is within this of the best remaining one are ordered by
            complexity (see the module docstring for the exact rule).
        iterations: Levenberg-Marquardt iterations per candidate.

    Returns:
        :class:`SymbolicFit` objects, best first. Constant y gives R^2 = 1 and c = 0 for every
        candidate (each reproduces y exactly), so the simplest, ``x``, comes first.
    """
    x, y = _points(x, "x"), _points(y, "y")
    if len(x) < _MIN_POINTS:
        raise ValueError(f"x must hold at least {_MIN_POINTS} points, got {len(x)}")
    if len(y) != len(x):
        raise ValueError(f"y must have as many points as x ({len(x)}), got {len(y)}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if r2_margin < 0:
        raise ValueError(f"r2_margin must be >= 0, got {r2_margin!r}")
    candidates = _resolve_library(library)
    mx, sx = x.mean().item(), x.std(correction=0).item()
    if sx == 0:
        raise ValueError("x must take at least two distinct values")
    my, sy = y.mean().item(), y.std(correction=0).item()
    constant = (y.max() - y.min()).item() <= 1e-12 * y.abs().max().item()
    ys = torch.zeros_like(y) if constant else (y - my) / sy
    xs = (x - mx) / sx
    stats = (mx, sx, my, sy if not constant else 1.0, x)
    fits = [_fit_one(name, cand, xs, ys, stats, iterations) for name, cand in candidates.items()]
    ranked = _rank([fit for fit in fits if fit is not None], r2_margin)
    return ranked[:top_k]
