"""LoRA on KAN layers with PEFT (``pip install 'kangpt[peft]'``).

A KAN layer is one matmul of its input's features against a 2-D weight ``W`` (out, F * in), so
LoRA there is a low-rank update of that coefficient matrix, ``W + (alpha / r) B A`` with ``A``
(r, F * in) and ``B`` (out, r): every edge function moves within a rank-r family. That is PEFT's
LoRA on a parameter (``ParamWrapper``, what ``LoraConfig(target_parameters=...)`` builds);
:func:`register_kan_lora` registers it for :class:`~kangpt.kan.KANLinear` through PEFT's
custom-module mapping, so that ``target_modules`` can name KAN layers beside attention layers::

    from peft import LoraConfig, PeftModel, get_peft_model
    from kangpt.finetuning.lora import register_kan_lora

    config = register_kan_lora(LoraConfig(r=8, target_modules=["c_attn", "mlp.layers.0", "mlp.layers.1"]))
    model = get_peft_model(model, config)
    ...
    model.save_pretrained("adapter")
    # the mapping is not saved with the adapter: register it again to load
    config = register_kan_lora(LoraConfig.from_pretrained("adapter"))
    model = PeftModel.from_pretrained(base, "adapter", config=config)

The update is added to the weight, so there is no input to drop: ``lora_dropout`` (which the
attention layers of the same config use) does not act on KAN layers, with a warning saying so;
``lora_bias`` and DoRA are not available there (PEFT refuses them for ``ParamWrapper``).
"""

from __future__ import annotations

import copy
import warnings

from peft import LoraConfig
from peft.tuners.lora.layer import ParamWrapper

from ..kan import KANLinear


class KANLinearLoRA(ParamWrapper):
    """PEFT's LoRA on the weight of a :class:`~kangpt.kan.KANLinear` (its coefficient matrix)."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, **kwargs):
        kwargs.pop("parameter_name", None)
        kwargs.pop("fan_in_fan_out", None)
        super().__init__(base_layer, adapter_name, parameter_name="weight", config=_for_kan(config), **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        """As ``ParamWrapper`` does, with the settings that do not apply to a weight update dropped."""
        super().update_layer(adapter_name, r, lora_alpha, _for_kan(config), **kwargs)


def _for_kan(config: LoraConfig) -> LoraConfig:
    """``config`` as it applies to a KAN layer's weight: stored as (out, in) whatever PEFT decided for
    GPT-2's Conv1D layers (``fan_in_fan_out``), and without input dropout."""
    if config.lora_dropout:
        warnings.warn(
            f"lora_dropout={config.lora_dropout} does not act on KAN layers: their LoRA update is added "
            "to the weight, so there is no input to drop",
            stacklevel=3,
        )
    kan_config = copy.copy(config)
    kan_config.fan_in_fan_out, kan_config.lora_dropout = False, 0.0
    return kan_config


def register_kan_lora(config: LoraConfig) -> LoraConfig:
    """Let ``config`` put LoRA on the KAN layers its ``target_modules`` name; returns ``config``."""
    config._register_custom_module({KANLinear: KANLinearLoRA})
    return config
