"""Turn a pretrained GPT-2 into a KAN-GPT-2 whose KAN blocks already do what GPT-2's MLPs did.

GPT-2's MLP is ``y = W2 gelu(W1 x + b1) + b2`` on the output ``x`` of ``ln_2``. Embeddings, attention and
layer norms are copied; each MLP becomes a KAN block in one of two ways:

- **Keep the linear maps** (grouped layers as wide as the MLP, ``kan_sharing="group"`` or the
  ``rational`` basis): ``W1, b1`` and ``W2, b2`` are copied into the two KAN layers, and the group
  functions are fitted, by least squares on the values the block's inputs take on a calibration
  corpus, to the identity (first layer) and to GPT-2's activation (second layer). The converted
  model then computes GPT-2's logits up to the fit error.
- **Distil** (per-edge layers, any width): on activations recorded from the calibration corpus
  (``ln_2``'s output -> the MLP's output), the first KAN layer is fitted by least squares (its basis
  is fixed, so its coefficients are a linear problem) to the leading principal components of GPT-2's
  hidden activations, scaled to unit variance, the second layer to the MLP's output from the first
  layer's, then both are refined together for a few optimisation steps on the block's squared error.

Every block reports its relative error on held-out calibration tokens,
``||KAN(x) - MLP(x)|| / ||MLP(x) - mean||``::

    model, report = convert_gpt2(gpt2, calibration_ids)        # a KANGPT2LMHeadModel and the errors
    model, report = convert_gpt2(gpt2, ids, kan_sharing="edge")  # per-edge blocks, distilled
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..configuration_kangpt import KANGPT2Config
from ..kan import KANLinear
from ..kan_bases import GroupedBasis, RationalBasis
from ..kan_spec import GRIDLESS_BASES
from ..messages import first_line

_FIT_VALUES = 1 << 16  # values of each group's inputs a function is fitted on (a random sample)
_PRE_TOKENS = 4096  # tokens whose MLP pre-activations (4 x d each) are kept per block
_HELD_OUT = 0.1  # fraction of the recorded tokens held out to measure every block's error


@dataclass
class ConversionReport:
    """What a conversion did: per block, its method and relative error on held-out tokens."""

    method: str  # "fit" (linear maps kept, functions fitted) or "distil"
    blocks: list[dict] = field(default_factory=list)
    tokens: int = 0  # calibration tokens recorded
    grid: dict = field(default_factory=dict)  # the grid range and size of the converted model
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "blocks": self.blocks, "tokens": self.tokens, "grid": self.grid,
                "seconds": self.seconds}


def keeps_linear_maps(config: KANGPT2Config) -> bool:
    """Whether a KAN block of ``config`` is GPT-2's MLP with learnable functions: grouped layers,
    ``n_embd -> n_inner -> n_embd``."""
    inner = config.n_inner or 4 * config.n_embd
    widths = {config.kan_hidden_size_of_layer(b) for b in range(config.n_layer)}
    grouped = config.kan_spec().grouped
    return grouped and widths == {inner}


@torch.no_grad()
def record_mlp_io(gpt2: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """Run ``gpt2`` (a ``GPT2LMHeadModel``) over token blocks (N, T) and return, per block, the MLP's
    input ``x`` (the output of ``ln_2``) and output ``y``, (N * T, d) fp32 each, and its
    pre-activation ``pre = c_fc(x)`` on the first ``_PRE_TOKENS`` tokens (fp32)."""
    records = [{"x": [], "pre": [], "y": []} for _ in gpt2.transformer.h]
    hooks = []
    for record, block in zip(records, gpt2.transformer.h, strict=True):
        def keep(module, args, output, record=record):
            record["x"].append(args[0].flatten(0, -2).float().cpu())
            record["y"].append(output.flatten(0, -2).float().cpu())

        def keep_pre(module, args, output, record=record):
            room = _PRE_TOKENS - sum(len(t) for t in record["pre"])
            record["pre"].append(output.flatten(0, -2)[: max(room, 0)].float().cpu())

        hooks += [block.mlp.register_forward_hook(keep), block.mlp.c_fc.register_forward_hook(keep_pre)]
    was_training = gpt2.training
    gpt2.eval()
    try:
        device = next(gpt2.parameters()).device
        for s in range(0, len(input_ids), batch_size):
            gpt2(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        gpt2.train(was_training)
    return [{k: torch.cat(v) for k, v in record.items()} for record in records]


def covering_grid(records: list[dict], grid_size: int, coverage: float = 0.999) -> dict:
    """``kan_grid_range`` covering the central ``coverage`` of every block's recorded inputs and
    pre-activations (the wider of the two ends, rounded out to 0.5), and a ``kan_grid_size`` that
    keeps the default grid's spacing there (at least ``grid_size``)."""
    low, high = math.inf, -math.inf
    generator = torch.Generator().manual_seed(0)
    for record in records:
        for values in (record["x"], record["pre"]):
            values = values.flatten()
            values = values[torch.randint(0, len(values), (min(len(values), 1 << 20),), generator=generator)]
            q = torch.quantile(values.double(), torch.tensor([1 - coverage, coverage], dtype=torch.float64))
            low, high = min(low, q[0].item()), max(high, q[1].item())
    low, high = math.floor(min(low, -1.0) * 2) / 2, math.ceil(max(high, 1.0) * 2) / 2
    default = KANGPT2Config.kan_grid_range
    spacing = (default[1] - default[0]) / KANGPT2Config.kan_grid_size
    return {"kan_grid_range": [low, high], "kan_grid_size": max(grid_size, math.ceil((high - low) / spacing))}


def fit_group_functions(layer: KANLinear, target, inputs: torch.Tensor, steps: int = 300) -> float:
    """Fit every group function of a grouped ``layer`` to ``target`` on the values ``inputs`` (n, in)
    that its group's inputs take; return the largest RMS error over the groups.

    Grouped spline layers: linear least squares on their terms (exact optimum). Rational layers: the
    linearised least-squares fit ``P - target * Q = target``, refined by Adam on the squared error.
    """
    basis = layer.basis
    if not isinstance(basis, (GroupedBasis, RationalBasis)):
        raise ValueError(f"{layer!r} has no group functions (kan_sharing='edge')")
    size = layer.in_features // basis.groups
    errors = []
    for g in range(basis.groups):
        values = inputs[:, g * size : (g + 1) * size].flatten().double()
        keep = torch.randperm(len(values), generator=torch.Generator().manual_seed(g))[:_FIT_VALUES]
        x = torch.cat([values[keep], values.min().view(1), values.max().view(1)])  # the extremes too
        y = target(x)
        if isinstance(basis, GroupedBasis):
            terms = basis.terms(x)  # (P, 2 + K); B-splines that no value reaches are all-zero columns
            gram = terms.t() @ terms
            gram.diagonal().add_(1e-9 * gram.diagonal().mean())  # keeps those coefficients at zero
            coefficients = torch.linalg.solve(gram, terms.t() @ y)
            with torch.no_grad():
                basis.coefficients[g] = coefficients.to(basis.coefficients)
            fitted = terms @ coefficients
        else:
            fitted = _fit_rational(basis, g, x, y, steps)
        errors.append((fitted - y).square().mean().sqrt().item())
    return max(errors)


def _fit_rational(basis: RationalBasis, g: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Fit group ``g`` of a rational basis to ``y`` at ``x`` (fp64); return the fitted values.

    Two linear starts, the better kept: the polynomial alone (``Q = 0``: exact for the identity, where
    the linearised system is degenerate) and the linearised fit ``P - y Q = y``; then Adam on the
    squared error, on a subsample of the points.
    """
    m, n = basis.order
    powers = torch.stack([x**p for p in range(max(m, n) + 1)], -1)  # (P, max + 1)
    polynomial = torch.linalg.lstsq(powers[:, : m + 1], y.unsqueeze(-1)).solution.squeeze(-1)
    design = torch.cat([powers[:, : m + 1], -y.unsqueeze(-1) * powers[:, 1 : n + 1]], -1)
    linearised = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
    starts = [(polynomial, torch.zeros(n, dtype=x.dtype)), (linearised[: m + 1], linearised[m + 1 :])]

    def rational(numerator, denominator, points):
        p = points.unsqueeze(-1) ** torch.arange(max(m, n) + 1, dtype=points.dtype)
        return (p[:, : m + 1] @ numerator) / (1 + (p[:, 1 : n + 1] @ denominator).abs())

    def error(numerator, denominator):
        return (rational(numerator, denominator, x) - y).square().mean()

    numerator, denominator = (t.clone().requires_grad_() for t in min(starts, key=lambda s: error(*s)))
    scale = y.square().mean().clamp(min=1e-12)
    if error(numerator, denominator) > 1e-10 * scale:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(g))[:4096]
        optimizer = torch.optim.Adam([numerator, denominator], lr=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (rational(numerator, denominator, x[pick]) - y[pick]).square().mean() / scale
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        basis.numerator[g] = numerator.detach().to(basis.numerator)
        basis.denominator[g] = denominator.detach().to(basis.denominator)
        return rational(numerator, denominator, x)


def relative_error(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """``||predicted - target|| / ||target - mean(target)||`` over all rows and columns."""
    centred = target - target.mean(0)
    return ((predicted - target).norm() / centred.norm().clamp(min=1e-12)).item()


def convert_block_keeping_linear_maps(block: nn.Module, mlp: nn.Module, record: dict, activation) -> dict:
    """Copy GPT-2's ``c_fc``/``c_proj`` into the KAN block and fit its functions (identity, activation)."""
    first, second = block.layers
    with torch.no_grad():
        first.weight.copy_(mlp.c_fc.weight.t())  # Conv1D keeps (in, out)
        first.bias.copy_(mlp.c_fc.bias)
        second.weight.copy_(mlp.c_proj.weight.t())
        second.bias.copy_(mlp.c_proj.bias)
    fits = [fit_group_functions(first, lambda x: x, record["x"]),
            fit_group_functions(second, lambda x: activation(x), record["pre"])]
    return {"function_rms_error": fits}


def distil_block(block: nn.Module, record: dict, activation, steps: int, lr: float = 1e-3,
                 ridge: float = 1e-6) -> None:
    """Distil an MLP into a per-edge KAN ``block`` from its recorded inputs ``x``, outputs ``y`` (n, d)
    and pre-activations ``pre`` (first rows): least squares layer by layer (the first layer to the
    leading principal components of the MLP's hidden activations, scaled to unit variance, the second
    to ``y``), then ``steps`` Adam steps on the block's squared error."""
    layers, x, y = list(block.layers), record["x"], record["y"]
    if len(layers) == 2:
        hidden = activation(record["pre"].double())  # (m, inner), m <= n
        mean = hidden.mean(0)
        _, _, v = torch.linalg.svd(hidden - mean, full_matrices=False)
        directions = v[: layers[0].out_features].t()  # (inner, h)
        components = (hidden - mean) @ directions
        scale = components.std(0).clamp(min=1e-6)
        m = len(hidden)
        _least_squares(layers[0], x[:m], components / scale, ridge)
        inputs = layers[0](x).detach()
    else:
        inputs = x
    _least_squares(layers[-1], inputs, y.double(), ridge)
    if steps:
        optimizer = torch.optim.Adam(block.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(0)
        batch = min(len(x), 1024)
        scale = (y - y.mean(0)).square().mean()
        for _ in range(steps):
            pick = torch.randint(0, len(x), (batch,), generator=generator)
            loss = (block(x[pick]) - y[pick]).square().mean() / scale
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _least_squares(layer: KANLinear, x: torch.Tensor, target: torch.Tensor, ridge: float) -> None:
    """Set a per-edge layer's weight and bias to the ridge least-squares fit of ``target`` (n, out)
    from its features of ``x`` (n, in); the basis is fixed, so this is a linear problem."""
    with torch.no_grad():
        feats = layer.basis.features(x.double()).flatten(1)  # (n, F * in)
        design = torch.cat([feats, feats.new_ones(len(feats), 1)], 1)
        gram = design.t() @ design
        gram.diagonal().add_(ridge * gram.diagonal().mean())
        solution = torch.linalg.solve(gram, design.t() @ target.double())  # (F * in + 1, out)
        layer.weight.copy_(solution[:-1].t().to(layer.weight))
        layer.bias.copy_(solution[-1].to(layer.bias))


def convert_gpt2(gpt2: nn.Module, calibration_ids: torch.Tensor, *, steps: int = 200, progress=None,
                 **config_overrides) -> tuple[nn.Module, ConversionReport]:
    """A KAN-GPT-2 whose KAN blocks reproduce ``gpt2``'s MLPs (see the module docstring).

    Args:
        gpt2: a ``transformers.GPT2LMHeadModel``.
        calibration_ids: token blocks (N, T) whose activations the blocks are fitted on; a tenth of
            the tokens is kept apart to measure each block's error.
        steps: Adam steps of every distilled block after its least-squares start (per-edge blocks).
        progress: a function wrapping the iterable of blocks (e.g. ``tqdm``), for a progress bar.
        config_overrides: ``KANGPT2Config`` fields (the KAN design); GPT-2's shape cannot change.
    """
    from ..modeling_kangpt import KANGPT2LMHeadModel

    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0:
        raise ValueError(f"calibration_ids must be non-empty token blocks (N, T), got shape "
                         f"{tuple(calibration_ids.shape)}")
    if steps < 0:  # range(steps) would quietly run none
        raise ValueError(f"steps must be >= 0, got {steps}")
    start = time.perf_counter()
    records = record_mlp_io(gpt2, calibration_ids)
    design = {**config_overrides}
    basis = design.get("kan_basis", KANGPT2Config.kan_basis)
    if "kan_grid_range" not in design and basis not in GRIDLESS_BASES:
        design.update(covering_grid(records, design.get("kan_grid_size", KANGPT2Config.kan_grid_size)))
    model = KANGPT2LMHeadModel.from_gpt2(gpt2, **design)
    keep = keeps_linear_maps(model.config)
    report = ConversionReport("fit" if keep else "distil")
    report.tokens = calibration_ids.numel()
    report.grid = {"range": model.config.kan_grid_range, "size": model.config.kan_grid_size}
    activation = ACT2FN[gpt2.config.activation_function]
    blocks = list(zip(model.transformer.h, gpt2.transformer.h, records, strict=True))
    for index, (block, gpt2_block, record) in enumerate(progress(blocks) if progress else blocks):
        n = len(record["x"])
        held = max(1, math.ceil(_HELD_OUT * n)) if n > 1 else 0
        fit = {key: value[: n - held] if held else value for key, value in record.items()}
        kan, mlp = block.mlp, gpt2_block.mlp
        if keep:
            entry = convert_block_keeping_linear_maps(kan, mlp, fit, activation)
        else:
            distil_block(kan, fit, activation, steps)
            entry = {}
        check = slice(n - held, n) if held else slice(0, n)
        with torch.no_grad():
            entry["relative_error"] = relative_error(kan(record["x"][check]), record["y"][check])
        report.blocks.append({"block": index, **entry})
    model.to(dtype=next(gpt2.parameters()).dtype)
    report.seconds = time.perf_counter() - start
    return model, report


def load_gpt2(source: str):
    """``(GPT2LMHeadModel, tokenizer)`` from a local folder or hub name: a GPT-2, or a KAN-GPT-2 with
    GPT-2's MLP (``ffn_type="mlp"``, e.g. trained by ``train.py --model.ffn_type=mlp``), whose weights
    have GPT-2's names. ValueError when it is neither."""
    from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from ..modeling_kangpt import GPT2_FIELDS, KANGPT2LMHeadModel

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load {source!r}: {first_line(err)}") from err
    gpt2_twin = config.model_type == KANGPT2Config.model_type and config.ffn_type == "mlp"
    if config.model_type != "gpt2" and not gpt2_twin:
        kind = f"a KAN-GPT-2 with ffn_type={config.ffn_type!r}" if config.model_type == "kangpt2" else (
            f"its model_type is {config.model_type!r}")
        raise ValueError(f"{source!r} is not a GPT-2 ({kind})")
    try:
        if gpt2_twin:
            twin = KANGPT2LMHeadModel.from_pretrained(source)
            model = GPT2LMHeadModel(GPT2Config(**{name: getattr(config, name) for name in GPT2_FIELDS}))
            model.load_state_dict(twin.state_dict())  # the same names and shapes
        else:
            model = GPT2LMHeadModel.from_pretrained(source, config=config)
        return model.eval(), AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the GPT-2 in {source!r}: {first_line(err)}") from err


__all__ = ["ConversionReport", "convert_gpt2", "fit_group_functions", "keeps_linear_maps", "load_gpt2",
           "record_mlp_io"]
