"""Int8 weight-only quantisation of KAN-GPT-2 with torchao (``pip install 'kangpt[quant]'``).

torchao's ``quantize_`` (like transformers' and optimum-quanto's quantisers) quantises
``nn.Linear`` layers by default; a KAN layer is not one, so in KAN-GPT-2 only the LM head would be
quantised and the feed-forward blocks, most of the parameters outside the embeddings, would stay in
floating point. :func:`quantize_int8` passes torchao a filter that takes the KAN layers too: each
layer's weight (out, F * in) becomes int8 with one scale per output row, and the layer multiplies
its features with it through ``F.linear``, which torchao's int8 tensor implements. The features,
activations and biases stay in floating point. GPT-2's attention is a ``Conv1D``, which torchao
does not quantise (in GPT-2 either).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kan import KANLinear


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise, in place, the weights of every KAN layer and of every ``nn.Linear`` that is not tied
    to the input embeddings to int8 (torchao's ``Int8WeightOnlyConfig``). Returns ``model``.

    A tied LM head is left alone: quantising it would untie it and keep the embedding table twice.
    """
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings.weight if embeddings is not None else None

    def wanted(module: nn.Module, _name: str) -> bool:
        if isinstance(module, KANLinear):
            return True
        return isinstance(module, nn.Linear) and module.weight is not tied

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=wanted)
    return model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model``, each tensor once (tied weights are one);
    a quantised tensor counts what it stores (int8 values, scales), not its floating-point size."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _stored_bytes(tensor)
    return total


def _stored_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()  # a tensor subclass: the tensors it is made of
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
