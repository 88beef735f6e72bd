"""LoRA with PEFT on KAN-GPT-2: on attention and on the KAN layers, trained, saved, reloaded, merged."""

import copy

import pytest
import torch

from kangpt import KANGPT2Config, KANGPT2LMHeadModel
from kangpt.kan import KANLinear

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from kangpt.finetuning.lora import KANLinearLoRA, register_kan_lora  # noqa: E402

KAN_LAYERS = ["mlp.layers.0", "mlp.layers.1"]


def base_model() -> KANGPT2LMHeadModel:
    torch.manual_seed(0)
    config = KANGPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                           eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return KANGPT2LMHeadModel(config)


def batch() -> torch.Tensor:
    return torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(1))


def train(model, steps=20, lr=5e-2) -> list[float]:
    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def kan_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(tuple(KAN_LAYERS)) and "lora" not in n}


def test_lora_on_attention_and_kan_layers_trains_saves_reloads_and_merges(tmp_path):
    base = base_model()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = register_kan_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", *KAN_LAYERS]))
    model = get_peft_model(base, config)
    wrapped = kan_layers(model)
    assert len(wrapped) == 4 and all(isinstance(m, KANLinearLoRA) for m in wrapped.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".mlp.layers." in n for n in trainable)

    losses = train(model)
    assert losses[-1] < losses[0] - 0.3, losses
    for name, param in model.base_model.model.named_parameters():  # the base model did not move
        original = name.replace(".base_layer", "")
        if original in frozen:
            assert torch.equal(param, frozen[original]), name
    moved = [m.lora_B["default"].weight for m in wrapped.values()]
    assert all(b.abs().sum() > 0 for b in moved)  # B starts at zero: the KAN layers' adapters trained

    model.eval()
    ids = batch()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(
        base_model(), tmp_path / "adapter",
        config=register_kan_lora(LoraConfig.from_pretrained(tmp_path / "adapter")),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)

    layer = kan_layers(reloaded)["base_model.model.transformer.h.0.mlp.layers.0"]
    scale = layer.scaling["default"]
    w = layer.base_layer.weight.detach() + scale * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    ).detach()  # the update by hand: W + (alpha / r) B A
    merged = reloaded.merge_and_unload()
    merged_layer = merged.transformer.h[0].mlp.layers[0]
    assert type(merged_layer) is KANLinear
    torch.testing.assert_close(merged_layer.weight, w, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)


def test_the_kan_layers_lora_is_the_layer_with_its_weight_updated_by_b_times_a():
    model = get_peft_model(base_model(), register_kan_lora(LoraConfig(r=3, target_modules=KAN_LAYERS[:1])))
    lora = kan_layers(model)["base_model.model.transformer.h.1.mlp.layers.0"]
    with torch.no_grad():
        lora.lora_A["default"].weight.normal_()
        lora.lora_B["default"].weight.normal_(std=0.1)
    reference = copy.deepcopy(lora.base_layer)  # the same functions and bias
    with torch.no_grad():
        delta = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        reference.weight.add_(delta)
    x = torch.randn(5, 32)
    torch.testing.assert_close(lora(x), reference(x), atol=1e-5, rtol=1e-5)


def test_lora_on_the_kan_weight_by_target_parameters_trains():
    """PEFT's own way (a parametrized weight): the KAN layer must take its autograd path for it."""
    model = get_peft_model(base_model(), LoraConfig(r=4, target_parameters=["mlp.layers.0.weight"]))
    losses = train(model)
    assert losses[-1] < losses[0] - 0.15, losses  # only two layers adapt: a slower fall


def test_lora_dropout_does_not_act_on_kan_layers_and_says_so():
    with pytest.warns(UserWarning, match="lora_dropout=0.1 does not act on KAN layers"):
        model = get_peft_model(
            base_model(),
            register_kan_lora(LoraConfig(r=2, lora_dropout=0.1, target_modules=["c_attn", *KAN_LAYERS])),
        )
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in kan_layers(model).values())
    attention = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(attention.lora_dropout["default"], torch.nn.Dropout)


def test_without_the_registration_peft_refuses_kan_layers():
    with pytest.raises(ValueError, match=r"(?s)Target module KANLinear\(.*\) is not supported"):
        get_peft_model(base_model(), LoraConfig(r=2, target_modules=KAN_LAYERS))
