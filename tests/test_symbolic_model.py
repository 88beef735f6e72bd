"""The symbolic basis (kangpt.kan_symbolic) and the symbolic KAN-GPT-2 made of a trained model
(kangpt.interpret.symbolic_model): formulas against their closed forms, the replaced functions against
the splines they replace, loading and generating (``kangpt inspect --symbolic``: in
tests/test_interpret.py)."""

import math

import pytest
import torch
from test_interpret import trained  # noqa: F401  (the module's fixture: a tiny trained model)
from transformers import AutoModelForCausalLM

from kangpt import KANGPT2Config, KANGPT2LMHeadModel
from kangpt.interpret import collect_statistics, kan_layers, symbolic_model, validation_loss
from kangpt.interpret.formulas import _group_values, group_samples
from kangpt.kan import KANLinear
from kangpt.kan_spec import KANSpec
from kangpt.kan_symbolic import NAMES, SymbolicBasis

CLOSED_FORMS = {  # f(u) written out independently of kan_symbolic's table
    "x": lambda u: u, "x^2": lambda u: u * u, "abs": lambda u: u.abs(), "x^3": lambda u: u * u * u,
    "exp": lambda u: torch.exp(torch.clamp(u, max=80.0)), "sin": lambda u: torch.sin(u),
    "tanh": lambda u: (torch.exp(2 * u) - 1) / (torch.exp(2 * u) + 1),
    "sigmoid": lambda u: 1 / (1 + torch.exp(-u)), "silu": lambda u: u / (1 + torch.exp(-u)),
    "gaussian": lambda u: torch.exp(-u * u),
}


def test_each_group_is_its_formula_and_gradients_are_exact():
    assert set(NAMES) == set(CLOSED_FORMS)
    groups = len(NAMES)
    basis = SymbolicBasis(2 * groups, groups, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        basis.formulas.copy_(torch.arange(groups))
        basis.affine.copy_(torch.randn(groups, 4, dtype=torch.float64))
    x = torch.randn(5, 2 * groups, dtype=torch.float64) * 2
    feats = basis.features(x)
    assert feats.shape == (5, 1, 2 * groups)
    for g, name in enumerate(NAMES):
        a, b, c, d = basis.affine[g].tolist()
        expected = c * CLOSED_FORMS[name](a * x[:, 2 * g : 2 * g + 2] + b) + d
        torch.testing.assert_close(feats[:, 0, 2 * g : 2 * g + 2], expected, rtol=1e-10, atol=1e-10)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, affine: basis.features(x), (x, basis.affine))
    grad_out = torch.ones_like(feats)
    out, grad_x, (grad_affine,) = basis.features_and_grads(x.detach(), torch.empty_like(feats), grad_out)
    torch.testing.assert_close(out, feats.detach())
    expected_x, expected_affine = torch.autograd.grad(basis.features(x).sum(), (x, basis.affine))
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_affine, expected_affine)


def test_a_symbolic_layer_starts_as_silu_and_never_overflows():
    layer = KANLinear(16, 4, KANSpec(basis="symbolic", groups=4))
    assert layer.sharing == "group" and layer.basis.names() == ["silu"] * 4
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.silu(x) @ layer.weight.t() + layer.bias)
    count = KANSpec(basis="symbolic", groups=4).num_parameters(16, 4)
    assert sum(p.numel() for p in layer.parameters()) == count
    with torch.no_grad():
        layer.basis.formulas.fill_(NAMES.index("exp"))
        layer.basis.affine[:, 0] = 50.0
    assert torch.isfinite(layer(torch.full((1, 16), 1e6))).all()  # far outside any fitted range
    with pytest.raises(ValueError, match="no grid"):
        layer.extend_grid(10)


def test_a_trained_model_as_formulas_keeps_its_loss_loads_and_generates(trained, tmp_path):  # noqa: F811
    model, _, val = trained
    stats = collect_statistics(model, val[:32], samples=512)
    symbolic, fits = symbolic_model(model, stats)
    assert symbolic.config.kan_basis == "symbolic" and len(fits) == 2 * 2 * model.config.kan_groups
    # Each formula is the one fitted to the spline it replaced: it says its R² on the group's samples.
    for key, layer in kan_layers(model).items():
        for g in range(layer.groups):
            x = group_samples(layer, stats[key], g)
            spline, formula = _group_values(layer, g, x), _group_values(kan_layers(symbolic)[key], g, x)
            fit = next(f for f in fits if (f["block"], f["layer"], f["group"]) == (*key, g))
            r2 = 1 - (spline - formula).square().sum() / (spline - spline.mean()).square().sum()
            assert r2.item() == pytest.approx(fit["r2"], abs=1e-6)
    assert sum(f["r2"] > 0.9 for f in fits) >= 0.75 * len(fits)
    # Everything but the functions is the model's own.
    same = [n for n, _ in model.named_parameters() if ".basis." not in n]
    assert all(torch.equal(model.get_parameter(n), symbolic.get_parameter(n)) for n in same)
    loss, symbolic_loss = validation_loss(model, val[32:]), validation_loss(symbolic, val[32:])
    assert abs(symbolic_loss - loss) < 0.05 * loss and symbolic_loss < math.log(model.config.vocab_size) - 0.5
    symbolic.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(val[:4]).logits, symbolic(val[:4]).logits, rtol=0, atol=0)
    assert reloaded.generate(val[:1, :8], max_new_tokens=5, do_sample=False).shape == (1, 13)


def test_a_per_edge_model_has_no_group_functions_to_replace(trained):  # noqa: F811
    config = KANGPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=50, kan_sharing="edge")
    model = KANGPT2LMHeadModel(config).eval()
    stats = collect_statistics(model, torch.randint(0, 50, (4, 16)), samples=32)
    with pytest.raises(ValueError, match="has a function per edge"):
        symbolic_model(model, stats)
