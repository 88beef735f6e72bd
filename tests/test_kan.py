"""Tests of the KAN layer library against slow, obvious references."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kangpt import kan_fast, kan_grouped
from kangpt.kan import (
    BASES,
    SHARINGS,
    KANFeedForward,
    KANLinear,
    KANSpec,
    kan_block_hidden_size,
    kan_linear_num_parameters,
)
from kangpt.kan_bases import BSplineBasis

# Every kind of layer: the spline-like bases per edge and grouped, and the (always grouped) rational and
# symbolic.
ALWAYS_GROUPED = ("rational", "symbolic")
KINDS = [(basis, sharing) for sharing in SHARINGS for basis in BASES if basis not in ALWAYS_GROUPED] + [
    (basis, "group") for basis in ALWAYS_GROUPED
]


def cox_de_boor(x: float, knots: list[float], j: int, k: int) -> float:
    """B_{j,k}(x) by the Cox-de Boor recursion, in plain Python floats (fp64)."""
    if k == 0:
        return 1.0 if knots[j] <= x < knots[j + 1] else 0.0
    left = (x - knots[j]) / (knots[j + k] - knots[j]) * cox_de_boor(x, knots, j, k - 1)
    right = (knots[j + k + 1] - x) / (knots[j + k + 1] - knots[j + 1]) * cox_de_boor(x, knots, j + 1, k - 1)
    return left + right


def reference_bsplines(xs, grid_size, k, lo, hi):
    h = (hi - lo) / grid_size
    knots = [lo + (i - k) * h for i in range(grid_size + 2 * k + 1)]
    return torch.tensor(
        [[cox_de_boor(x, knots, j, k) for j in range(grid_size + k)] for x in xs], dtype=torch.float64
    )


@pytest.mark.parametrize(
    "grid_size,k,lo,hi",
    [
        (5, 3, -2.0, 2.0),
        (4, 0, -2.0, 2.0),
        (4, 1, -2.0, 2.0),
        (7, 2, -1.5, 3.0),
        (3, 4, 0.0, 1.0),
        (1, 3, -1.0, 1.0),
    ],
)
def test_bspline_matches_cox_de_boor_inside_at_knots_and_outside(grid_size, k, lo, hi):
    h = (hi - lo) / grid_size
    inside = torch.linspace(lo, hi, 97, dtype=torch.float64)[:-1].tolist()  # [lo, hi)
    at_knots = [lo + i * h for i in range(-k, grid_size + k + 1)]
    outside = [lo - k * h - 1.0, lo - 0.5 * h, hi + 0.3 * h, hi + k * h + 0.1, -1e4, 1e4]
    xs = inside + at_knots + outside
    basis = BSplineBasis(grid_size, k, (lo, hi))
    x = torch.tensor(xs, dtype=torch.float64).unsqueeze(-1)
    expected = reference_bsplines(xs, grid_size, k, lo, hi)
    pointwise = basis.functions(x).squeeze(-1)  # the formula torch.compile fuses
    fast = basis.features_into(x, torch.empty(len(xs), basis.num_features, 1, dtype=torch.float64))
    torch.testing.assert_close(pointwise, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast[:, 1:, 0], expected, atol=1e-6, rtol=0)  # the eager fast path


@pytest.mark.parametrize("k", [1, 3])
def test_grouped_bspline_is_linear_plus_silu_plus_cox_de_boor_splines_per_group(k):
    """phi_g(x) = a_g0 x + a_g1 silu(x) + sum_j a_g,j+2 B_j(x), inside, at knots and outside, on both
    paths (the pointwise formula and the eager piece table)."""
    torch.manual_seed(7)
    lo, hi, grid = -1.5, 2.5, 4
    spec = KANSpec(grid_size=grid, spline_order=k, grid_range=(lo, hi), sharing="group", groups=3)
    layer = KANLinear(6, 2, spec)
    a = torch.randn(3, 2 + grid + k, dtype=torch.float64)
    layer = layer.double()
    with torch.no_grad():
        layer.basis.coefficients.copy_(a)
    h = (hi - lo) / grid
    xs = torch.linspace(lo - (k + 1) * h, hi + (k + 1) * h, 60, dtype=torch.float64).tolist()
    xs += [lo + i * h for i in range(-k, grid + k + 1)] + [-1e3, 1e3]
    x = torch.tensor(xs, dtype=torch.float64).unsqueeze(-1).expand(-1, 6)  # every input the same point
    splines = reference_bsplines(xs, grid, k, lo, hi)  # (P, K)
    expected = a[:, 0] * x[:, :1] + a[:, 1] * F.silu(x[:, :1]) + splines @ a[:, 2:].t()  # (P, groups)
    expected = expected.repeat_interleave(2, dim=1)  # inputs 0-1: group 0, 2-3: group 1, 4-5: group 2
    dense = layer.basis.features(x)[:, 0]
    fast = layer.basis.features_into(x, torch.empty(len(xs), 1, 6, dtype=torch.float64))[:, 0]
    decoding = layer.basis.inference_values(x)  # a decoding step's path: no buffer
    torch.testing.assert_close(dense, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(decoding, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(layer.basis.group_functions(x[:, 0]), expected[:, ::2], atol=1e-9, rtol=0)


@pytest.mark.parametrize("basis", ["bspline", "rbf", "chebyshev"])
def test_grouped_layer_is_a_per_edge_layer_with_rank_one_coefficients(basis):
    """Without its linear term, a grouped layer equals the per-edge layer whose edge i -> j has the
    coefficients w_ji * a_g(i) (SiLU and spline)."""
    torch.manual_seed(8)
    grouped = KANLinear.from_settings(8, 5, basis=basis, sharing="group", groups=4).double()
    with torch.no_grad():
        grouped.basis.coefficients.normal_()
        grouped.basis.coefficients[:, 0] = 0  # the linear term, which per-edge layers do not have
    edge = KANLinear.from_settings(8, 5, basis=basis, sharing="edge").double()
    a = grouped.basis.coefficients.detach()[:, 1:].repeat_interleave(2, dim=0)  # (in, F): every input's
    with torch.no_grad():
        edge.coefficients().copy_(grouped.weight[:, :, None] * a[None])  # (out, in, F)
        edge.bias.copy_(grouped.bias)
    x = 3 * torch.randn(11, 8, dtype=torch.float64)
    torch.testing.assert_close(grouped(x), edge(x))
    torch.testing.assert_close(grouped.edge_functions(x), edge.edge_functions(x))


@pytest.mark.parametrize("basis,old,new", [("bspline", 5, 10), ("rbf", 5, 7), ("chebyshev", 5, 9)])
def test_grouped_extend_grid_preserves_the_functions_and_the_parameters(basis, old, new):
    torch.manual_seed(9)
    layer = KANLinear.from_settings(6, 4, basis=basis, grid_size=old, sharing="group", groups=2)
    coefficients, weight = layer.basis.coefficients, layer.weight
    with torch.no_grad():
        coefficients.normal_()
    x = torch.linspace(-2, 2, 513).unsqueeze(-1).expand(-1, 6)
    before = layer(x)
    layer.extend_grid(new)
    assert layer.weight is weight  # only the function coefficients change shape: a new parameter
    assert layer.basis.coefficients is not coefficients
    assert layer.basis.coefficients.shape == (2, 2 + new + layer.spline_order)
    tolerance = 1e-4 if basis != "rbf" else 0.05  # Gaussians of another width: a least-squares fit
    assert (layer(x) - before).abs().max() < tolerance * before.abs().max()


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_bspline_partition_of_unity_inside_grid(k):
    basis = BSplineBasis(6, k, (-2.0, 2.0))
    x = torch.linspace(-2, 2, 1001, dtype=torch.float64)[:-1].unsqueeze(-1)
    torch.testing.assert_close(basis.functions(x).sum(-2), torch.ones_like(x), atol=1e-12, rtol=0)


def test_bspline_vanishes_beyond_extended_grid():
    basis = BSplineBasis(5, 3, (-2.0, 2.0))  # h = 0.8, spline support ends at +-(2 + 3 * 0.8)
    x = torch.tensor([[-4.41], [4.41], [-50.0], [1e4]])
    assert basis.functions(x).abs().max() == 0
    near = basis.functions(torch.tensor([[-4.3], [4.3]]))  # inside the extra knots: fading, not zero
    assert (near.sum(-2) > 0).all() and (near.sum(-2) < 0.01).all()


def reference_layer(layer: KANLinear, x: torch.Tensor) -> torch.Tensor:
    """The obvious formula: features, then one plain matmul (autograd keeps everything)."""
    feats = layer.basis.features(x.reshape(-1, layer.in_features)).flatten(1)
    y = F.linear(feats, layer.weight, layer.bias)
    return y.view(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_gradcheck_custom_backward_for_input_and_every_parameter(basis, sharing):
    torch.manual_seed(0)
    layer = KANLinear.from_settings(
        4, 3, basis=basis, groups=2, chunk_size=4, grid_range=(-1.5, 1.5), sharing=sharing
    ).double()
    with torch.no_grad():  # spline coefficients as large as the SiLU weights, so they matter
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = (2 * torch.randn(2, 5, 4, dtype=torch.float64)).requires_grad_()

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert len(params) == (4 if basis == "rational" else 3 if sharing == "group" else 2)


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_chunked_function_equals_plain_autograd(basis, sharing):
    torch.manual_seed(1)
    layer = KANLinear.from_settings(12, 6, basis=basis, groups=4, chunk_size=5, sharing=sharing)
    x = torch.randn(4, 9, 12, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    x2 = x.detach().clone().requires_grad_()
    layer.zero_grad()
    y_ref = reference_layer(layer, x2)
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, [x2.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_reference_forward_is_the_layer(basis, sharing):
    """``reference_forward`` (features, one matmul) gives what ``forward`` gives, and is the obvious
    formula of this test file."""
    torch.manual_seed(12)
    layer = KANLinear.from_settings(12, 5, basis=basis, groups=4, sharing=sharing).double()
    x = 2 * torch.randn(3, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer.reference_forward(x), reference_layer(layer, x))
    torch.testing.assert_close(layer(x), layer.reference_forward(x))


@pytest.mark.parametrize("k", [0, 1, 3])
def test_grouped_bspline_blocks_equal_plain_autograd(k, monkeypatch):
    """The grouped B-spline eager path works in blocks of rows (per-row histograms for the gradient
    of the coefficients); cut into blocks of 5 rows, the last one ragged, values and every gradient
    equal plain autograd through the pointwise formula."""
    monkeypatch.setattr(kan_grouped.PieceTableEvaluation, "_BLOCK_ELEMENTS", 5 * 12)
    torch.manual_seed(11)
    layer = KANLinear.from_settings(12, 6, spline_order=k, sharing="group", groups=4).double()
    with torch.no_grad():
        layer.basis.coefficients.normal_()
    x = (2 * torch.randn(36, 12, dtype=torch.float64)).requires_grad_()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_layer(layer, x))
    layer(x).pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    x2 = x.detach().clone().requires_grad_()
    layer.zero_grad()
    reference_layer(layer, x2).pow(2).sum().backward()
    for g, g_ref in zip(grads, [x2.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_compiled_path_formula_equals_eager(basis, sharing, monkeypatch):
    """Under torch.compile the layer uses the plain formula; it must give the same values."""
    torch.manual_seed(2)
    layer = KANLinear.from_settings(8, 4, basis=basis, groups=2, sharing=sharing)
    x = torch.randn(5, 8)
    eager = layer(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(layer(x), eager)
    monkeypatch.setattr(kan_fast, "_COMPILE_CHUNK_ELEMENTS", 2 * 8 * layer.num_features)  # chunks 2, 2, 1
    torch.testing.assert_close(layer(x), eager)


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_saves_only_its_input_for_backward(basis, sharing):
    layer = KANLinear.from_settings(16, 8, basis=basis, chunk_size=4, sharing=sharing)
    x = torch.randn(64, 16, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum()
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def test_shape_compatible_with_linear():
    layer = KANLinear(6, 3)
    for shape in [(6,), (2, 6), (2, 3, 6), (2, 1, 4, 6), (0, 6)]:
        assert layer(torch.randn(shape)).shape == (*shape[:-1], 3)
    with pytest.raises(ValueError, match="last dimension 6"):
        layer(torch.randn(2, 5))


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_basis_in_fp32_under_bf16_autocast(basis, sharing):
    torch.manual_seed(3)
    layer = KANLinear.from_settings(16, 8, basis=basis, chunk_size=8, sharing=sharing)
    x = torch.randn(32, 16).bfloat16()
    feats = layer.basis.features(x)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, layer.basis.features(x.float()))  # upcast first, not after
    x = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("basis,sharing", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_huge_inputs(basis, sharing, dtype):
    layer = KANLinear.from_settings(4, 3, basis=basis, groups=2, sharing=sharing).to(dtype)
    x = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-1e4, 1e4, 1e3, -1e3]], dtype=dtype, requires_grad=True)
    assert torch.isfinite(layer.basis.features(x)).all()
    y = layer(x)
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"basis": "wavelet"}, "basis"),
        ({"grid_size": 0}, "grid_size"),
        ({"spline_order": -1}, "spline_order"),
        ({"grid_range": (1.0, 1.0)}, "grid_range"),
        ({"grid_range": (2.0, -2.0)}, "grid_range"),
        ({"basis": "rational", "groups": 3}, "groups"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KANLinear.from_settings(8, 4, **kwargs)


@pytest.mark.parametrize("basis,old,new", [("bspline", 5, 10), ("bspline", 4, 12), ("chebyshev", 5, 9)])
def test_extend_grid_preserves_the_function(basis, old, new):
    torch.manual_seed(4)
    layer = KANLinear.from_settings(6, 4, basis=basis, grid_size=old)
    with torch.no_grad():
        layer.weight.normal_()  # large spline coefficients: a non-trivial function
    x = torch.linspace(-2, 2, 513).unsqueeze(-1).expand(-1, 6)
    before = layer(x)
    layer.extend_grid(new)
    assert layer.grid_size == new
    assert layer.weight.shape == (4, 6 * (1 + new + layer.spline_order))
    assert (layer(x) - before).abs().max() < 1e-3


def test_extend_grid_rejects_coarsening_and_rational():
    with pytest.raises(ValueError, match="new_grid_size"):
        KANLinear.from_settings(4, 4, grid_size=5).extend_grid(3)
    with pytest.raises(ValueError, match="rational"):
        KANLinear.from_settings(8, 4, basis="rational", groups=4).extend_grid(8)


def test_regularization_loss_matches_hand_computation():
    layer = KANLinear.from_settings(3, 2, grid_size=1, spline_order=1)  # 1 + 2 features per edge
    with torch.no_grad():
        coefficients = layer.coefficients()  # (out, in, F)
        coefficients.zero_()
        coefficients[0, 0, 0] = 3.0
        coefficients[1, 2, :2] = 1.5
    m = torch.tensor([1.0, 1.0])  # the two non-zero edges: mean |coefficient| = 1 each
    p = m / m.sum()
    expected = 2 * m.sum() - 0.5 * (p * p.log()).sum()
    torch.testing.assert_close(layer.regularization_loss(l1=2.0, entropy=0.5), expected)


def test_edge_functions_sum_to_the_layer_output():
    torch.manual_seed(5)
    for basis, sharing in KINDS:
        layer = KANLinear.from_settings(8, 3, basis=basis, groups=4, sharing=sharing)
        x = torch.randn(7, 8)
        edges = layer.edge_functions(x)  # (P, out, in)
        torch.testing.assert_close(edges.sum(-1) + layer.bias, layer(x), rtol=1e-5, atol=1e-5)


def test_initialisation_close_to_silu_mlp_and_variance_preserving():
    torch.manual_seed(6)
    layer = KANLinear(512, 512)
    x = torch.randn(4096, 512)
    y = layer(x)
    assert 0.85 < y.var().item() < 1.15
    silu_only = F.linear(F.silu(x), layer.coefficients()[..., 0])
    assert (y - silu_only).std() < 0.15 * y.std()


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_parameter_count_formula(basis, sharing):
    layer = KANLinear.from_settings(16, 8, basis=basis, grid_size=4, spline_order=2, sharing=sharing)
    assert kan_linear_num_parameters(16, 8, basis=basis, grid_size=4, spline_order=2, sharing=sharing) == sum(
        p.numel() for p in layer.parameters()
    )


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("d", [768, 1024, 256])
def test_hidden_size_matches_gpt2_mlp_preferring_aligned_widths(basis, d):
    target = 2 * d * 4 * d + 4 * d + d

    def count(w):
        return kan_linear_num_parameters(d, w, basis=basis) + kan_linear_num_parameters(w, d, basis=basis)

    h = kan_block_hidden_size(d, d, target, basis=basis)
    allowed = [w for w in range(1, 8 * d) if basis != "rational" or w % 8 == 0]
    aligned = [w for w in allowed if w % 8 == 0 and abs(count(w) - target) <= 0.01 * target]
    # brute force: the closest multiple of 8 within 1%, else the closest width of all
    assert h == min(aligned or allowed, key=lambda w: abs(count(w) - target))
    if d >= 768:  # wide enough for an aligned width within 1%
        assert h % 8 == 0 and abs(count(h) - target) <= 0.01 * target
    with torch.device("meta"):
        block = KANFeedForward(d, d, h, basis=basis)
    assert sum(p.numel() for p in block.parameters()) == count(h)


def test_hidden_size_says_when_a_single_layer_fits():
    d = 256
    target = 8 * d * d + 5 * d
    # grid 4 + order 3 gives 8 features per input: 8 d^2 + d parameters, within 1% of the MLP.
    assert kan_block_hidden_size(d, d, target, grid_size=4, spline_order=3) is None
    assert kan_block_hidden_size(d, d, target) is not None
    block = KANFeedForward(d, d, None, grid_size=4, spline_order=3)
    assert len(block.layers) == 1


@pytest.mark.parametrize("sharing", SHARINGS)
def test_torch_compile_matches_eager_and_keeps_only_the_input(sharing, monkeypatch):
    torch.manual_seed(7)
    layer = KANLinear.from_settings(16, 8, chunk_size=24, sharing=sharing, groups=4)
    with torch.no_grad():
        for param in layer.basis.parameters():  # grouped: functions far from their SiLU start
            param.normal_()
    monkeypatch.setattr(kan_fast, "_COMPILE_CHUNK_ELEMENTS", 20 * 16 * layer.num_features)  # 4 chunks
    x = 2 * torch.randn(64, 16)
    x.requires_grad_()
    layer(x).pow(2).sum().backward()
    eager = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    y.pow(2).sum().backward()
    for got, want in zip([x.grad, *(p.grad for p in layer.parameters())], eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled(x).sum()
    assert sum(saved.values()) <= x.numel() * 4 + 1024  # the input (and small bookkeeping), no features


def test_rational_matches_the_group_formula():
    """Every input goes through its group's P(x) / (1 + |Q(x)|), written out term by term."""
    torch.manual_seed(4)
    layer = KANLinear.from_settings(6, 2, basis="rational", groups=3, rational_order=(3, 2)).double()
    with torch.no_grad():
        layer.basis.numerator.normal_()
        layer.basis.denominator.normal_()
    x = 2 * torch.randn(5, 6, dtype=torch.float64)
    a, b = layer.basis.numerator.tolist(), layer.basis.denominator.tolist()
    expected = torch.empty(5, 6, dtype=torch.float64)
    for t in range(5):
        for i in range(6):
            g, v = i // 2, x[t, i].item()
            p = sum(c * v**power for power, c in enumerate(a[g]))
            q = sum(c * v ** (power + 1) for power, c in enumerate(b[g]))
            expected[t, i] = p / (1 + abs(q))
    torch.testing.assert_close(layer.basis.features(x)[:, 0], expected, rtol=1e-12, atol=1e-12)
    fast = layer.basis.features_into(x, torch.empty(5, 1, 6, dtype=torch.float64))
    torch.testing.assert_close(fast[:, 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change", ["in place", "optimizer step", "load_state_dict", ".data write", "weight"])
def test_grouped_inference_sees_every_change_of_the_coefficients(change):
    """The forward-only path keeps its piece table between calls (generation, one token a call); a
    change of the coefficients, however it is made, must still be seen."""
    torch.manual_seed(10)
    layer = KANLinear.from_settings(8, 4, sharing="group", groups=2)
    x = torch.randn(1, 8)  # a decoding step
    with torch.no_grad():
        before = layer(x)
    if change == "in place":
        with torch.no_grad():
            layer.basis.coefficients.mul_(-2.0)
    elif change == "optimizer step":
        optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
        layer(torch.randn(16, 8)).square().sum().backward()
        optimizer.step()
    elif change == "load_state_dict":
        state = layer.state_dict()
        state["basis.coefficients"] = torch.randn_like(state["basis.coefficients"])
        layer.load_state_dict(state)
    elif change == ".data write":
        layer.basis.coefficients.data[:, 1] = 3.0  # bumps no version counter
    else:  # what a LoRA merge and int8 change: the matrix, which is never cached, not the functions
        layer.weight.data.add_(torch.randn_like(layer.weight))
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after, reference_layer(layer, x).detach())
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("basis,sharing", [("bspline", "edge"), ("bspline", "group"), ("rbf", "group")])
def test_set_grid_range_keeps_the_functions_on_the_new_range(basis, sharing):
    torch.manual_seed(11)
    layer = KANLinear.from_settings(6, 4, basis=basis, sharing=sharing, groups=2, grid_size=8).double()
    with torch.no_grad():  # smooth functions: every function's coefficients sampled from a sine
        functions = layer.basis.coefficients if sharing == "group" else layer.coefficients()  # (..., F)
        phase = 6 * torch.rand(*functions.shape[:-1], 1, dtype=functions.dtype)
        functions.copy_(torch.sin(0.3 * torch.arange(functions.shape[-1], dtype=functions.dtype) + phase))
        if sharing == "group":
            layer.weight.normal_()
    x = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64).unsqueeze(-1).expand(-1, 6)
    before = layer(x)
    layer.set_grid_range(-2.5, 2.5)  # wider: the old functions live inside it
    assert layer.grid_range == (-2.5, 2.5) and layer.basis.num_features == layer.num_features
    tolerance = 0.02 if basis == "bspline" else 0.05  # a least-squares refit onto another grid
    assert (layer(x) - before).abs().max() < tolerance * before.abs().max()
    with pytest.raises(ValueError, match="chebyshev"):
        KANLinear.from_settings(4, 2, basis="chebyshev").set_grid_range(-1, 1)


@pytest.mark.parametrize("grad", [False, True])
def test_a_nan_input_gives_nan_where_it_reaches_and_no_index_error(grad):
    # Weights that diverged feed NaN to the next layer: the loss must turn NaN (which training catches),
    # not the piece-table lookup index outside its table.
    torch.manual_seed(2)
    layer = KANLinear.from_settings(8, 5, sharing="group", groups=2, kernel="torch")
    x = torch.randn(4, 8)
    clean = layer(x).detach()
    x[1, 3] = float("nan")
    x.requires_grad_(grad)
    y = layer(x)
    assert torch.isnan(y[1]).all()
    torch.testing.assert_close(y[[0, 2, 3]], clean[[0, 2, 3]])
    if grad:
        y[[0, 2, 3]].sum().backward()
        assert torch.isfinite(x.grad[[0, 2, 3]]).all()


def test_a_block_builds_one_spec_and_hands_it_to_its_layers():
    spec = KANSpec(sharing="group", groups=4)
    block = KANFeedForward(8, 8, 16, spec=spec, kernel="torch")  # a field given too changes the spec
    first, second = block.layers
    assert first.spec is second.spec and first.spec == spec.replace(kernel="torch")
    layer = KANLinear.from_settings(8, 4, sharing="group", groups=4, bias=False)  # keywords: spec + layer
    assert layer.spec == spec and layer.bias is None
    with pytest.raises(TypeError, match="spec must be a KANSpec"):
        KANLinear(8, 4, {"sharing": "group"})
