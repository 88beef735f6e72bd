"""How a grouped B-spline layer's functions run fast: from a table of polynomial pieces, in blocks of
rows whose temporaries stay in the CPU's cache (the eager path, forward and backward), and through an
autograd function that ``torch.compile`` fuses.

:class:`PieceTableEvaluation` holds that machinery; ``kangpt.kan_bases.GroupedBSplineBasis`` (the
grouped functions over B-splines, their formula) inherits it. This module imports nothing of
kangpt, so the dependency runs one way, ``kan_bases`` -> ``kan_grouped``. The fused Triton kernels
(``kangpt.kan_triton``) read the same table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor


class PieceTableEvaluation:
    """The eager and compiled paths of a grouped B-spline basis, by its table of polynomial pieces.

    On the uniform grid, ``phi_g`` is one polynomial of degree k per grid interval: with
    ``z = (x - a) / h + k``, ``c = floor(z)`` and ``t = z - c``, the spline part is
    ``sum_p E[g, c, p] t^p``, where the piece table ``E = a_g @ T`` follows from the coefficients by a
    fixed linear map ``T`` (the k + 1 B-spline pieces active on each interval). Evaluating it is one
    gather of a table row and a Horner step per input, whatever the number of B-splines; the
    gradient of the table is a histogram of ``grad * t^p`` over (group, interval), mapped back by
    ``T``. Work is done in blocks of rows whose temporaries stay in the CPU's cache.

    A mixin: the class that inherits it has ``spline`` (a ``kangpt.kan_bases.BSplineBasis``),
    ``coefficients`` (groups, 2 + K), ``groups`` and ``group_size``, and calls
    :meth:`_init_piece_tables` when it is made.
    """

    # Elements per block: larger blocks cost fewer op calls, smaller ones keep their temporaries in
    # the CPU's caches (tuned with eval/bench_kan.py).
    _BLOCK_ELEMENTS = 1 << 18

    def _init_piece_tables(self) -> None:
        """Empty caches: the constants per device and dtype, the forward-only path's table."""
        self._cache = {}
        self._inference, self._inference_key, self._inference_source = None, None, None

    @property
    def rows(self) -> int:
        """Table rows per group: the intervals c = -1 .. K + k (the first and last hold zeros)."""
        return self.spline.num_functions + self.spline.spline_order + 2

    def _constants(self, x):
        """``T`` (K, rows, k + 1), every input's first table row (in,), and the grid map ``1 / h`` and
        ``k + 1 - a / h`` (0-d), per device and dtype (built once, not under ``torch.compile``: a tensor
        stored while tracing would escape the graph)."""
        key = (x.device, x.dtype)
        if key not in self._cache or torch.compiler.is_compiling():
            k, n_fun = self.spline.spline_order, self.spline.num_functions
            pieces = torch.tensor(self.spline._pieces, dtype=torch.float64)  # (m, power)
            transform = torch.zeros(n_fun, self.rows, k + 1, dtype=torch.float64)
            for j in range(n_fun):  # B_j is piece m on interval c = j + m, which is table row c + 1
                transform[j, j + 1 : j + k + 2] = pieces
            first_row = torch.arange(self.groups).repeat_interleave(self.group_size) * self.rows
            step, low = self.spline.step, self.spline.grid_range[0]  # z = x / h + (k + 1 - a / h)
            grid_map = [torch.tensor(v, device=x.device, dtype=x.dtype)
                        for v in (1 / step, k + 1 - low / step)]
            constants = (transform.to(x.device, x.dtype), first_row.to(x.device), *grid_map)
            if torch.compiler.is_compiling():
                return constants
            self._cache[key] = constants
        return self._cache[key]

    def _tables(self, coefficients, x):
        """The piece table (groups * rows, k + 1): the polynomial of every interval of every group, by
        power; every input's linear and SiLU weights (in,) each; its group's first table row (in,)."""
        transform, first_row, _, _ = self._constants(x)
        a = coefficients.to(x.dtype)  # (G, 2 + K)
        table = torch.einsum("gj,jrp->grp", a[:, 2:], transform).flatten(0, 1)  # (G * rows, k + 1)
        linear, silu = (a[:, i].repeat_interleave(self.group_size) for i in (0, 1))
        return table, linear, silu, first_row

    def _inference_tables(self, x):
        """:meth:`_tables` of the forward-only path, kept while the coefficients hold the same values
        (compared, not tracked: ``.data`` writes bump no version) and the input's device and dtype
        stay: generation calls the layer once per new token."""
        c = self.coefficients.detach()
        if isinstance(c, FakeTensor):  # shapes only (memory estimates): no values to compare
            return self._tables(c, x)
        key = (x.device, x.dtype)
        if self._inference_key != key or not torch.equal(c, self._inference_source):
            self._inference = self._tables(c, x)
            self._inference_key, self._inference_source = key, c.clone()
        return self._inference

    def _locate(self, x, first_row):
        """(..., in) -> the table row of every input (int64) and its position ``t`` in the interval.

        Row ``c + 1`` of its group holds interval ``c = floor(z)``; ``z + 1`` is clamped to
        ``[0, K + k + 1]`` (beyond: the zero rows), where the cast to an integer is the floor and the
        fractional part is ``t``. (The group's first row is added to the integer: added to ``z``, it
        would cost ``t`` bits.)"""
        spline = self.spline
        _, _, scale, shift = self._constants(x)
        z = torch.addcmul(shift, x, scale)  # (x - a) / h + k + 1 in one op
        # A NaN input (weights that diverged) keeps its NaN value but needs a row: clamping keeps NaN,
        # whose cast to an integer indexes outside the table.
        z.nan_to_num_(nan=0.0).clamp_(0.0, float(spline.num_functions + spline.spline_order + 1))
        row = z.to(torch.int64)
        return row.add_(first_row), z.frac_()

    @staticmethod
    def _piece(t, e):
        """``sum_p e[p] t^p`` by Horner's rule: the spline part of phi_g, from the pieces ``e`` (k + 1
        tensors, the columns of the gathered table rows)."""
        value = e[-1]
        for c in e[-2::-1]:
            value = torch.addcmul(c, value, t)
        return value

    @staticmethod
    def _piece_slope(t, e):
        """``sum_p p e[p] t^(p-1)``, the derivative of :meth:`_piece` in ``t`` (divide by the grid step
        for the derivative in x), from the same pieces: ``e_1 + 2 t (e_2 + 3/2 t (e_3 + ...))``."""
        if len(e) < 2:
            return torch.zeros_like(t)
        slope = e[-1]
        for p in range(len(e) - 2, 0, -1):
            slope = torch.addcmul(e[p], slope, t, value=(p + 1) / p)
        return slope

    def _blocks(self, x):
        rows = max(1, self._BLOCK_ELEMENTS // x.shape[-1])
        return [slice(s, s + rows) for s in range(0, x.shape[0], rows)]

    def compiled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., 1, in): the features as ``torch.compile`` computes them (see
        :class:`_GroupedSplineFunction`); the same values as the basis's ``features``."""
        return _GroupedSplineFunction.apply(x, self.coefficients, self).unsqueeze(-2)

    def _values(self, x: torch.Tensor, coefficients: torch.Tensor, slopes: bool):
        """phi_g(x) of every input of ``x`` (..., in) from the piece table, and its derivative if asked."""
        table, linear, silu_weight, first_row = self._tables(coefficients, x)
        index, t = self._locate(x, first_row)
        e = table[index].unbind(-1)  # k + 1 of (..., in): the pieces of every input's interval
        value = self._piece(t, e) + linear * x + silu_weight * F.silu(x)
        if not slopes:
            return value, None
        sigmoid = torch.sigmoid(x)
        silu_slope = sigmoid * (1 + x * (1 - sigmoid))
        return value, self._piece_slope(t, e) / self.spline.step + linear + silu_weight * silu_slope

    def _phi_into(self, x, tables, out):
        """phi_g(x) of a (rows, in) block ``x`` written into ``out``; returns the row index, ``t``, the
        gathered pieces and ``silu(x)`` for the backward."""
        table, linear, a_silu, first_row = tables
        index, t = self._locate(x, first_row)
        e = F.embedding(index, table).unbind(-1)  # k + 1 of (rows, in): a row gather, fastest on CPU
        silu = F.silu(x)
        torch.addcmul(self._piece(t, e).addcmul_(x, linear), silu, a_silu, out=out)
        return index, t, e, silu

    def _inference_values(self, x: torch.Tensor) -> torch.Tensor:
        """phi_g(x) of every input of a 2-D ``x`` (tokens, in), already in the compute dtype, without
        autograd: what a decoding step needs, in the fewest ops (no output buffer, no blocks)."""
        with torch.no_grad():
            table, linear, a_silu, first_row = self._inference_tables(x)
            index, t = self._locate(x, first_row)
            value = self._piece(t, F.embedding(index, table).unbind(-1)).addcmul_(x, linear)
            return value.addcmul_(F.silu(x), a_silu)

    def _blocked_features_into(self, x, out):
        """phi_g(x) of ``x`` (..., in), already in the compute dtype, written into ``out`` (..., 1, in)
        block by block, from the piece table kept between calls."""
        with torch.no_grad():
            tables = self._inference_tables(x)
            x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
            if x2.numel() <= self._BLOCK_ELEMENTS:  # a decoding step: one block
                self._phi_into(x2, tables, out2)
                return out
            for rows in self._blocks(x2):
                self._phi_into(x2[rows], tables, out2[rows])
        return out

    def _blocked_features_and_grads(self, x, out, grad_out):
        """:meth:`_blocked_features_into` and, from d(loss)/d(features) ``grad_out`` (..., 1, in), the
        gradients of ``x`` and of the coefficients: ``(out, grad_x, (grad_coefficients,))``."""
        with torch.no_grad():
            tables = self._tables(self.coefficients, x)
            _, linear, a_silu, _ = tables
            k, bins = self.spline.spline_order, self.groups * self.rows
            x2, out2, g2 = (
                x.reshape(-1, x.shape[-1]),
                out.view(-1, x.shape[-1]),
                grad_out.reshape(-1, x.shape[-1]),
            )
            blocks = self._blocks(x2)
            grad_x = torch.empty_like(x2)
            # sum of grad * t^p per table row, one histogram per row of the block (a scatter along the
            # last dimension runs its rows in parallel; one shared histogram would run on one thread)
            histograms = x2.new_empty(len(x2[blocks[0]]), k + 1, bins)
            histogram = x2.new_zeros(k + 1, bins)
            term_sums = x2.new_zeros(2, x.shape[-1])  # sums of grad * x and grad * silu(x) per input
            for rows in blocks:
                xb, gb = x2[rows], g2[rows]
                index, t, e, silu = self._phi_into(xb, tables, out2[rows])
                grad = torch.ops.aten.silu_backward(gb * a_silu, xb).addcmul_(gb, linear)
                torch.addcmul(grad, gb, self._piece_slope(t, e), value=1 / self.spline.step, out=grad_x[rows])
                term_sums[0] += (gb * xb).sum(0)
                term_sums[1] += (gb * silu).sum(0)
                block = histograms[: len(xb)].zero_()
                weight = gb
                for p in range(k + 1):
                    block[:, p].scatter_add_(1, index, weight)
                    if p < k:
                        weight = weight * t
                histogram += block.sum(0)
            transform = self._constants(x)[0]
            grad_spline = torch.einsum(
                "pgr,jrp->gj", histogram.view(k + 1, self.groups, self.rows), transform
            )
            grad_a = torch.cat([term_sums.view(2, self.groups, -1).sum(-1).t(), grad_spline], 1)
        return out, grad_x.view(x.shape), (grad_a,)


class _GroupedSplineFunction(torch.autograd.Function):
    """Grouped B-spline values for ``torch.compile``: the value and its slope come from the piece
    table (a gather, which Inductor fuses as an indirect load); the gradient of the coefficients is a
    reduction of ``grad * term`` over the inputs of each group, with every B-spline written densely
    (the histogram of the eager path would become atomic adds). Saves ``x`` and the coefficients."""

    @staticmethod
    def forward(ctx, x, coefficients, basis):
        ctx.save_for_backward(x, coefficients)
        ctx.basis = basis
        return basis._values(x, coefficients, slopes=False)[0]

    @staticmethod
    def backward(ctx, grad):
        x, coefficients = ctx.saved_tensors
        basis = ctx.basis
        _, slope = basis._values(x, coefficients, slopes=True)
        shape = (*x.shape[:-1], basis.groups, basis.group_size)
        xg, gg = x.reshape(shape), grad.reshape(shape)
        dims = (*range(xg.dim() - 2), xg.dim() - 1)  # everything but the group
        terms = [xg, F.silu(xg), *basis.spline.each_function(xg)]
        grad_coefficients = torch.stack([(gg * term).sum(dims) for term in terms], 1)  # (G, 2 + K)
        return grad * slope, grad_coefficients.to(coefficients.dtype), None
