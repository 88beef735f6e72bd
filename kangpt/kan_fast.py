"""The fast paths of ``KANLinear``: the same values as its reference forward (features, then one
matmul), computed with less memory and time.

Memory: the (tokens x n_features x in) feature tensor is never kept for backward. In eager mode
the layer runs a custom autograd function that saves only its input and recomputes the features,
chunk by chunk over tokens, in backward (without grad, the same chunks run with no autograd).
Under ``torch.compile`` the plain formula runs inside a selective activation checkpoint that keeps
the matmul outputs and recomputes the features: Inductor fuses the feature computation into one
kernel each way, and again only the input is kept for backward. Inductor schedules the chunks'
buffers together, so the peak is higher than in eager mode; the chunks there keep every single
feature buffer small enough for the CPU allocator to reuse (see ``_COMPILE_CHUNK_ELEMENTS``). On
CUDA with Triton, grouped B-spline layers run the fused kernels of ``kangpt.kan_triton``.
"""

from __future__ import annotations

import functools
import logging
import math
import operator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .kan_bases import _compute_dtype
from .messages import first_line

logger = logging.getLogger(__name__)

# Transient feature buffers are kept near this many elements per chunk of tokens (8 MB of fp32):
# longer chunks cost fewer matmul calls, shorter ones a lower peak (tuned with eval/bench_kan.py).
_CHUNK_ELEMENTS = 2 << 20

# Under torch.compile, feature buffers are kept under this many elements (24 MiB of fp32). glibc's
# malloc hands out blocks above its mmap threshold (at most 32 MiB) as fresh pages that fault in on
# every step; below it, freed blocks are reused (count the minor page faults of a step to see it).
# Smaller chunks cost more in per-matmul overhead.
_COMPILE_CHUNK_ELEMENTS = 6 << 20


def _feature_buffer(x: torch.Tensor, basis, chunk: int) -> torch.Tensor:
    """One (chunk, F, in) buffer reused by every chunk (no allocator churn)."""
    return torch.empty(
        min(chunk, x.shape[0]), basis.num_features, x.shape[1], device=x.device, dtype=_compute_dtype(x)
    )


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: matmul outputs are kept, every feature op is recomputed."""
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_features():
    return create_selective_checkpoint_contexts(_keep_matmuls)


@torch.compiler.assume_constant_result  # a fact of the installation: compiled as its value
@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_kernels_apply(basis: str, sharing: str) -> bool:
    """Whether the fused Triton kernels (``kangpt.kan_triton``) can run a layer of this design: grouped
    B-splines only, with ``triton`` installed."""
    return sharing == "group" and basis == "bspline" and _triton_available()


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on (as ``nn.Linear`` would use), else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _forward_chunks(x, weight, bias, basis, chunk, dtype) -> torch.Tensor:
    """(tokens, in) -> (tokens, out): features of ``chunk`` tokens at a time, one matmul each.

    The matmul is ``F.linear``: weight-only quantised weights (torchao's tensor subclasses)
    implement it, not ``matmul(out=...)`` or a transposed view.
    """
    w = weight if weight.dtype == dtype else weight.to(dtype)
    b = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    values = getattr(basis, "inference_values", None)  # grouped B-splines: no buffer, fewer ops
    if x.shape[0] <= chunk and values is not None:  # one chunk (e.g. a decoding step)
        feats = values(x)
        return F.linear(feats if feats.dtype == dtype else feats.to(dtype), w, b)
    buf = _feature_buffer(x, basis, chunk)
    if x.shape[0] <= chunk:  # one chunk: no split, no cat
        feats = basis.features_into(x, buf).flatten(1)
        return F.linear(feats if feats.dtype == dtype else feats.to(dtype), w, b)
    outs = [
        F.linear(basis.features_into(xc, buf[: len(xc)]).flatten(1).to(dtype), w, b)  # (n, out)
        for xc in x.split(chunk)
    ]
    return torch.cat(outs)


class _KANLinearFunction(torch.autograd.Function):
    """``y = features(x) @ weight.T + bias``, saving only ``x``; features are recomputed in backward.

    Works on 2-D ``x`` (tokens, in) in chunks of ``chunk`` tokens, so the transient feature buffers
    are (chunk, n_features, in) whatever the number of tokens.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, basis, chunk, *basis_params):
        dtype = _matmul_dtype(x, weight)
        ctx.save_for_backward(x, weight, bias, *basis_params)
        ctx.basis, ctx.chunk, ctx.dtype = basis, chunk, dtype
        return _forward_chunks(x, weight, bias, basis, chunk, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, *basis_params = ctx.saved_tensors
        basis, chunk, dtype = ctx.basis, ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        grad_out = grad_out.to(dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        grad_params = [torch.zeros_like(p, dtype=grad_w.dtype) for p in basis_params]
        buf = _feature_buffer(x, basis, chunk)
        for s in range(0, x.shape[0], chunk):
            g = grad_out[s : s + chunk]  # (n, out)
            xc, fc = x[s : s + chunk], buf[: len(g)]
            if need_x or basis_params:
                grad_feats = (g @ w).view(fc.shape).to(fc.dtype)  # (n, F, in)
                feats, gx, gp = basis.features_and_grads(xc, fc, grad_feats)
                if need_x:
                    grad_x[s : s + chunk] = gx
                for acc, p in zip(grad_params, gp, strict=True):
                    acc += p
            else:
                feats = basis.features_into(xc, fc)  # (n, F, in)
            if need_w and grad_w.dtype == dtype:
                grad_w.addmm_(g.t(), feats.flatten(1))
            elif need_w:  # low-precision matmul, fp32 accumulation across chunks
                grad_w += (g.t() @ feats.flatten(1).to(dtype)).to(grad_w.dtype)
        grad_b = grad_out.sum(0).to(bias.dtype) if (bias is not None and need_b) else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_params = [gp.to(p.dtype) for gp, p in zip(grad_params, basis_params, strict=True)]
        return (grad_x, grad_w, grad_b, None, None, *grad_params)


def chunk_tokens(layer, tokens: int) -> int:
    """Tokens per chunk of the eager paths: at most ``layer.chunk_size`` (or about
    ``_CHUNK_ELEMENTS`` transient feature elements), the chunks of ``tokens`` as equal as possible (no
    small last chunk to matmul)."""
    chunk = layer.chunk_size or max(16, _CHUNK_ELEMENTS // (layer.in_features * layer.basis.chunk_width))
    if tokens <= chunk:
        return chunk
    chunks = math.ceil(tokens / chunk)
    return math.ceil(tokens / chunks)


# The device types on which kernel="auto" runs the fused kernels.
AUTO_KERNEL_DEVICES = ("cuda",)

# Whether the fused kernels ran, per (device, input dtype, matmul dtype), in this process: "auto" tries
# them once there (:func:`_kernels_run_on`) and takes the PyTorch path where they failed.
_kernels_ran: dict[tuple[str, torch.dtype, torch.dtype], bool] = {}


def uses_fused_kernel(layer, x: torch.Tensor) -> bool:
    """Whether a call of ``layer`` on ``x`` runs the Triton kernels (``kernel``: "triton" always, "auto"
    on CUDA when Triton is installed and the kernels ran there on first use, "torch" never); only
    grouped B-spline layers have them."""
    if layer.kernel == "torch" or not triton_kernels_apply(layer.basis_name, layer.sharing):
        return False
    if layer.kernel == "triton":
        return True
    if x.device.type not in AUTO_KERNEL_DEVICES:
        return False
    key = (str(x.device), x.dtype, _matmul_dtype(x, layer.weight))
    if key not in _kernels_ran:
        _kernels_ran[key] = _kernels_run_on(layer, *key)
    return _kernels_ran[key]


@torch.compiler.assume_constant_result  # run for real, also where first met while compiling (fullgraph too)
def _kernels_run_on(layer, device: str, x_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Run the fused kernels once, forward and backward, on a few tokens through ``layer``'s weights; if
    they fail to compile or launch, warn in one line and return False (no gradient is left anywhere).

    The kernels have not yet been run on every GPU that "auto" may meet: a failure there costs their
    speed, not the run.
    """
    from .kan_triton import grouped_linear

    x = torch.linspace(-3, 3, 16 * layer.in_features, device=device).view(16, -1).to(x_dtype)
    x.requires_grad_()
    weight = layer.weight.detach().to(dtype).requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    try:
        y = grouped_linear(x, weight, bias, layer.basis)
        torch.autograd.grad(y.float().sum(), (x, weight))
        if x.is_cuda:
            torch.cuda.synchronize(x.device)  # a failed launch shows here at the latest
    except Exception as err:  # whatever Triton or the driver raise: the PyTorch path computes the same
        logger.warning(
            "the fused Triton KAN kernels failed on %s (%s inputs, %s matmuls): %s: %s; kan_kernel 'auto' "
            "runs the PyTorch path in this process ('triton' raises the error)",
            device, x_dtype, dtype, type(err).__name__, first_line(err),
        )
        return False
    return True


def _compiled_formula(layer, x: torch.Tensor, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, in) -> (tokens, out) as plain differentiable ops (compile path), in equal
    chunks of tokens whose feature buffers stay under ``_COMPILE_CHUNK_ELEMENTS``. A symbolic
    token count (dynamic shapes) is not chunked: the chunk count would specialise it."""
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    n = x.shape[0]
    chunks = 1
    if isinstance(n, int):
        width = layer.in_features * layer.num_features
        chunks = max(1, min(n, math.ceil(n * width / _COMPILE_CHUNK_ELEMENTS)))
    features = getattr(layer.basis, "compiled_features", layer.basis.features)
    outs = [F.linear(features(xc).flatten(1).to(dtype), w, b) for xc in x.tensor_split(chunks)]
    return torch.cat(outs) if len(outs) > 1 else outs[0]  # (tokens, out)


def _parameters_by_name(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """``module``'s parameters in ``parameters()`` order, each read by attribute: DeepSpeed ZeRO-3
    gathers a sharded parameter read during another module's forward (here the layer's) on such a read
    only, and would otherwise hand over its empty shard."""
    return tuple(operator.attrgetter(name)(module) for name, _ in module.named_parameters())


def kan_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """(tokens, in) -> (tokens, out): ``layer``'s output on 2-D ``x`` by the fastest path that applies.

    Reads the weight once, and decides on the tensors used, not on the module's parameters: under a
    parametrization (PEFT's LoRA on the weight: W + BA) ``layer.weight`` is computed, and its
    gradient flows to parameters that live elsewhere.
    """
    weight, bias = layer.weight, layer.bias
    basis_params = _parameters_by_name(layer.basis) if torch.is_grad_enabled() else ()
    dtype = _matmul_dtype(x, weight)
    if uses_fused_kernel(layer, x):  # Triton: phi(x) evaluated inside the matmuls, never written
        from .kan_triton import grouped_linear

        return grouped_linear(x, weight.to(dtype), None if bias is None else bias.to(dtype), layer.basis)
    if torch.compiler.is_compiling():  # plain ops that Inductor fuses, recomputed in backward
        if not torch.is_grad_enabled():  # generation: nothing to recompute
            return _compiled_formula(layer, x, weight, bias, dtype)
        return checkpoint(
            _compiled_formula, layer, x, weight, bias, dtype, use_reentrant=False,
            context_fn=_recompute_features,
        )
    chunk = chunk_tokens(layer, len(x))
    tensors = (x, weight, bias, *basis_params)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _KANLinearFunction.apply(x, weight, bias, layer.basis, chunk, *basis_params)
    return _forward_chunks(x, weight, bias, layer.basis, chunk, dtype)  # inference: no autograd bookkeeping
