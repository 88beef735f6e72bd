"""kangpt: GPT-2 with Kolmogorov-Arnold Network feed-forward blocks, as a Hugging Face model.

Importing the package registers the model with the ``transformers`` Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` works for saved KAN-GPT-2 folders, and marks the
classes for ``auto_map`` so that ``save_pretrained`` folders also load with ``trust_remote_code=True``
where kangpt is not installed.
"""

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
