"""KAN-GPT-2: GPT-2 whose MLP feed-forward blocks are Kolmogorov-Arnold Network blocks.

The forward pass reads top to bottom: attention, the feed-forward block (KAN or GPT-2's MLP), the
transformer block, the base model, the language-model head. Everything except the feed-forward
block is GPT-2 as written in ``transformers/models/gpt2/modeling_gpt2.py`` (same parameter names and
shapes, so GPT-2 checkpoints map onto it; see :meth:`KANGPT2LMHeadModel.from_gpt2`).
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.pytorch_utils import Conv1D
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_kangpt import KANGPT2Config
from .kan import KANFeedForward, KANLinear
from .kan_bases import GroupedBasis, RationalBasis

logger = logging.get_logger(__name__)

# Every Auto class a saved folder loads with through its own code (``trust_remote_code=True``),
# whichever of the two models saved it.
REMOTE_CODE_AUTO_MAP = {
    "AutoModel": "modeling_kangpt.KANGPT2Model",
    "AutoModelForCausalLM": "modeling_kangpt.KANGPT2LMHeadModel",
}


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention. query: (B, H, Tq, D), key/value: (B, H, Tk, D) -> (B, Tq, H, D)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1).type(value.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)
    return attn_output, attn_weights


class KANGPT2Attention(nn.Module):
    """GPT-2's causal self-attention (fused ``c_attn`` projection, ``c_proj`` output)."""

    def __init__(self, config: KANGPT2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:  # checked here, as GPT2Attention does
            raise ValueError(
                f"KANGPT2Config.n_head must divide n_embd={self.embed_dim}, got {self.num_heads}"
            )
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.is_causal = True
        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, cache: Cache | None = None, attention_mask=None, **kwargs):
        """(B, T, C) -> ((B, T, C), attention weights or None)."""
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        shape = (*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))  # (B, H, T, D)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attn_dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()  # (B, T, C)
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


class KANGPT2MLP(nn.Module):
    """GPT-2's MLP, unchanged: ``c_fc`` -> activation -> ``c_proj`` -> dropout (``ffn_type="mlp"``)."""

    def __init__(self, config: KANGPT2Config, layer_idx: int):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class KANGPT2FeedForward(KANFeedForward):
    """The KAN feed-forward block (``ffn_type="kan"``), in GPT-2's MLP's place (the ``mlp`` of a
    block): ``n_embd -> h -> n_embd`` KAN layers (or one ``n_embd -> n_embd`` layer when the layer's
    ``kan_hidden_size`` is 0), then dropout (``kan_dropout`` on the hidden units, ``resid_pdrop`` on the
    output)."""

    def __init__(self, config: KANGPT2Config, layer_idx: int):
        # One spec for the block's layers. The widths are checked here too, as n_head is (a config's
        # fields may change one at a time), so that the message names the config's fields.
        super().__init__(
            config.n_embd,
            config.n_embd,
            config.kan_hidden_size_of_layer(layer_idx),
            output_gain=1 / math.sqrt(2 * config.n_layer),  # GPT-2's scaling of residual branches
            spec=config.kan_spec(config.kan_widths(layer_idx)),
            hidden_dropout=config.kan_dropout,
        )
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(super().forward(hidden_states))


class KANGPT2Block(GradientCheckpointingLayer):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: KANGPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = KANGPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        feed_forward = KANGPT2FeedForward if config.ffn_type == "kan" else KANGPT2MLP
        self.mlp = feed_forward(config, layer_idx)  # GPT-2's name, so that checkpoints keep their keys

    def forward(self, hidden_states, cache: Cache | None = None, attention_mask=None, **kwargs):
        """(B, T, C) -> (B, T, C)."""
        attn_output, _ = self.attn(
            self.ln_1(hidden_states), cache=cache, attention_mask=attention_mask, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class KANGPT2PreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by the KAN-GPT-2 models."""

    config: KANGPT2Config
    config_class = KANGPT2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["KANGPT2Block"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": KANGPT2Block,
        "attentions": OutputRecorder(KANGPT2Attention, index=1),
    }
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``; where the classes are registered for remote code
        (``import kangpt`` does it), the folder's ``auto_map`` names ``AutoModel`` and
        ``AutoModelForCausalLM`` both, so either loads it with ``trust_remote_code=True``."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        """GPT-2's initialisation; KAN layers start from their own near-SiLU-MLP initialisation."""
        super()._init_weights(module)
        residual_gain = 1 / math.sqrt(2 * self.config.n_layer)  # GPT-2: residual outputs scaled by 1/sqrt(N)
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
        if isinstance(module, (KANGPT2Attention, KANGPT2MLP)):
            init.normal_(module.c_proj.weight, mean=0.0, std=self.config.initializer_range * residual_gain)
        # KAN parameters are initialised where they live (custom-code models skip modules without
        # direct parameters): layers get their own near-SiLU-MLP init, the rational basis its SiLU fit.
        if isinstance(module, KANLinear):
            init.copy_(module.weight, module.initial_weight())
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, (RationalBasis, GroupedBasis)):
            for name, value in module.initial_parameters().items():
                init.copy_(getattr(module, name), value)


class KANGPT2Model(KANGPT2PreTrainedModel):
    """The bare KAN-GPT-2 transformer: token + position embeddings, blocks, final layer norm."""

    def __init__(self, config: KANGPT2Config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([KANGPT2Block(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """input_ids (B, T) or inputs_embeds (B, T, C) -> last_hidden_state (B, T, C) (+ cache)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if (input_ids if input_ids is not None else inputs_embeds).shape[1] == 0:
            raise ValueError("the input holds no tokens (sequence length 0)")
        if input_ids is not None:
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
            inputs_embeds = _embed(self.wte, input_ids, "input_ids", "vocab_size")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            self._check_length(past_seen_tokens, inputs_embeds.shape[1])
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            )
            position_ids = position_ids.unsqueeze(0)  # (1, T)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeds = _embed(self.wpe, position_ids, "position_ids", "n_positions")
        hidden_states = self.drop(inputs_embeds + position_embeds.to(inputs_embeds.device))  # (B, T, C)
        for block in self.h:
            # cache by keyword: gradient checkpointing drops it (the recompute must not update it twice)
            hidden_states = block(
                hidden_states, cache=cache, attention_mask=causal_mask, position_ids=position_ids, **kwargs
            )
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    def _check_length(self, past: int, new: int) -> None:
        """A clear error for positions the position embeddings do not have (shapes only, no sync)."""
        if torch.compiler.is_compiling():
            return
        if past + new > self.config.n_positions:
            cached = f" ({past} cached + {new} new)" if past else ""
            raise ValueError(
                f"the input has {past + new} tokens{cached}, more than the model's context "
                f"n_positions={self.config.n_positions}"
            )


def _embed(table: nn.Embedding, ids: torch.Tensor, name: str, size_field: str) -> torch.Tensor:
    """``table(ids)``, with an id outside the table a ValueError naming the config field instead of
    the embedding's bare IndexError. (Eager CPU lookups raise it; on CUDA a bad id is a device-side
    assert, and checking every id first would cost a sync per forward.)"""
    if torch.compiler.is_compiling():
        return table(ids)
    try:
        return table(ids)
    except IndexError as err:
        raise ValueError(f"{name} must be in [0, {size_field}={table.num_embeddings})") from err


class KANGPT2LMHeadModel(KANGPT2PreTrainedModel, GenerationMixin):
    """KAN-GPT-2 with a language-modelling head tied to the input embeddings.

    ``labels`` are shifted inside (pass ``labels=input_ids``); positions labelled -100 are ignored.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: KANGPT2Config):
        super().__init__(config)
        self.transformer = KANGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # the class name does not tell transformers which loss to use
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) and, with ``labels`` (B, T), the next-token cross-entropy."""
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _prepare_generated_length(self, generation_config, **kwargs):
        """transformers' generation lengths, fitted to the context: positions past ``n_positions`` have
        no embedding. A prompt that fills the context is a ValueError; generation that would run past
        it stops at it, with a warning (as transformers caps its own default length)."""
        generation_config = super()._prepare_generated_length(generation_config=generation_config, **kwargs)
        prompt, context = kwargs["input_ids_length"], self.config.n_positions
        if prompt == 0:
            raise ValueError("the prompt holds no tokens; start from one, e.g. the BOS token")
        if prompt >= context:
            raise ValueError(
                f"the prompt has {prompt} tokens and the model's context is n_positions={context}: "
                "no room to generate; shorten the prompt"
            )
        if generation_config.max_length > context:
            asked = generation_config.max_length - prompt
            logger.warning(
                f"generation stops at the model's context (n_positions={context}): {context - prompt} new "
                f"tokens fit after the {prompt}-token prompt, {asked} were asked for"
            )
            generation_config.max_length = context
        return generation_config

    @classmethod
    def from_gpt2(cls, gpt2, **config_overrides) -> "KANGPT2LMHeadModel":
        """Build a KAN-GPT-2 from a GPT-2 language model.

        ``gpt2`` is a ``transformers.GPT2LMHeadModel``, a local folder holding one, or a hub name
        (e.g. ``"openai-community/gpt2"``, when online). Embeddings, attention and layer norms are
        copied; GPT-2's MLP too when ``ffn_type="mlp"``. With ``ffn_type="kan"`` (the default) the
        KAN blocks are freshly initialised; :func:`kangpt.finetuning.convert_gpt2` converts them from
        GPT-2's MLPs instead, so that they already do what the MLPs did.
        ``config_overrides`` go to :class:`KANGPT2Config`: the KAN design, not GPT-2's shape.
        """
        from transformers import GPT2LMHeadModel

        if not isinstance(gpt2, GPT2LMHeadModel):
            gpt2 = GPT2LMHeadModel.from_pretrained(gpt2)
        model = cls(kangpt2_config_of(gpt2.config, **config_overrides))
        state = gpt2.state_dict()
        if model.config.ffn_type == "kan":
            state = {k: v for k, v in state.items() if ".mlp." not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"GPT-2 weights do not fit this config: missing {missing}, unexpected {unexpected}"
            )
        model.to(dtype=next(gpt2.parameters()).dtype)
        return model


def kangpt2_config_of(gpt2_config, **overrides) -> KANGPT2Config:
    """The config of a KAN-GPT-2 made from a GPT-2 with ``gpt2_config``: its shape and settings, with
    ``overrides`` (the KAN design). A ValueError names an override that changes GPT-2's shape."""
    shape = {name: getattr(gpt2_config, name) for name in GPT2_FIELDS}
    for name, value in overrides.items():
        if name in GPT2_SHAPE_FIELDS and value != shape[name]:
            raise ValueError(f"{name}={value!r} does not fit the GPT-2, whose {name} is {shape[name]!r}")
    return KANGPT2Config(**{**shape, **overrides})


# GPT-2's config fields a KAN-GPT-2 made from it takes over; the first ones fix the weights' shapes.
GPT2_SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
GPT2_FIELDS = (
    *GPT2_SHAPE_FIELDS,
    "activation_function",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "layer_norm_epsilon",
    "initializer_range",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)


__all__ = ["KANGPT2Block", "KANGPT2LMHeadModel", "KANGPT2Model", "KANGPT2PreTrainedModel"]
