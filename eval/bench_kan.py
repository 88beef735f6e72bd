"""Benchmark a KAN feed-forward block against GPT-2's MLP at the same parameter count.

For GPT-2's MLP (d -> 4d -> d, GELU), kangpt's KAN blocks (parameter-matched): ``kan``, the default
design of ``KANGPT2Config()`` on the PyTorch path (``kan-triton``: on the fused Triton kernels),
``edge-<basis>`` (one function per edge, a narrower hidden layer),
``group-<basis>`` (functions shared by groups of inputs, as wide as the MLP) and ``rational``
(GR-KAN), and a naive KAN written here in the style of efficient-kan (Cox-de Boor recursion, autograd
keeps every intermediate), one run measures:

- time of one forward + backward (median over interleaved repeats, so machine noise hits all rows
  alike);
- bytes saved for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage
  once, parameters excluded);
- peak memory of one forward + backward above what was held before it: ``max_memory_allocated``
  on CUDA; on CPU the peak resident set size of a fresh process running one step (with
  ``--compile``, one step after compilation and warm-up; glibc is told to return large blocks at
  once, so the figure follows what tensors really hold).

Everything is printed as one table, with every figure also as a ratio to the MLP.

    python eval/bench_kan.py                       # d=768, 2048 tokens, fp32, CPU, eager
    python eval/bench_kan.py --compile             # the same under torch.compile
    python eval/bench_kan.py --device cuda --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kangpt.comparison.measure import (
    DTYPES,
    PeakMemory,
    SavedTensorBytes,
    autocast,
    interleaved_median_times,
    run_fresh_process,
)
from kangpt.comparison.models import ratio
from kangpt.configuration_kangpt import KANGPT2Config
from kangpt.kan import BASES, KANFeedForward, KANSpec, kan_block_hidden_size
from kangpt.kan_spec import GRIDLESS_BASES


class NaiveKANLinear(nn.Module):
    """A KAN layer as public KAN code writes it: B-splines by the Cox-de Boor recursion on an
    explicit knot tensor, base and spline terms as two matmuls, plain autograd (every intermediate
    of the recursion is kept for backward). Same parameter count as ``KANLinear``."""

    def __init__(self, in_features, out_features, grid_size=5, spline_order=3, grid_range=(-2.0, 2.0)):
        super().__init__()
        self.spline_order = spline_order
        h = (grid_range[1] - grid_range[0]) / grid_size
        knots = torch.arange(-spline_order, grid_size + spline_order + 1) * h + grid_range[0]
        self.register_buffer("grid", knots.expand(in_features, -1).contiguous())
        self.base_weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.spline_weight = nn.Parameter(
            0.1 * torch.randn(out_features, in_features, grid_size + spline_order) / in_features**0.5
        )
        self.bias = nn.Parameter(torch.zeros(out_features))

    def b_splines(self, x):  # (N, in) -> (N, in, K)
        g, x = self.grid, x.unsqueeze(-1)
        bases = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)
        for k in range(1, self.spline_order + 1):
            left = (x - g[:, : -(k + 1)]) / (g[:, k:-1] - g[:, : -(k + 1)]) * bases[..., :-1]
            right = (g[:, k + 1 :] - x) / (g[:, k + 1 :] - g[:, 1:-k]) * bases[..., 1:]
            bases = left + right
        return bases

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        spline = self.b_splines(x).flatten(1)
        y = F.linear(F.silu(x), self.base_weight, self.bias) + F.linear(spline, self.spline_weight.flatten(1))
        return y.view(*shape[:-1], -1)


BLOCKS = ["mlp", "kan", "kan-triton", *(f"edge-{b}" for b in BASES if b not in GRIDLESS_BASES),
          *(f"group-{b}" for b in BASES if b not in GRIDLESS_BASES), "rational", "naive-bspline"]


def kan_spec(name: str) -> KANSpec:
    """The functions of KAN block ``name`` (see ``BLOCKS``): KAN-GPT-2's, on the PyTorch path."""
    default = KANGPT2Config().kan_spec().replace(kernel="torch")
    if name == "kan":
        return default
    if name == "kan-triton":  # the default design on the fused Triton kernels
        return default.replace(kernel="triton")
    if name == "rational":
        return default.replace(basis="rational")
    sharing, _, basis = name.partition("-")
    return default.replace(basis=basis, sharing=sharing)


def build(name: str, d: int) -> nn.Module:
    """The block called ``name`` at width d, all with GPT-2's MLP parameter count (up to rounding)."""
    mlp_params = 8 * d * d + 5 * d
    if name == "mlp":
        return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
    if name == "naive-bspline":
        h = kan_block_hidden_size(d, d, mlp_params)
        return nn.Sequential(NaiveKANLinear(d, h), NaiveKANLinear(h, d))
    if name not in BLOCKS:
        raise ValueError(f"unknown block {name!r}; choose from {', '.join(BLOCKS)}")
    spec = kan_spec(name)
    return KANFeedForward(d, d, kan_block_hidden_size(d, d, mlp_params, spec=spec), spec=spec)


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` for the benchmark's fixed shapes. ``dynamic=False``: blocks of different
    bases share code, and Dynamo would otherwise turn a constant that differs between them (the
    grid step) into a symbolic input on the second compile."""
    return torch.compile(model, dynamic=False)


def saved_bytes(model, x, dtype) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once, parameters excluded)."""
    with SavedTensorBytes(model.parameters()) as saved, autocast(x.device, dtype):
        model(x).float().sum()
    return saved.bytes


def step(model, x, dtype):
    """One forward + backward of ``model`` on ``x`` (autocast to ``dtype``)."""
    with autocast(x.device, dtype):
        loss = model(x).float().pow(2).mean()
    loss.backward()


def peak_bytes(model, x, dtype) -> int:
    """Memory growth during one step: on CUDA in this process, on CPU only in a fresh one."""
    with PeakMemory(x.device) as peak:
        step(model, x, dtype)
    return peak.growth


def make_input(args, device):
    torch.manual_seed(args.seed)
    return torch.randn(args.tokens, args.width, device=device, requires_grad=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="fp32, or autocast to bf16/fp16 (fp32 parameters, as mixed precision trains)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="mlp,kan,edge-bspline,rational,naive-bspline",
                        help=f"comma-separated, mlp first, among {', '.join(BLOCKS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.models.split(",")[0] != "mlp":
        parser.error("--models must start with mlp (the reference of every ratio)")
    return args


def child_peak(args: argparse.Namespace) -> int:
    """In a fresh process: the peak bytes of one step of the block ``--peak-child`` on CPU."""
    dtype = DTYPES[args.dtype]
    x = make_input(args, torch.device("cpu"))
    model = build(args.peak_child, args.width)
    runner = compiled(model) if args.compile else model
    if args.compile:  # compile and warm up first, then measure a step that starts from no grads
        for _ in range(2):
            step(runner, x, dtype)
        model.zero_grad(set_to_none=True)
        x.grad = None
    return peak_bytes(runner, x, dtype)


def cpu_peak(args: argparse.Namespace, name: str) -> int:
    """Peak RSS of a fresh process running one step of block ``name`` (:func:`child_peak`)."""
    child = ["--peak-child", name, "--tokens", str(args.tokens), "--width", str(args.width),
             "--dtype", args.dtype, "--seed", str(args.seed), *(["--compile"] if args.compile else [])]
    printed = run_fresh_process([__file__, *child], peak_rss=True)
    return int(printed.strip().splitlines()[-1])


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Per block: parameters, bytes saved for backward, peak bytes and the median fwd+bwd time."""
    dtype, names = DTYPES[args.dtype], args.models.split(",")
    x = make_input(args, device)
    models = {n: build(n, args.width).to(device) for n in names}
    runners = {n: (compiled(m) if args.compile else m) for n, m in models.items()}
    rows = {n: {"params": sum(p.numel() for p in m.parameters())} for n, m in models.items()}
    for n, m in runners.items():
        for _ in range(2):  # warm-up (and compilation)
            step(m, x, dtype)
        rows[n]["saved"] = saved_bytes(m, x, dtype)
        rows[n]["peak"] = peak_bytes(m, x, dtype) if device.type == "cuda" else None
    steps = {n: partial(step, m, x, dtype) for n, m in runners.items()}
    times = interleaved_median_times(steps, args.repeats, device, warmup=0)
    for n in names:
        rows[n]["time"] = times[n]
        if device.type == "cpu":
            rows[n]["peak"] = cpu_peak(args, n)
    return rows


def print_table(args: argparse.Namespace, device: torch.device, rows: dict[str, dict]) -> None:
    ref = rows["mlp"]
    peak_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of a fresh process"
    print(f"# KAN block vs GPT-2 MLP: d={args.width}, tokens={args.tokens}, {args.dtype}, {device}, "
          f"{'torch.compile' if args.compile else 'eager'}, threads={torch.get_num_threads()}, "
          f"median of {args.repeats}; peak = {peak_kind}")
    print("| block | params | fwd+bwd ms | x MLP | saved for bwd MB | x MLP | peak MB | x MLP |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:.1f}"
        # A tiny block's step can grow a warm process by no page at all: no ratio to a zero reference.
        peak_ratio = ratio(r["peak"], ref["peak"])
        peak_ratio = "n/a" if peak_ratio is None else f"{peak_ratio:.2f}"
        print(f"| {n} | {r['params']:,} | {r['time'] * 1e3:.1f} | {r['time'] / ref['time']:.2f} | "
              f"{r['saved'] / 2**20:.1f} | {r['saved'] / ref['saved']:.3f} | {peak} | {peak_ratio} |")


def main(argv=None):
    args = parse_args(argv)
    if args.peak_child:  # a fresh process measuring one step of one block (CPU peak RSS)
        print(child_peak(args))
        return
    device = torch.device(args.device)
    rows = measure(args, device)
    print_table(args, device, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
