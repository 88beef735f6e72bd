"""kangpt.interpret: importance against brute force, formulas of known edges, pruning, `kangpt inspect`.

The pruning and command tests share one tiny KAN-GPT-2 trained for a few dozen steps on 30 small
standard-library files (tokenizer trained in the test, in a temporary KANGPT_CACHE).
"""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kangpt import KANGPT2Config, KANGPT2LMHeadModel
from kangpt.commands import main
from kangpt.data import load_tokenizer, pack_documents, stdlib_documents
from kangpt.interpret import (
    auto_symbolic,
    collect_statistics,
    edge_importance,
    edge_moments,
    fit_symbolic,
    input_importance,
    layer_statistics,
    prune,
    validation_loss,
)
from kangpt.kan import KANLinear, KANSpec
from kangpt.kan_symbolic import NAMES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# nats/token that pruning 25% of the hidden units and 10% of the edges may cost the tiny trained model
# (measured: 0.010; removing the 25% MOST important units instead costs 0.21)
LOSS_TOLERANCE = 0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_symbolic_is_reexported():
    x = torch.linspace(-2, 2, 100)
    assert fit_symbolic(x, 3 * x**2 - 1)[0].name == "x^2"


# ---- importance -----------------------------------------------------------------------------


KINDS = [
    ("bspline", "edge"),
    ("rbf", "edge"),
    ("chebyshev", "edge"),
    ("bspline", "group"),
    ("rational", "group"),
]


@pytest.mark.parametrize("basis,sharing", KINDS)
def test_importance_matches_brute_force(basis, sharing):
    """Spreads and means from feature covariances equal those of every edge function evaluated on
    every token; a hidden unit's importance equals the measured change of the block output when the
    unit is removed (its mean folded into the bias)."""
    torch.manual_seed(0)
    kwargs = {"basis": basis, "groups": 2, "sharing": sharing}
    spec = KANSpec(**kwargs)  # one spec for the block, as KANFeedForward builds it
    first, second = KANLinear(6, 8, spec).double(), KANLinear(8, 5, spec).double()
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.normal_(std=0.5)
        second.coefficients()[:, 2] *= 0.1  # a clearly weak hidden unit
    x = 1.3 * torch.randn(3000, 6, dtype=torch.float64)
    h = first(x).detach()
    for layer, inputs in ((first, x), (second, h)):
        stats = layer_statistics(layer, inputs)
        phi = layer.edge_functions(inputs).detach()  # (P, out, in)
        spread, mean = edge_moments(layer, stats)
        torch.testing.assert_close(spread, phi.std(0, correction=0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mean, phi.mean(0), rtol=1e-9, atol=1e-12)
        y = layer(inputs).detach()
        torch.testing.assert_close(stats.output_var, y.var(0, correction=0), rtol=1e-9, atol=1e-12)
        scale = y.var(0, correction=0).sum().sqrt()
        torch.testing.assert_close(edge_importance(layer, stats), phi.std(0, correction=0) / scale)

    stats = layer_statistics(second, h)
    units = input_importance(second, stats)
    y = second(h).detach()
    for k in range(second.in_features):
        removed = KANLinear.from_settings(8, 5, **kwargs).double()
        removed.load_state_dict(second.state_dict())
        with torch.no_grad():
            removed.coefficients()[:, k] = 0
            removed.bias += second.edge_functions(h)[:, :, k].mean(0)
        change = (y - removed(h)).square().sum(1).mean().sqrt()
        assert units[k].item() == pytest.approx(
            (change / y.var(0, correction=0).sum().sqrt()).item(), rel=1e-9
        )
    assert units.argmin() == 2


# ---- symbolic formulas of edges ---------------------------------------------------------------


def _set_edge(layer, i, j, fn, scale=1.0):
    """Least-squares fit of the edge i -> j's spline coefficients to fn over the grid range."""
    x = torch.linspace(*layer.grid_range, 400, dtype=torch.float64)
    basis = layer.basis.functions(x.unsqueeze(-1))[..., 0]  # (P, K)
    coef = torch.linalg.lstsq(basis, fn(x).unsqueeze(-1)).solution.squeeze(-1)
    with torch.no_grad():
        w = layer.coefficients()
        w[j, i, 0] = 0  # no SiLU part
        w[j, i, 1:] = scale * coef


@pytest.mark.parametrize("basis", ["bspline", "rbf", "chebyshev"])
def test_auto_symbolic_names_edges_fitted_to_known_functions(basis, tmp_path):
    torch.manual_seed(0)
    layer = KANLinear.from_settings(4, 3, basis=basis, grid_size=8).double()
    with torch.no_grad():
        layer.weight.normal_(std=0.01)  # every other edge is small
    _set_edge(layer, 1, 2, lambda x: 1.5 * torch.sin(1.7 * x + 0.3))
    _set_edge(layer, 3, 0, lambda x: (x - 0.5) ** 2)
    x = torch.rand(1500, 4, dtype=torch.float64) * 4 - 2
    report = auto_symbolic(layer, x, top_k=3, out_dir=tmp_path)
    found = {(e["input"], e["output"]): e["best"] for e in report[:2]}
    assert set(found) == {(1, 2), (3, 0)}
    sin, square = found[1, 2], found[3, 0]
    assert sin["name"] == "sin" and sin["r2"] >= 0.99
    assert sin["a"] == pytest.approx(1.7, abs=0.05) and abs(sin["c"]) == pytest.approx(1.5, abs=0.05)
    assert square["name"] == "x^2" and square["r2"] >= 0.99
    assert square["b"] == pytest.approx(-0.5, abs=0.05) and "x_3" in square["formula"]
    saved = json.loads((tmp_path / "symbolic.json").read_text())
    assert [(e["input"], e["output"]) for e in saved["edges"]] == [(e["input"], e["output"]) for e in report]
    assert "sin" in (tmp_path / "symbolic.md").read_text()


@pytest.mark.parametrize("basis", ["rational", "bspline"])
def test_auto_symbolic_fits_group_functions(basis):
    torch.manual_seed(0)
    layer = KANLinear.from_settings(4, 3, basis=basis, groups=2, sharing="group", grid_size=8).double()
    with torch.no_grad():
        if basis == "rational":
            layer.basis.numerator.zero_()
            layer.basis.denominator.zero_()
            layer.basis.numerator[0, 2] = 1.0  # R_0(x) = x^2 (inputs 0, 1)
            layer.basis.numerator[1, 3] = 1.0  # R_1(x) = x^3 (inputs 2, 3)
        else:  # least-squares spline fits of the same functions over the grid range
            x = torch.linspace(-2, 2, 400, dtype=torch.float64)
            feats = layer.basis.terms(x)  # (P, 2 + K)
            targets = torch.stack([x**2, x**3], 1)
            layer.basis.coefficients.copy_(torch.linalg.lstsq(feats, targets).solution.t())
        layer.weight.normal_(std=0.01)
        layer.weight.view(3, 4)[1, 0] = 2.0  # edge 0 -> 1: 2 x^2
        layer.weight.view(3, 4)[2, 3] = -0.7  # edge 3 -> 2: -0.7 x^3
    report = auto_symbolic(layer, torch.rand(1000, 4, dtype=torch.float64) * 4 - 2, top_k=2)
    first, second = report
    assert (first["input"], first["output"], first["group"]) == (0, 1, 0)
    assert first["best"]["name"] == "x^2" and first["best"]["r2"] >= 0.99
    assert first["best"]["weight"] * first["best"]["c"] == pytest.approx(2.0, rel=1e-3)
    assert (second["input"], second["output"], second["group"]) == (3, 2, 1)
    assert second["best"]["name"] == "x^3" and second["best"]["r2"] >= 0.99


# ---- a tiny trained model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny KAN-GPT-2 trained for 100 steps, saved with its tokenizer; and validation blocks."""
    folder = tmp_path_factory.mktemp("model")
    docs = [doc for doc in stdlib_documents() if len(doc) < 20_000][:30]
    tokenizer = load_tokenizer("bpe", docs, vocab_size=400, cache_dir=str(tmp_path_factory.mktemp("cache")))
    blocks = torch.tensor(pack_documents(docs, tokenizer, 32)["input_ids"])
    train, val = blocks[64:], blocks[:64]
    config = KANGPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=32,
        vocab_size=len(tokenizer),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = KANGPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    order = torch.randperm(len(train))
    for step in range(100):
        ids = train[order[(step * 16 + torch.arange(16)) % len(train)]]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder, val


def test_pruning_a_trained_model(trained, tmp_path):
    model, _, val = trained
    stats = collect_statistics(model, val[:32], samples=256)
    loss = validation_loss(model, val[32:])
    assert loss < math.log(model.config.vocab_size) - 0.5  # it did learn something

    same, report = prune(model, stats)  # nothing removed: exactly the same function
    torch.testing.assert_close(same(val[:4]).logits, model(val[:4]).logits, rtol=0, atol=0)
    assert report["parameters"]["after"] == report["parameters"]["before"]

    pruned, report = prune(model, stats, hidden_fraction=0.25, edge_fraction=0.1)
    widths = [model.config.kan_hidden_size_of_layer(b) for b in range(2)]
    assert pruned.config.kan_hidden_size == [w - w // 4 for w in widths]
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert report["nonzero_kan_parameters"]["after"] < report["kan_parameters"]["after"]
    assert report["zeroed_edges"] > 0
    kan_layers = [m for m in pruned.modules() if isinstance(m, KANLinear)]
    zero_edges = sum(int((layer.coefficients() == 0).all(-1).sum()) for layer in kan_layers)
    assert zero_edges == report["zeroed_edges"]  # whole edges (every coefficient) are zeroed
    assert validation_loss(pruned, val[32:]) <= loss + LOSS_TOLERANCE

    # Removed units are replaced by their means: on the sample tokens, block 0's feed-forward output
    # (whose input no pruning touches) keeps its mean exactly.
    inputs = []
    hook = model.transformer.h[0].mlp.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    model(val[:32])
    hook.remove()
    hidden_only, _ = prune(model, stats, hidden_fraction=0.25)
    x = torch.cat(inputs).double()
    means = [copy.deepcopy(m.transformer.h[0].mlp).double()(x).mean((0, 1)) for m in (model, hidden_only)]
    torch.testing.assert_close(means[1], means[0], rtol=0, atol=1e-6)

    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.kan_hidden_size == pruned.config.kan_hidden_size
    torch.testing.assert_close(reloaded(val[:4]).logits, pruned(val[:4]).logits, rtol=0, atol=0)


@pytest.mark.parametrize("basis,sharing", [("rational", "group"), ("bspline", "group")])
def test_global_pruning_and_groups(basis, sharing):
    torch.manual_seed(0)
    config = KANGPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        n_positions=16,
        vocab_size=50,
        kan_basis=basis,
        kan_sharing=sharing,
        kan_groups=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = KANGPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.h[1].mlp.layers[1].weight.mul_(0.01)  # block 1's units matter far less
    ids = torch.randint(0, 50, (8, 16))
    stats = collect_statistics(model, ids, samples=64)
    pruned, report = prune(model, stats, hidden_fraction=0.4, scope="global")
    before, after = report["hidden_sizes"]["before"], report["hidden_sizes"]["after"]
    assert after[1] < after[0] <= before[0]  # the weak block lost more units
    assert all(w % 4 == 0 and w > 0 for w in after)
    assert pruned(ids).logits.shape == model(ids).logits.shape


# ---- kangpt inspect -------------------------------------------------------------------------


def test_inspect_command(trained, tmp_path, capsys):
    _, folder, _ = trained
    out = tmp_path / "inspect"
    args = ["inspect", str(folder), "--out", str(out), "--block", "1", "--layer", "1", "--top-k", "3"]
    small = ["--tokens", "512", "--eval-tokens", "512", "--samples", "512"]
    assert main([*args, *small, "--prune-hidden", "0.25", "--symbolic"]) == 0
    for name in ("edges.png", "importance.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    importance = json.loads((out / "importance.json").read_text())
    layer = next(x for x in importance["layers"] if (x["block"], x["layer"]) == (1, 1))
    symbolic = json.loads((out / "symbolic.json").read_text())
    top = [(e["input"], e["output"]) for e in layer["top_edges"][:3]]
    assert [(e["input"], e["output"]) for e in symbolic["edges"]] == top
    assert all(e["best"]["formula"] and 0 <= e["best"]["r2"] <= 1 for e in symbolic["edges"])
    assert "| 1 |" in (out / "symbolic.md").read_text()
    assert sorted(importance["hidden_units"]) == ["0", "1"]
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["parameters"]["after"] < pruning["parameters"]["before"]
    assert set(pruning["validation_loss"]) == {"before", "after", "tokens"}
    reloaded = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert reloaded.config.kan_hidden_size == pruning["hidden_sizes"]["after"]
    # --symbolic: every group function of the model as its formula, a model folder (test_symbolic_model)
    report = json.loads((out / "symbolic-model.json").read_text())
    assert set(report["validation_loss"]) == {"before", "after", "tokens"} and len(report["groups"]) == 32
    assert all(g["name"] in NAMES and g["formula"] for g in report["groups"])
    assert AutoModelForCausalLM.from_pretrained(out / "symbolic-model").config.kan_basis == "symbolic"
    assert "symbolic model: 32 group functions as formulas" in capsys.readouterr().out

    assert main([*args, *small]) == 1  # the folder is not empty
    assert main(["inspect", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert main(["inspect", str(folder), "--out", str(tmp_path / "x"), "--block", "7"]) == 1
    assert main(["inspect", str(folder), "--out", str(tmp_path / "x"), "--prune-hidden", "1.5"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    assert not (tmp_path / "x").exists()

    text = tmp_path / "sample.txt"
    text.write_text("\n".join(stdlib_documents()[40:45]))
    assert main([*args, *small, "--overwrite", "--text", str(text), "--top-k", "2"]) == 0
    assert len(json.loads((out / "symbolic.json").read_text())["edges"]) == 2
    assert not (out / "pruning.json").exists()  # replaced, not merged
