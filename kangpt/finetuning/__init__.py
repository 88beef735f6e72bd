"""Starting from a model that exists: GPT-2's MLPs converted into KAN blocks (``convert``), LoRA on
KAN layers (``lora``, with PEFT) and int8 weight-only quantisation (``quantization``, with torchao).
PEFT and torchao are extras, imported only by their modules."""

from .convert import convert_gpt2, load_gpt2

__all__ = ["convert_gpt2", "load_gpt2"]
