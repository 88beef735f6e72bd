"""Int8 weight-only quantisation (torchao) covers the KAN layers, not only nn.Linear."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kangpt import KANGPT2Config, KANGPT2LMHeadModel
from kangpt.kan import KANLinear

pytest.importorskip("torchao")
from kangpt.finetuning.quantization import quantize_int8, tensor_bytes  # noqa: E402


def tiny_model() -> KANGPT2LMHeadModel:
    torch.manual_seed(0)
    config = KANGPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                           eos_token_id=0)
    model = KANGPT2LMHeadModel(config).eval()
    with torch.no_grad():  # spline parts large enough that a wrong weight shows in the logits
        for m in model.modules():
            if isinstance(m, KANLinear):
                m.weight.normal_(std=0.3)
    return model


def kan_layers(model):
    return [m for m in model.modules() if isinstance(m, KANLinear)]


def test_every_kan_layer_weight_becomes_int8_with_one_scale_per_row():
    model = tiny_model()
    originals = [layer.weight.detach().clone() for layer in kan_layers(model)]
    quantize_int8(model)
    for layer, w in zip(kan_layers(model), originals, strict=True):
        q = layer.weight
        assert q.qdata.dtype == torch.int8 and q.qdata.shape == w.shape and q.scale.shape == (w.shape[0], 1)
        step = w.abs().amax(dim=1, keepdim=True) / 127  # per-row symmetric int8: error below one step
        assert ((q.qdata.float() * q.scale - w).abs() <= step).all()
    # the tied LM head and the attention stay as they were
    assert model.lm_head.weight is model.transformer.wte.weight
    assert type(model.transformer.h[0].attn.c_attn.weight) is torch.nn.Parameter


def test_quantised_layers_compute_with_their_int8_weights():
    """The quantised model equals a float model holding the dequantised weights, and differs from the
    original by the rounding only."""
    model, reference = tiny_model(), tiny_model()
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = model(ids).logits
    quantize_int8(model)
    with torch.no_grad():
        for q, r in zip(kan_layers(model), kan_layers(reference), strict=True):
            r.weight.copy_(q.weight.qdata.float() * q.weight.scale)
        quantised, dequantised = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(quantised, dequantised, atol=1e-4, rtol=1e-4)
    assert (quantised - original).abs().max() > 1e-3  # the int8 weights are really used
    assert (quantised - original).abs().max() < 0.05 * original.abs().max()


def test_feed_forward_bytes_shrink_about_fourfold_and_generation_runs():
    model = tiny_model()
    ff_params = sum(layer.weight.numel() for layer in kan_layers(model))
    before = tensor_bytes(model)
    quantize_int8(model)
    after = tensor_bytes(model)
    rows = sum(layer.weight.shape[0] for layer in kan_layers(model))
    # fp32 -> int8 values, plus per row an fp32 scale and an int8 zero point
    assert before - after == ff_params * 4 - ff_params - rows * (4 + 1)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_eval_script_reports_size_and_held_out_loss_of_both(tmp_path):
    from kangpt.data import load_documents, load_tokenizer, pack_documents

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 30)
    train_docs, val_docs = load_documents(str(corpus), val_fraction=0.1)
    tokenizer = load_tokenizer("bpe", train_docs, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    model = tiny_model()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    script = Path(__file__).resolve().parent.parent / "eval" / "quantize.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), "--dataset", str(corpus),
         "--val-fraction", "0.1", "--repeats", "1", "--json", str(tmp_path / "q.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "q.json").read_text())
    blocks = torch.tensor(pack_documents(val_docs, tokenizer, 32)["input_ids"])
    assert figures["tokens"] == blocks.numel()
    with torch.no_grad():  # the held-out loss, computed here independently
        logits = model.eval()(blocks).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), blocks[:, 1:]).item()
    assert figures["fp32"]["held_out_loss"] == pytest.approx(expected, abs=1e-5)
    assert abs(figures["int8"]["held_out_loss"] - expected) < 0.05
    assert figures["fp32"]["bytes"] == tensor_bytes(model)
    # each KAN weight: 1 byte per value instead of 4, plus a float32 scale and an int8 zero point per row
    saved = sum(layer.weight.numel() * 3 - layer.weight.shape[0] * 5 for layer in kan_layers(model))
    assert figures["int8"]["feed_forward_bytes"] == figures["fp32"]["feed_forward_bytes"] - saved
    assert "| int8 |" in result.stdout
