"""Peak memory of a training step and of generation, estimated without allocating anything.

A model is built from its config under ``torch._subclasses.FakeTensorMode`` (tensors with shapes and
dtypes but no storage) and one step is run under ``torch.distributed._tools.mem_tracker.MemTracker``,
which adds up the bytes of every tensor alive at each moment: parameters, gradients, optimizer state,
activations kept for backward and temporaries. The peak is what the same step allocates on a GPU,
before the allocator's rounding and fragmentation and without the CUDA context.

Fake CUDA tensors need CUDA (random initialisation and device guards), so the tensors are fake CPU
tensors that take the GPU's code paths: attention by ``scaled_dot_product_attention``, whose CPU
kernel is a fused (flash) one that keeps no (T x T) matrix, as on a GPU, and KAN layers through the
fused Triton op (``kan_kernel="triton"``, its output shapes registered for fake tensors) when
``triton`` is installed, else through the PyTorch path (which keeps the same tensors for backward).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker


def _peak(tracker: MemTracker) -> int:
    """The tracker's peak over all devices, in bytes."""
    return sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def estimate_training_peak(build, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Peak bytes of one training step (forward and loss under autocast to ``dtype``, backward,
    AdamW step) of the model ``build()`` returns (fp32 weights), with its optimizer state."""
    with FakeTensorMode():
        model = build().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return _peak(tracker)


def estimate_generation_peak(build, batch: int, prompt_len: int, new_tokens: int, dtype: torch.dtype) -> int:
    """Peak bytes of greedy generation with the KV cache (a prompt, then one token per step) by the
    model ``build()`` returns, its weights in ``dtype``."""
    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)  # built in dtype: converting fake parameters fails
        try:
            model = build().eval()
        finally:
            torch.set_default_dtype(default)
        ids = torch.zeros(batch, prompt_len, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, torch.no_grad():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as generate() asks
            for _ in range(new_tokens):  # generate()'s stopping checks read values; fake tensors have none
                token = out.logits[:, -1:].argmax(-1)
                tracker.reset_mod_stats()  # per-module statistics of one call each; the peak stays
                out = model(input_ids=token, cache=_cache(out), use_cache=True)
        return _peak(tracker)


def _cache(output):
    """The KV cache of a model output: ``cache`` (KAN-GPT-2, transformers 5) or ``past_key_values``."""
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


__all__ = ["estimate_generation_peak", "estimate_training_peak"]
