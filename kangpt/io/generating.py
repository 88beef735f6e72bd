"""How a model generates: eagerly, or compiled (``torch.compile``) with a static KV cache.

transformers compiles a model's forward under ``generate`` when its cache is static, on accelerators
only; :func:`compiled` asks it on every device (the CPU included), in Inductor's default mode on the CPU
and in CUDA graphs ("reduce-overhead") on CUDA. The first call compiles (tens of seconds); later calls
of the same shapes reuse it.
"""

from __future__ import annotations

import torch
from transformers import CompileConfig


def compiled(model: torch.nn.Module) -> dict:
    """``generate`` keywords that run ``model`` compiled, with a static cache."""
    mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
    config._compile_all_devices = True  # transformers' own switch for devices it does not compile on
    return {"cache_implementation": "static", "compile_config": config}
