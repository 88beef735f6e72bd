"""Fused Triton kernels of a grouped B-spline KAN layer (the default design), for CUDA GPUs.

A grouped layer computes ``y = phi(x) @ W.T + b`` where ``phi`` applies the function of every input's
group elementwise (see ``kangpt.kan_grouped.PieceTableEvaluation``). The kernels never write ``phi(x)``:

- forward: one matmul whose K loop loads a tile of ``x`` and evaluates ``phi`` on it in registers
  (a gather of the piece table, a Horner step, the linear and SiLU terms) before the dot product;
- grad input: the transposed matmul ``grad_y @ W`` with ``phi'(x)`` applied in its epilogue; the
  same epilogue sums ``grad_phi * term(x)`` over its tile for the gradient of the coefficients,
  one row of partial sums per program (no atomics), summed afterwards;
- grad weight: ``grad_y.T @ phi(x)`` over the tokens, ``phi`` recomputed per tile.

Accumulation is fp32 and ``phi`` is evaluated in fp32 whatever the input dtype (fp32 or bf16).
``grouped_bspline_linear`` is a ``torch.library`` custom op with its autograd formula and shapes
(``register_fake``) registered, so ``torch.compile`` keeps it as one opaque call and fake-tensor
memory estimates see its outputs. Triton runs on CPU tensors under
``TRITON_INTERPRET=1`` (slow; the tests use it at small shapes).
"""

from __future__ import annotations

import os

import torch

from .kan_bases import GroupedBSplineBasis

try:  # imported only where triton is installed; the guard keeps remote code loadable without it
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("kangpt.kan_triton needs the triton package (pip install triton)") from err


# Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) multiplies bf16 operands wrongly: there the
# operands of every dot are upcast after their rounding to the matmul dtype, which is what a GPU's
# bf16 tensor-core product with fp32 accumulation computes too (up to the summation order).
_DOT_FP32 = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _phi(
    x,
    offs_i,
    table_ptr,
    linear_ptr,
    silu_ptr,
    mask_i,
    inv_h,
    shift,
    z_max,
    table_rows,
    group_size,
    rows_per_group,
    ORDER: tl.constexpr,
):
    """phi(x) of a (BLOCK_N, BLOCK_I) tile of inputs ``offs_i``; also what its derivatives reuse: ``t``,
    the table row, sigmoid(x), the linear and SiLU weights and ``z = (x - a) / h + k + 1`` (clamped)."""
    z = tl.minimum(tl.maximum(x * inv_h + shift, 0.0), z_max)
    c = z.to(tl.int32)  # the floor: z >= 0
    t = z - c.to(tl.float32)
    row = (offs_i // group_size)[None, :] * rows_per_group + c
    value = tl.load(table_ptr + ORDER * table_rows + row)
    for p in tl.static_range(ORDER - 1, -1, -1):
        value = value * t + tl.load(table_ptr + p * table_rows + row)
    linear = tl.load(linear_ptr + offs_i, mask=mask_i, other=0.0)[None, :]
    silu_weight = tl.load(silu_ptr + offs_i, mask=mask_i, other=0.0)[None, :]
    sigmoid = tl.sigmoid(x)
    return value + linear * x + silu_weight * x * sigmoid, t, row, sigmoid, linear, silu_weight, z


@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    table_ptr,
    linear_ptr,
    silu_ptr,
    N,
    IN,
    OUT,
    inv_h,
    shift,
    z_max,
    table_rows,
    group_size,
    rows_per_group,
    ORDER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_n, mask_o = offs_n < N, offs_o < OUT
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < IN
        mask = mask_n[:, None] & mask_i[None, :]
        x = tl.load(x_ptr + offs_n[:, None] * IN + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
        phi = _phi(
            x,
            offs_i,
            table_ptr,
            linear_ptr,
            silu_ptr,
            mask_i,
            inv_h,
            shift,
            z_max,
            table_rows,
            group_size,
            rows_per_group,
            ORDER,
        )[0]
        phi = tl.where(mask, phi, 0.0)
        w = tl.load(
            w_ptr + offs_o[:, None] * IN + offs_i[None, :], mask=mask_o[:, None] & mask_i[None, :], other=0.0
        )
        acc += _dot(phi.to(w.dtype), tl.trans(w), DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_n[:, None] * OUT + offs_o[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_n[:, None] & mask_o[None, :],
    )


@triton.jit
def _grad_input_kernel(
    g_ptr,
    w_ptr,
    x_ptr,
    gx_ptr,
    partial_ptr,
    table_ptr,
    linear_ptr,
    silu_ptr,
    folded_ptr,
    N,
    IN,
    OUT,
    inv_h,
    shift,
    z_max,
    table_rows,
    group_size,
    rows_per_group,
    tiles_per_group,
    ORDER: tl.constexpr,
    N_SPLINES: tl.constexpr,
    N_TERMS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_I) tile of grad_x, inside one group; its partial coefficient gradients."""
    pid_n, group, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tile * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_i = group * group_size + local
    mask_n, mask_i = offs_n < N, local < group_size
    grad_phi = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    for o0 in range(0, OUT, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mask_o = offs_o < OUT
        g = tl.load(
            g_ptr + offs_n[:, None] * OUT + offs_o[None, :], mask=mask_n[:, None] & mask_o[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + offs_o[:, None] * IN + offs_i[None, :], mask=mask_o[:, None] & mask_i[None, :], other=0.0
        )
        grad_phi += _dot(g, w.to(g.dtype), DOT_FP32)
    mask = mask_n[:, None] & mask_i[None, :]
    x = tl.load(x_ptr + offs_n[:, None] * IN + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
    _, t, row, sigmoid, linear, silu_weight, z = _phi(
        x,
        offs_i,
        table_ptr,
        linear_ptr,
        silu_ptr,
        mask_i,
        inv_h,
        shift,
        z_max,
        table_rows,
        group_size,
        rows_per_group,
        ORDER,
    )
    slope = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    for p in tl.static_range(ORDER, 0, -1):  # d/dt of the piece, by Horner, then / h
        slope = slope * t + p * tl.load(table_ptr + p * table_rows + row)
    dphi = slope * inv_h + linear + silu_weight * sigmoid * (1 + x * (1 - sigmoid))
    grad_phi = tl.where(mask, grad_phi, 0.0)
    tl.store(
        gx_ptr + offs_n[:, None] * IN + offs_i[None, :],
        (grad_phi * dphi).to(gx_ptr.dtype.element_ty),
        mask=mask,
    )
    # Partial gradient of the group's coefficients [linear, silu, B_0, ..., B_{K-1}] over this tile.
    out = partial_ptr + ((pid_n * tl.num_programs(1) + group) * tiles_per_group + tile) * N_TERMS
    tl.store(out, tl.sum(grad_phi * x))
    tl.store(out + 1, tl.sum(grad_phi * x * sigmoid))
    # B_j at z - 1 = (x - a) / h + k, by the folded truncated-power formula (zero beyond the grid).
    centre = (ORDER + 1) / 2
    for j in tl.static_range(N_SPLINES):
        v = centre - tl.abs(z - 1 - j - centre)
        spline = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
        for m in tl.static_range((ORDER + 2) // 2):
            part = tl.maximum(v - m, 0.0)
            power = tl.full((BLOCK_N, BLOCK_I), 1.0, dtype=tl.float32)
            for _ in tl.static_range(ORDER):
                power = power * part
            spline += tl.load(folded_ptr + m) * power
        tl.store(out + 2 + j, tl.sum(grad_phi * spline))


@triton.jit
def _grad_weight_kernel(
    g_ptr,
    x_ptr,
    gw_ptr,
    table_ptr,
    linear_ptr,
    silu_ptr,
    N,
    IN,
    OUT,
    inv_h,
    shift,
    z_max,
    table_rows,
    group_size,
    rows_per_group,
    ORDER: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """One (BLOCK_O, BLOCK_I) tile of grad_W = grad_y.T @ phi(x), phi recomputed per token tile."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_o, mask_i = offs_o < OUT, offs_i < IN
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_n[:, None] & mask_i[None, :]
        x = tl.load(x_ptr + offs_n[:, None] * IN + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
        phi = _phi(
            x,
            offs_i,
            table_ptr,
            linear_ptr,
            silu_ptr,
            mask_i,
            inv_h,
            shift,
            z_max,
            table_rows,
            group_size,
            rows_per_group,
            ORDER,
        )[0]
        phi = tl.where(mask, phi, 0.0)
        g = tl.load(
            g_ptr + offs_n[:, None] * OUT + offs_o[None, :], mask=mask_n[:, None] & mask_o[None, :], other=0.0
        )
        acc += _dot(tl.trans(g), phi.to(g.dtype), DOT_FP32)
    tl.store(gw_ptr + offs_o[:, None] * IN + offs_i[None, :], acc, mask=mask_o[:, None] & mask_i[None, :])


# ---------------------------------------------------------------------------------------------
# The custom op and its gradient

_BLOCK_N, _BLOCK_O, _BLOCK_I = 32, 32, 32


def _grid_constants(basis: GroupedBSplineBasis) -> tuple[list[float], list[int]]:
    """The scalars the kernels need: (1/h, shift, z_max) and (rows, group size, spline order, K)."""
    spline = basis.spline
    k = spline.spline_order
    floats = [
        1 / spline.step,
        k + 1 - spline.grid_range[0] / spline.step,
        float(spline.num_functions + k + 1),
    ]
    return floats, [basis.rows, basis.group_size, k, spline.num_functions]


def _table(coefficients: torch.Tensor, transform: torch.Tensor, group_size: int):
    """Piece table by power (k + 1, groups * rows) and every input's linear and SiLU weights, fp32."""
    a = coefficients.float()
    table = torch.einsum("gj,jrp->pgr", a[:, 2:], transform.float()).flatten(1).contiguous()
    return (
        table,
        a[:, 0].repeat_interleave(group_size).contiguous(),
        a[:, 1].repeat_interleave(group_size).contiguous(),
    )


@torch.library.custom_op("kangpt::grouped_bspline_linear", mutates_args=())
def grouped_bspline_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    coefficients: torch.Tensor,
    transform: torch.Tensor,
    folded: torch.Tensor,
    floats: list[float],
    ints: list[int],
) -> torch.Tensor:
    """``phi(x) @ weight.T + bias`` for x (N, in), weight (out, in) in the matmul dtype; see the module."""
    rows, group_size, order, _ = ints
    inv_h, shift, z_max = floats
    table, linear, silu = _table(coefficients, transform, group_size)
    n, n_in = x.shape
    n_out = weight.shape[0]
    y = torch.empty(n, n_out, device=x.device, dtype=weight.dtype)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(n_out, _BLOCK_O))
    _forward_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        table,
        linear,
        silu,
        n,
        n_in,
        n_out,
        inv_h,
        shift,
        z_max,
        table.shape[1],
        group_size,
        rows,
        ORDER=order,
        HAS_BIAS=bias is not None,
        DOT_FP32=_DOT_FP32,
        BLOCK_N=_BLOCK_N,
        BLOCK_O=_BLOCK_O,
        BLOCK_I=_BLOCK_I,
    )
    return y


@torch.library.custom_op("kangpt::grouped_bspline_linear_backward", mutates_args=())
def grouped_bspline_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    coefficients: torch.Tensor,
    transform: torch.Tensor,
    folded: torch.Tensor,
    floats: list[float],
    ints: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`grouped_bspline_linear` for x, weight and the coefficients."""
    rows, group_size, order, n_splines = ints
    inv_h, shift, z_max = floats
    table, linear, silu = _table(coefficients, transform, group_size)
    n, n_in = x.shape
    n_out = weight.shape[0]
    groups = n_in // group_size
    tiles = triton.cdiv(group_size, _BLOCK_I)
    grad = grad.to(weight.dtype).contiguous()
    grad_x = torch.empty_like(x)
    partial = torch.empty(
        triton.cdiv(n, _BLOCK_N), groups, tiles, 2 + n_splines, device=x.device, dtype=torch.float32
    )
    _grad_input_kernel[(triton.cdiv(n, _BLOCK_N), groups, tiles)](
        grad,
        weight,
        x,
        grad_x,
        partial,
        table,
        linear,
        silu,
        folded,
        n,
        n_in,
        n_out,
        inv_h,
        shift,
        z_max,
        table.shape[1],
        group_size,
        rows,
        tiles,
        ORDER=order,
        N_SPLINES=n_splines,
        N_TERMS=2 + n_splines,
        DOT_FP32=_DOT_FP32,
        BLOCK_N=_BLOCK_N,
        BLOCK_O=_BLOCK_O,
        BLOCK_I=_BLOCK_I,
    )
    grad_w = torch.empty(n_out, n_in, device=x.device, dtype=torch.float32)
    _grad_weight_kernel[(triton.cdiv(n_out, _BLOCK_O), triton.cdiv(n_in, _BLOCK_I))](
        grad,
        x,
        grad_w,
        table,
        linear,
        silu,
        n,
        n_in,
        n_out,
        inv_h,
        shift,
        z_max,
        table.shape[1],
        group_size,
        rows,
        ORDER=order,
        DOT_FP32=_DOT_FP32,
        BLOCK_N=_BLOCK_N,
        BLOCK_O=_BLOCK_O,
        BLOCK_I=_BLOCK_I,
    )
    grad_coefficients = partial.sum((0, 2)).to(coefficients.dtype)  # (groups, 2 + K)
    return grad_x, grad_w.to(weight.dtype), grad_coefficients


@grouped_bspline_linear.register_fake
def _(x, weight, bias, coefficients, transform, folded, floats, ints):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=weight.dtype)


@grouped_bspline_linear_backward.register_fake
def _(grad, x, weight, coefficients, transform, folded, floats, ints):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(coefficients)


def _setup_context(ctx, inputs, output):
    x, weight, bias, coefficients, transform, folded, floats, ints = inputs
    ctx.save_for_backward(x, weight, coefficients, transform, folded)
    ctx.constants, ctx.has_bias = (floats, ints), bias is not None


def _backward(ctx, grad):
    x, weight, coefficients, transform, folded = ctx.saved_tensors
    grad_x, grad_w, grad_a = grouped_bspline_linear_backward(
        grad, x, weight, coefficients, transform, folded, *ctx.constants
    )
    grad_b = grad.sum(0) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, grad_a, None, None, None, None


torch.library.register_autograd("kangpt::grouped_bspline_linear", _backward, setup_context=_setup_context)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, basis: GroupedBSplineBasis
) -> torch.Tensor:
    """(N, in) -> (N, out): a grouped B-spline KAN layer by the fused kernels; ``weight`` and ``bias``
    already in the matmul dtype."""
    transform = basis._constants(x.float())[0]
    folded = torch.tensor(basis.spline._folded, device=x.device, dtype=torch.float32)
    floats, ints = _grid_constants(basis)
    return grouped_bspline_linear(
        x.contiguous(), weight.contiguous(), bias, basis.coefficients, transform, folded, floats, ints
    )
