"""kangpt: GPT-2 with Kolmogorov-Arnold Network feed-forward blocks, as a Hugging Face model.

Importing the package registers the model with the ``transformers`` Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` works for saved KAN-GPT-2 folders, and marks the
classes for ``auto_map`` so that ``save_pretrained`` folders also load with ``trust_remote_code=True``
where kangpt is not installed.
"""

import logging
from contextlib import contextmanager


@contextmanager
def _quiet_import_time_warnings():
    """Hold back the warnings torchao and torch log while transformers imports torchao.

    transformers imports torchao whenever it is installed (``pip install 'kangpt[quant]'``), and on a
    CPU build of torch torchao logs that it cannot load its CUDA kernels, and torch that torchao
    registers Enum constants the old way. The int8 weight-only path needs none of those kernels, and
    every command of kangpt would otherwise begin with those lines (before its one-line errors).
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


with _quiet_import_time_warnings():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_kangpt import KANGPT2Config
    from .kan import KANFeedForward, KANLinear, kan_block_hidden_size, kan_linear_num_parameters
    from .modeling_kangpt import KANGPT2Block, KANGPT2LMHeadModel, KANGPT2Model, KANGPT2PreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(KANGPT2Config.model_type, KANGPT2Config, exist_ok=True)
AutoModel.register(KANGPT2Config, KANGPT2Model, exist_ok=True)
AutoModelForCausalLM.register(KANGPT2Config, KANGPT2LMHeadModel, exist_ok=True)
KANGPT2Config.register_for_auto_class()
KANGPT2Model.register_for_auto_class("AutoModel")
KANGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "KANFeedForward",
    "KANGPT2Block",
    "KANGPT2Config",
    "KANGPT2LMHeadModel",
    "KANGPT2Model",
    "KANGPT2PreTrainedModel",
    "KANLinear",
    "kan_block_hidden_size",
    "kan_linear_num_parameters",
]
