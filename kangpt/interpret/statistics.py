"""Statistics of every KAN layer over sample tokens: the moments of its features and outputs, and
sample inputs (see :class:`LayerStats`); and the token blocks to inspect a model with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import DataError, load_documents, pack_documents
from ..kan import KANLinear

_F64 = torch.float64
_FEATURE_CHUNK = 1 << 22  # feature elements per chunk when accumulating statistics


@dataclass
class LayerStats:
    """Statistics of one KAN layer over sample tokens (on the CPU).

    Attributes:
        tokens: number of tokens seen.
        feature_mean: (in, F) float64 mean of every input's features.
        feature_cov: (in, F, F) float64 covariance of every input's features (population).
        output_var: (out,) float64 variance of every output.
        samples: (S, in) float32 inputs of S randomly chosen tokens (for plots and fits).
    """

    tokens: int
    feature_mean: torch.Tensor
    feature_cov: torch.Tensor
    output_var: torch.Tensor
    samples: torch.Tensor


class _Accumulator:
    """Running sums of one layer's features and outputs, in float64 on the layer's device."""

    def __init__(self, layer: KANLinear):
        self.layer = layer
        self.tokens = 0
        n_in, n_out, n_feat = layer.in_features, layer.out_features, layer.num_features
        factory = {"device": layer.weight.device, "dtype": _F64}
        self.f_sum = torch.zeros(n_in, n_feat, **factory)
        self.ff_sum = torch.zeros(n_in, n_feat, n_feat, **factory)
        self.y_sum = torch.zeros(n_out, **factory)
        self.yy_sum = torch.zeros(n_out, **factory)
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> None:
        """Add tokens: inputs x (n, in), outputs y (n, out); rows where ``keep`` (n,) is set are sampled."""
        x = x.detach()
        chunk = max(1, _FEATURE_CHUNK // (self.layer.in_features * self.layer.num_features))
        for s in range(0, len(x), chunk):
            feats = self.layer.basis.features(x[s : s + chunk].to(_F64)).transpose(1, 2)  # (n, in, F)
            self.f_sum += feats.sum(0)
            self.ff_sum += torch.einsum("nif,nig->ifg", feats, feats)
        y = y.detach().to(_F64)
        self.y_sum += y.sum(0)
        self.yy_sum += (y * y).sum(0)
        self.tokens += len(x)
        self.samples.append(x[keep].float().cpu())

    def result(self) -> LayerStats:
        n = max(self.tokens, 1)
        mean = self.f_sum / n
        cov = self.ff_sum / n - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        y_mean = self.y_sum / n
        return LayerStats(
            tokens=self.tokens,
            feature_mean=mean.cpu(),
            feature_cov=cov.cpu(),
            output_var=(self.yy_sum / n - y_mean * y_mean).clamp(min=0).cpu(),
            samples=torch.cat(self.samples),
        )


def _sample_mask(n: int, samples: int, seed: int) -> torch.Tensor:
    """(n,) bool: ``samples`` positions chosen at random (all when n <= samples)."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]] = True
    return keep


def layer_statistics(layer: KANLinear, x: torch.Tensor, *, samples: int = 2048, seed: int = 0) -> LayerStats:
    """Statistics of a single KAN layer on inputs ``x`` (..., in); see :class:`LayerStats`."""
    x = x.reshape(-1, layer.in_features).to(layer.weight.device)
    acc = _Accumulator(layer)
    with torch.no_grad():
        acc.update(x, layer(x), _sample_mask(len(x), samples, seed).to(x.device))
    return acc.result()


def kan_layers(model: nn.Module) -> dict[tuple[int, int], KANLinear]:
    """The KAN layers of a KAN-GPT-2 model (LM head or bare), keyed by ``(block, layer)``."""
    config = getattr(model, "config", None)
    if getattr(config, "ffn_type", None) != "kan":
        raise ValueError(f"the model has no KAN blocks (ffn_type={getattr(config, 'ffn_type', None)!r})")
    base = getattr(model, "transformer", model)
    return {(b, i): layer for b, block in enumerate(base.h) for i, layer in enumerate(block.mlp.layers)}


@torch.no_grad()
def collect_statistics(
    model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, samples: int = 2048, seed: int = 0
) -> dict[tuple[int, int], LayerStats]:
    """Run token blocks ``input_ids`` (N, T) through ``model`` (in eval mode) and return the
    :class:`LayerStats` of every KAN layer, keyed by ``(block, layer)``.

    The same ``samples`` tokens (drawn with ``seed``) are kept as sample inputs of every layer.
    """
    layers = kan_layers(model)
    device = next(model.parameters()).device
    keep = _sample_mask(input_ids.numel(), samples, seed).view(input_ids.shape)
    accumulators = {key: _Accumulator(layer) for key, layer in layers.items()}
    batch_keep: list[torch.Tensor] = []  # the current batch's sample mask, flattened

    def hook(key):
        def record(module, args, output):
            x = args[0].reshape(-1, module.in_features)
            accumulators[key].update(x, output.reshape(-1, module.out_features), batch_keep[0])

        return record

    handles = [layer.register_forward_hook(hook(key)) for key, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(input_ids), batch_size):
            batch_keep[:] = [keep[s : s + batch_size].reshape(-1).to(device)]
            model(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: acc.result() for key, acc in accumulators.items()}


def sample_blocks(tokenizer, block_size: int, *, text_file: str | Path | None = None) -> torch.Tensor:
    """Token blocks (N, block_size) to inspect a model with.

    Default: the validation documents of the standard-library corpus (``load_documents("stdlib")``);
    with ``text_file``, that file's text as one document. Packed by :func:`kangpt.data.pack_documents`.
    """
    if text_file is None:
        _, docs = load_documents("stdlib")
    else:
        path = Path(text_file).expanduser()
        try:
            docs = [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read text file {str(text_file)!r}: {err}") from err
    return torch.tensor(pack_documents(docs, tokenizer, block_size)["input_ids"])
