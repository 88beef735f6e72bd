"""Tests of kangpt.interpret.symbolic: recovery of known functions, ranking, formulas, bad inputs."""

import json
import math

import numpy as np
import pytest
import sympy
import torch
import torch.nn.functional as F

from kangpt.interpret.symbolic import LIBRARY, Candidate, SymbolicFit, fit_symbolic
from kangpt.kan import KANLinear

N_POINTS = 200
NOISE = 0.01  # noise std as a fraction of std(y)


def _uniform(gen, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _sign(gen):
    return 1.0 if torch.rand((), generator=gen).item() < 0.5 else -1.0


def _draw(name, gen):
    """Random (a, b, c, d) for which ``c * f(a x + b) + d`` on x in [-2, 2] is clearly of family f."""
    c, d = _sign(gen) * _uniform(gen, 0.5, 2.0), _uniform(gen, -1.0, 1.0)
    if name in ("log", "sqrt", "1/x"):  # the domain boundary lies a little beyond the data
        a = _sign(gen) * _uniform(gen, 0.5, 1.5)
        return a, abs(a) * (2 + _uniform(gen, 0.02, 0.3 if name == "sqrt" else 1.0)), c, d
    low, high = {"sin": (1.5, 3.0), "exp": (0.5, 1.5), "silu": (2.0, 3.0)}.get(name, (0.8, 2.0))
    a = _sign(gen) * _uniform(gen, low, high)
    reach = 0.5 if name == "silu" else 1.0  # silu's bend must lie well inside to tell it from sin
    return a, -a * _uniform(gen, -reach, reach), c, d  # centre / vertex / phase origin -b/a


def _canonical(name, a, b, c, d):
    """The parameters fit_symbolic reports for c * f(a x + b) + d (see the module docstring)."""
    s, m = math.copysign(1.0, a), abs(a)
    if name == "x^2":
        return 1.0, b / a, c * a**2, d
    if name == "x^3":
        return 1.0, b / a, c * a**3, d
    if name == "abs":
        return 1.0, b / a, c * m, d
    if name == "sqrt":
        return s, b / m, c * math.sqrt(m), d
    if name == "log":
        return s, b / m, c, d + c * math.log(m)
    if name == "1/x":
        return s, b / m, c / m, d
    if name == "exp":
        return a, 0.0, c * math.exp(b), d
    if name in ("tanh", "gaussian", "sin"):  # odd or even: a > 0
        a, b, c = m, s * b, (s * c if name != "gaussian" else c)
        if name == "sin":  # b in [-pi/2, pi/2), sin(u + pi) = -sin(u)
            k = math.floor(b / math.pi + 0.5)
            b, c = b - k * math.pi, c * (-1) ** k
        return a, b, c, d
    return a, b, c, d


def _data(name, seed, n=N_POINTS):
    gen = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(n, generator=gen, dtype=torch.float64) - 2
    params = _draw(name, gen)
    a, b, c, d = params
    clean = c * LIBRARY[name].fn(a * x + b) + d
    y = clean + NOISE * clean.std() * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y, clean, params


RECOVERED = ["sin", "x^2", "tanh", "exp", "x^3", "gaussian", "log", "sqrt", "1/x", "silu", "abs"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", RECOVERED)
def test_recovers_known_function(name, seed):
    x, y, clean, params = _data(name, seed)
    fits = fit_symbolic(x, y)
    top = fits[0]
    assert top.name == name, [(f.name, round(f.r2, 5)) for f in fits[:4]]
    assert top.r2 >= 0.99
    assert (top(x) - clean).abs().max() <= 0.05 * clean.std()
    expected = _canonical(name, *params)
    got = (top.a, top.b, top.c, top.d)
    scales = (1.0, 1.0, 1.0, clean.std().item())  # d is known to about the noise level
    for label, g, e, scale in zip("abcd", got, expected, scales, strict=True):
        assert abs(g - e) <= 0.03 * (scale + abs(e)), f"{label}: fitted {got}, expected {expected}"


def test_straight_line_is_named_x():
    gen = torch.Generator().manual_seed(3)
    x = torch.linspace(-2, 2, N_POINTS, dtype=torch.float64)
    y = 2.5 * x - 0.7 + 0.01 * torch.randn(N_POINTS, generator=gen, dtype=torch.float64)
    fits = fit_symbolic(x, y)
    top = fits[0]
    assert (top.name, top.complexity, top.a, top.b) == ("x", 1, 1.0, 0.0)
    assert top.c == pytest.approx(2.5, abs=1e-2) and top.d == pytest.approx(-0.7, abs=1e-2)
    # More complex candidates fit the noise at least as well, yet rank below x.
    assert max(f.r2 for f in fits[1:]) >= top.r2


def test_equal_complexity_ranks_by_r2():
    x = torch.linspace(-2, 2, N_POINTS, dtype=torch.float64)
    fits = {f.name: f for f in fit_symbolic(x, 1 / (x + 4))}
    assert next(iter(fits)) == "1/x" and fits["1/x"].r2 == pytest.approx(1.0)
    # log comes first in the library and has the same complexity: its R^2 is within the margin.
    assert fits["log"].complexity == fits["1/x"].complexity and fits["log"].r2 > 1 - 1e-3


def test_zero_margin_ranks_by_r2_alone():
    x, y, _, _ = _data("tanh", 5)
    r2 = [f.r2 for f in fit_symbolic(x, y, r2_margin=0.0)]
    assert r2 == sorted(r2, reverse=True)


def test_formula_matches_call_for_every_candidate():
    x, y, _, _ = _data("gaussian", 7)
    fits = fit_symbolic(x, y)
    assert {f.name for f in fits} == set(LIBRARY)
    symbol = sympy.Symbol("x")
    for fit in fits:
        assert isinstance(fit.formula, sympy.Expr) and fit.formula.free_symbols == {symbol}
        values = sympy.lambdify(symbol, fit.formula, "numpy")(x.numpy())
        np.testing.assert_allclose(values, fit(x).numpy(), rtol=1e-9, atol=1e-9, err_msg=fit.name)


def test_formula_prints_canonical_form():
    x = torch.linspace(-2, 2, 101, dtype=torch.float64)
    fit = fit_symbolic(x, 3 * torch.sin(2 * x + 0.5) - 1, ["sin"])[0]
    assert fit.r2 == pytest.approx(1.0)
    expected = 3 * sympy.sin(2 * sympy.Symbol("x") + sympy.S.Half) - 1
    assert sympy.nsimplify(fit.formula, tolerance=1e-6, rational=True) == expected
    line = fit_symbolic(x, 0.5 - 2 * x, ["x"])[0]
    assert str(line.formula) == "0.5 - 2.0*x"  # a = 1 and b = 0 leave no trace


def test_to_dict_is_json_and_formula_round_trips():
    x, y, _, _ = _data("exp", 2)
    fit = fit_symbolic(x, y, top_k=1)[0]
    record = json.loads(json.dumps(fit.to_dict()))
    assert {k: record[k] for k in ("name", "a", "b", "c", "d", "r2", "complexity")} == {
        "name": fit.name,
        "a": fit.a,
        "b": fit.b,
        "c": fit.c,
        "d": fit.d,
        "r2": fit.r2,
        "complexity": fit.complexity,
    }
    parsed = sympy.lambdify(sympy.Symbol("x"), sympy.sympify(record["formula"]), "numpy")
    np.testing.assert_allclose(parsed(x.numpy()), fit(x).numpy(), rtol=1e-12)


def test_restricted_domains_stay_valid_and_r2_is_finite():
    x, y, _, _ = _data("sin", 4)  # x spans both signs: sqrt/log/1/x only fit with a shifted argument
    fits = fit_symbolic(x, y)
    assert len(fits) == len(LIBRARY)
    for fit in fits:
        assert math.isfinite(fit.r2) and -1e-9 <= fit.r2 <= 1 + 1e-9, fit
        assert torch.isfinite(fit(x)).all(), fit
        if LIBRARY[fit.name].positive:
            assert (fit.a * x + fit.b).min() > 0, fit


def test_domain_is_enforced_by_the_fit():
    # A positive-domain candidate that does not signal the invalid region with NaNs: the best
    # unconstrained fit of sqrt(max(x, 0)) would put its kink inside the data.
    safe_sqrt = Candidate(lambda u: u.clamp_min(0).sqrt(), sympy.sqrt, 3, scale_free=True, positive=True)
    x = torch.linspace(-2, 2, N_POINTS, dtype=torch.float64)
    fit = fit_symbolic(x, torch.sqrt(x.clamp_min(0)), {"safe_sqrt": safe_sqrt})[0]
    assert (fit.a * x + fit.b).min() > 0
    assert 0.5 < fit.r2 < 0.999


def test_constant_y():
    x = torch.linspace(-1, 3, 50, dtype=torch.float64)
    fits = fit_symbolic(x, torch.full_like(x, 0.3))
    assert all(f.r2 == 1.0 and f.c == 0.0 for f in fits)
    assert fits[0].name == "x" and fits[0].d == pytest.approx(0.3)
    assert fits[0].formula == sympy.Float(0.3)
    assert torch.allclose(fits[0](x), torch.full_like(x, 0.3))


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        ([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], "x must hold at least"),
        ([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0], "y must have as many points"),
        ([0.0, 1.0, float("nan"), 3.0, 4.0], [0.0] * 5, "x contains NaN"),
        ([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, float("nan"), 3.0, 4.0], "y contains NaN"),
        ([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, float("inf"), 3.0, 4.0], "y contains NaN or infinite"),
        ([[0.0, 1.0, 2.0, 3.0, 4.0]], [0.0] * 5, "x must be 1-D"),
        ([1.0] * 6, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "x must take at least two distinct"),
    ],
)
def test_bad_inputs(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_symbolic(x, y)


def test_bad_options():
    x = torch.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="unknown library functions \\['cosh'\\]"):
        fit_symbolic(x, x, ["sin", "cosh"])
    with pytest.raises(ValueError, match="library is empty"):
        fit_symbolic(x, x, [])
    with pytest.raises(ValueError, match="top_k"):
        fit_symbolic(x, x, top_k=0)
    with pytest.raises(TypeError, match="Candidate"):
        fit_symbolic(x, x, {"sin": torch.sin})
    with pytest.raises(ValueError, match="shift"):
        Candidate(torch.log, sympy.log, 3, shift_free=True, positive=True)


def test_library_restriction_extension_and_top_k():
    x, y, _, _ = _data("sin", 6)
    assert {f.name for f in fit_symbolic(x, y, ["exp", "sin"])} == {"exp", "sin"}
    assert [f.name for f in fit_symbolic(x, y, "sin")] == ["sin"]
    assert len(fit_symbolic(x, y, top_k=3)) == 3

    softplus = Candidate(F.softplus, lambda u: sympy.log(1 + sympy.exp(u)), 4)
    y = 1.3 * F.softplus(4.0 * x - 0.5) - 0.2
    fits = fit_symbolic(x, y, {**LIBRARY, "softplus": softplus})
    assert fits[0].name == "softplus" and fits[0].r2 > 0.9999
    assert (fits[0].a, fits[0].b, fits[0].c, fits[0].d) == pytest.approx((4.0, -0.5, 1.3, -0.2), abs=1e-4)


def test_many_points_numpy_input_and_no_grad():
    gen = torch.Generator().manual_seed(8)
    x = 4 * torch.rand(5000, generator=gen) - 2  # float32, more points than the grid search uses
    y = 0.8 * torch.tanh(1.5 * x + 0.2)
    with torch.no_grad():  # the local optimiser needs autograd: must work under no_grad too
        fits = fit_symbolic(x.numpy(), y.numpy().tolist(), top_k=2)
    assert fits[0].name == "tanh" and fits[0].r2 > 0.9999
    assert (fits[0].a, fits[0].b) == pytest.approx((1.5, 0.2), abs=1e-3)


def test_kan_edge_functions():
    torch.manual_seed(0)
    layer = KANLinear(2, 3)
    x = torch.linspace(-2, 2, 200)
    phi = layer.edge_functions(x)[:, 1, 0]  # requires grad: fit_symbolic must detach it
    fits = fit_symbolic(x, phi)
    assert all(isinstance(f, SymbolicFit) and math.isfinite(f.r2) for f in fits)
    assert fits[0].r2 > 0.9  # a freshly initialised edge is close to w * silu(x)
    assert (fits[0](x) - phi.detach().double()).abs().max() < 0.5 * phi.detach().std()
