"""KAN-GPT-2 as a transformers causal LM, checked against transformers' own GPT-2."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    pipeline,
)

from kangpt import KANGPT2Config, KANGPT2LMHeadModel, KANGPT2Model
from kangpt.data import load_tokenizer
from kangpt.kan import BASES, KANLinear

TINY = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1)


def tiny_config(**overrides) -> KANGPT2Config:
    return KANGPT2Config(**{**TINY, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides})


def tiny_model(**overrides) -> KANGPT2LMHeadModel:
    torch.manual_seed(0)
    model = KANGPT2LMHeadModel(tiny_config(**overrides)).eval()
    with torch.no_grad():  # make the spline parts matter, so that basis mix-ups show
        for m in model.modules():
            if isinstance(m, KANLinear):
                m.weight.normal_(std=0.3)
    return model


def random_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(**TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def input_ids(batch=2, length=11, seed=1):
    return torch.randint(
        2, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


# ---- config ---------------------------------------------------------------------------------


def test_default_config_is_gpt2_small_shape_with_matched_kan():
    config = KANGPT2Config()
    gpt2 = GPT2Config()
    for name in (
        "vocab_size",
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "activation_function",
        "layer_norm_epsilon",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    ):
        assert getattr(config, name) == getattr(gpt2, name), name
    assert config.attribute_map == gpt2.attribute_map
    assert config.hidden_size == 768 and config.num_hidden_layers == 12
    assert config.ffn_type == "kan" and isinstance(config.kan_hidden_size, int) and config.kan_hidden_size > 0


@pytest.mark.parametrize(
    "field,value",
    [
        ("ffn_type", "moe"),
        ("kan_basis", "fourier"),
        ("kan_grid_size", 0),
        ("n_layer", 0),
        ("kan_spline_order", -1),
        ("kan_grid_range", [1.0, -1.0]),
        ("kan_hidden_size", -3),
        ("attn_pdrop", 1.5),
        ("kan_dropout", 1.0),
    ],
)
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        KANGPT2Config(**{field: value})


def test_heads_that_do_not_divide_the_width_are_refused_by_the_attention_as_in_gpt2():
    config = tiny_config(n_head=5)  # GPT2Config accepts it too: GPT2Attention refuses it
    message = r"KANGPT2Config.n_head must divide n_embd=32, got 5"
    with pytest.raises(ValueError, match=message):
        KANGPT2LMHeadModel(config)
    with pytest.raises(ValueError, match=message):  # what a run config asks before building a model
        config.check_widths()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kan_groups": 3}, r"KANGPT2Config.kan_groups must divide n_embd=32, got 3"),
        ({"kan_hidden_size": 36}, r"KANGPT2Config.kan_groups must divide kan_hidden_size=36, got 8"),
    ],
)
def test_kan_widths_the_groups_do_not_divide_are_refused_by_the_block(overrides, message):
    config = tiny_config(kan_hidden_size=64)
    first, second = KANGPT2LMHeadModel(config).transformer.h[0].mlp.layers
    assert first.spec is second.spec  # one spec per block, built and checked once
    for field, value in overrides.items():  # set one at a time, as the config allows: the block refuses
        setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        KANGPT2LMHeadModel(config)


def test_parameter_counts_at_gpt2_small_on_meta_device():
    with torch.device("meta"):
        mlp = KANGPT2LMHeadModel(KANGPT2Config(ffn_type="mlp"))
        kan = KANGPT2LMHeadModel(KANGPT2Config())
        gpt2 = GPT2LMHeadModel(GPT2Config())
    n_mlp = sum(p.numel() for p in mlp.parameters())
    assert n_mlp == 124_439_808 == sum(p.numel() for p in gpt2.parameters())
    n_kan = sum(p.numel() for p in kan.parameters())
    assert abs(n_kan - n_mlp) / n_mlp < 0.01


# ---- parity with transformers' GPT-2 --------------------------------------------------------


def test_mlp_variant_from_gpt2_matches_transformers_gpt2():
    gpt2 = random_gpt2()
    model = KANGPT2LMHeadModel.from_gpt2(gpt2, ffn_type="mlp").eval()
    ids = input_ids()
    torch.testing.assert_close(model(ids).logits, gpt2(ids).logits, atol=1e-5, rtol=0)
    mask = torch.ones_like(ids)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    theirs = gpt2.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_from_gpt2_copies_everything_but_the_kan_blocks():
    gpt2 = random_gpt2()
    model = KANGPT2LMHeadModel.from_gpt2(gpt2)
    ours, theirs = model.state_dict(), gpt2.state_dict()
    shared = [k for k in theirs if ".mlp." not in k]
    assert all(torch.equal(ours[k], theirs[k]) for k in shared)
    assert any(isinstance(m, KANLinear) for m in model.modules())
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()  # still tied


def test_from_gpt2_loads_a_local_folder(tmp_path):
    gpt2 = random_gpt2()
    gpt2.save_pretrained(tmp_path)
    model = KANGPT2LMHeadModel.from_gpt2(str(tmp_path), ffn_type="mlp").eval()
    ids = input_ids()
    torch.testing.assert_close(model(ids).logits, gpt2(ids).logits, atol=1e-5, rtol=0)


def test_labels_are_shifted_inside():
    model = tiny_model()
    ids = input_ids()
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, TINY["vocab_size"]), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, manual)


def test_kan_dropout_drops_hidden_units_while_training_only():
    block = tiny_model(kan_dropout=0.5).transformer.h[0].mlp
    first, second = block.layers
    x = torch.randn(2, 5, block.layers[0].in_features)
    block.eval()
    torch.testing.assert_close(block(x), second(first(x)))
    block.train()
    torch.manual_seed(3)
    dropped = block(x)
    torch.manual_seed(3)  # the same draw: the mask on the hidden units, scaled by 1 / (1 - p)
    torch.testing.assert_close(dropped, second(torch.nn.functional.dropout(first(x), 0.5, training=True)))
    assert not torch.allclose(dropped, second(first(x)))


# ---- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_save_and_load_identical_logits_for_every_basis(basis, tmp_path):
    model = tiny_model(kan_basis=basis, kan_groups=4)
    model.save_pretrained(tmp_path)
    ids = input_ids()
    expected = model(ids).logits
    for loaded in (
        KANGPT2LMHeadModel.from_pretrained(tmp_path),
        AutoModelForCausalLM.from_pretrained(tmp_path),
    ):
        assert type(loaded) is KANGPT2LMHeadModel
        torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=0, rtol=0)
        assert loaded.transformer.wte.weight.data_ptr() == loaded.lm_head.weight.data_ptr()
    assert type(AutoModel.from_pretrained(tmp_path)) is KANGPT2Model
    assert type(AutoConfig.from_pretrained(tmp_path)) is KANGPT2Config


def test_meta_device_materialisation_leaves_nothing_uninitialised(tmp_path):
    model = tiny_model(kan_basis="rational", kan_groups=4)
    model.save_pretrained(tmp_path)
    loaded = KANGPT2LMHeadModel.from_pretrained(tmp_path, device_map="cpu").eval()
    fresh_state = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.device.type == "cpu", name
        assert torch.equal(tensor, fresh_state[name]), name
    # A model built on the meta device and initialised there gets real values once materialised.
    with torch.device("meta"):
        meta = KANGPT2LMHeadModel(tiny_config(kan_basis="rational", kan_groups=4))
    meta.to_empty(device="cpu")
    meta.init_weights()
    numerators = [m.basis.numerator for m in meta.modules() if isinstance(m, KANLinear)]
    reference = [m.basis.numerator for m in model.modules() if isinstance(m, KANLinear)]
    for got, want in zip(numerators, reference, strict=True):
        torch.testing.assert_close(got, want)
    assert all(torch.isfinite(p).all() for p in meta.parameters())


def test_trust_remote_code_without_kangpt_installed(tmp_path):
    model = tiny_model(kan_basis="chebyshev")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ids = input_ids()
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    hidden = model.transformer(ids).last_hidden_state
    torch.save({"ids": ids, "expected": expected, "hidden": hidden}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["kangpt"] = None  # any import of the installed package fails
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        torch.set_num_threads({torch.get_num_threads()})  # the same reductions as here: bit-equal results
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "kangpt" not in type(model).__module__.split(".")[0], type(model).__module__
        data = torch.load({str(tmp_path / "expected.pt")!r})
        ids = data["ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert torch.equal(out, data["expected"]), (out, data["expected"])
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(base).__name__ == "KANGPT2Model", type(base)
        torch.testing.assert_close(base(ids).last_hidden_state, data["hidden"], atol=0, rtol=0)
        print("remote-code-ok", type(model).__module__)
    """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code-ok" in result.stdout


# ---- inputs the model cannot take -----------------------------------------------------------


def _prefix_cache(model, length):
    return model(input_ids(1, length), use_cache=True).cache


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: m(input_ids(1, 65)),
            "the input has 65 tokens, more than the model's context n_positions=64",
        ),
        (
            lambda m: m(input_ids(1, 5), cache=_prefix_cache(m, 60), use_cache=True),
            "the input has 65 tokens (60 cached + 5 new), more than the model's context n_positions=64",
        ),
        (lambda m: m(torch.tensor([[3, 97]])), "input_ids must be in [0, vocab_size=97)"),
        (lambda m: m(torch.tensor([[-1, 3]])), "input_ids must be in [0, vocab_size=97)"),
        (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), "the input holds no tokens (sequence length 0)"),
        (
            lambda m: m(torch.zeros(1, 0, dtype=torch.long), position_ids=torch.zeros(1, 0).long()),
            "the input holds no tokens (sequence length 0)",
        ),
        (
            lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3),
            "the prompt holds no tokens; start from one, e.g. the BOS token",
        ),
        (
            lambda m: m(input_ids(1, 2), position_ids=torch.tensor([[0, 64]])),
            "position_ids must be in [0, n_positions=64)",
        ),
        (
            lambda m: m.generate(input_ids(1, 64), max_new_tokens=1, do_sample=False),
            "the prompt has 64 tokens and the model's context is n_positions=64: no room to generate; "
            "shorten the prompt",
        ),
    ],
)
def test_inputs_the_model_cannot_take_are_value_errors_naming_the_limit(call, message):
    """GPT-2 dies with an IndexError inside an embedding; KAN-GPT-2 says which limit was passed."""
    with pytest.raises(ValueError) as err:
        call(tiny_model())
    assert str(err.value) == message


def test_generation_fills_the_context_exactly():
    model = tiny_model()
    ids = input_ids(2, 10)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=54, min_new_tokens=54,
                         do_sample=False)
    assert out.shape == (2, 64)


def test_generation_asked_to_run_past_the_context_stops_at_it_and_says_so(caplog):
    model = tiny_model()
    ids = input_ids(1, 10)
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=500, min_new_tokens=500, do_sample=False)
    assert out.shape == (1, 64)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=54, min_new_tokens=54, do_sample=False)
    assert torch.equal(out, expected)
    assert ("generation stops at the model's context (n_positions=64): 54 new tokens fit after the "
            "10-token prompt, 500 were asked for") in caplog.text


# ---- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_generate_with_cache_equals_without(basis):
    model = tiny_model(kan_basis=basis, kan_groups=4)
    ids = input_ids()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_cached_step_logits_equal_full_forward():
    model = tiny_model()
    ids = input_ids(length=12)
    full = model(ids).logits
    prefix = model(ids[:, :8], use_cache=True)
    step = model(ids[:, 8:], cache=prefix.cache, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, 8:], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model(pad_token_id=0)
    rows = [input_ids(1, 9, seed=3)[0], input_ids(1, 5, seed=4)[0]]
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, r in enumerate(rows):
        alone = model.generate(
            r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), max_new_tokens=6, do_sample=False
        )
        assert torch.equal(together[i, width:], alone[0, len(r) :])


def test_sdpa_equals_eager_attention():
    ids = input_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # some padding, so the masks really differ
    outs = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = KANGPT2LMHeadModel(tiny_config(attn_implementation=impl)).eval()
        assert model.config._attn_implementation == impl
        outs[impl] = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(outs["sdpa"][mask.bool()], outs["eager"][mask.bool()], atol=1e-5, rtol=1e-5)


def test_beam_search_and_sampling_run():
    model = tiny_model()
    ids = input_ids()
    mask = torch.ones_like(ids)
    beams = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False
    )
    assert beams.shape == (4, ids.shape[1] + 6)
    torch.manual_seed(0)
    sampled = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8
    )
    assert sampled.shape == (2, ids.shape[1] + 6)
    assert torch.equal(sampled[:, : ids.shape[1]], ids)


def test_text_generation_pipeline_from_saved_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KANGPT_CACHE", str(tmp_path / "cache"))
    texts = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n"] * 20
    tokenizer = load_tokenizer("bpe", texts, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    model = KANGPT2LMHeadModel(
        tiny_config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    generator = pipeline("text-generation", model=str(tmp_path / "model"), device="cpu")
    out = generator("def add(", max_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("def add(")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = reloaded("def add(", return_tensors="pt").input_ids
    expected = model.eval().generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False
    )
    assert text == reloaded.decode(expected[0], skip_special_tokens=True)


# ---- training-side behaviour ----------------------------------------------------------------


@pytest.mark.parametrize("ffn_type", ["kan", "mlp"])
def test_gradient_checkpointing_gives_the_same_gradients(ffn_type):
    ids = input_ids()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(ffn_type=ffn_type).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_resize_token_embeddings():
    model = tiny_model()
    ids = input_ids()
    before = model(ids).logits
    model.resize_token_embeddings(TINY["vocab_size"] + 11)
    assert model.config.vocab_size == TINY["vocab_size"] + 11
    assert model.lm_head.weight.shape[0] == TINY["vocab_size"] + 11
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    after = model(ids).logits
    torch.testing.assert_close(after[..., : TINY["vocab_size"]], before)
    new_ids = torch.full((1, 3), TINY["vocab_size"] + 10)
    assert torch.isfinite(model(new_ids).logits).all()


@pytest.mark.parametrize("basis", BASES)
def test_bf16_forward_and_backward_stay_finite(basis):
    model = tiny_model(kan_basis=basis, kan_groups=4).to(torch.bfloat16).train()
    ids = input_ids()
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    fp32 = tiny_model(kan_basis=basis, kan_groups=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fp32(ids, labels=ids).loss
    mixed.backward()
    assert torch.isfinite(mixed) and all(torch.isfinite(p.grad).all() for p in fp32.parameters())


def test_a_field_of_the_wrong_type_is_refused_by_the_strict_dataclass():
    """KANGPT2Config is a huggingface_hub strict dataclass, as GPT2Config: types are checked on set."""
    with pytest.raises(StrictDataclassFieldValidationError, match="n_layer"):
        KANGPT2Config(n_layer="12")
    config = KANGPT2Config(kan_grid_range=[-6, 6])  # ints where floats are expected: YAML writes them so
    assert config.kan_grid_range == [-6.0, 6.0]
    with pytest.raises(StrictDataclassFieldValidationError, match="kan_basis"):
        config.kan_basis = 3
