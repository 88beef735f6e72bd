"""Benchmark a KAN feed-forward block against GPT-2's MLP at the same parameter count.

For GPT-2's MLP (d -> 4d -> d, GELU), kangpt's KAN block for each basis (parameter-matched), and a
naive KAN written here in the style of efficient-kan (Cox-de Boor recursion, autograd keeps every
intermediate), one run measures:

- time of one forward + backward (median over interleaved repeats, so machine noise hits all rows
  alike);
- bytes saved for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage
  once, parameters excluded);
- peak memory of one forward + backward above what was held before it: ``max_memory_allocated``
  on CUDA; on CPU the peak resident set size of a fresh process running one step (glibc is told to
  return large blocks at once, so the figure follows what tensors really hold).

Everything is printed as one table, with every figure also as a ratio to the MLP.

    python eval/bench_kan.py                       # d=768, 2048 tokens, fp32, CPU, eager
    python eval/bench_kan.py --compile             # the same under torch.compile
    python eval/bench_kan.py --device cuda --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from kangpt.kan import BASES, KANFeedForward, kan_block_hidden_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def build(name: str, d: int) -> nn.Module:
    """The block called ``name`` at width d, all with GPT-2's MLP parameter count (up to rounding)."""
    mlp_params = 8 * d * d + 5 * d
    if name == "mlp":
        return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
    if name == "naive-bspline":
        h = kan_block_hidden_size(d, d, mlp_params)
        return nn.Sequential(NaiveKANLinear(d, h), NaiveKANLinear(h, d))
    h = kan_block_hidden_size(d, d, mlp_params, basis=name)
    return KANFeedForward(d, d, h, basis=name)


def saved_bytes(model, x, autocast) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(x).float().sum()
    return sum(seen.values())


def step(model, x, autocast):
    with autocast():
        loss = model(x).float().pow(2).mean()
    loss.backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes_cuda(model, x, autocast) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(model, x, autocast)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_bytes_cpu_child(args, name) -> int:
    """Run one step of ``name`` in a fresh process and return its peak RSS growth in bytes."""
    cmd = [
        sys.executable,
        __file__,
        "--peak-child",
        name,
        "--tokens",
        str(args.tokens),
        "--width",
        str(args.width),
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def make_inputs(args, device):
    torch.manual_seed(args.seed)
    x = torch.randn(args.tokens, args.width, device=device, requires_grad=True)
    dtype = DTYPES[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    return x, autocast


def peak_child(args):
    """Child process: one warm-free step of one block, print peak RSS growth (bytes)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device("cpu")
    x, autocast = make_inputs(args, device)
    model = build(args.peak_child, args.width)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = rss_bytes()
    step(model, x, autocast)
    print(max(0, peak_rss_bytes() - before))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="fp32, or autocast to bf16/fp16 (fp32 parameters, as in mixed-precision training)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default=",".join(["mlp", *BASES, "naive-bspline"]))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        return peak_child(args)

    device = torch.device(args.device)
    names = args.models.split(",")
    if names[0] != "mlp":
        parser.error("--models must start with mlp (the reference of every ratio)")
    x, autocast = make_inputs(args, device)
    models = {n: build(n, args.width).to(device) for n in names}
    runners = {n: (torch.compile(m) if args.compile else m) for n, m in models.items()}

    rows = {n: {"params": sum(p.numel() for p in m.parameters())} for n, m in models.items()}
    for n, m in runners.items():
        for _ in range(2):  # warm-up (and compilation)
            step(m, x, autocast)
        rows[n]["saved"] = saved_bytes(m, x, autocast)
        if device.type == "cuda":
            rows[n]["peak"] = peak_bytes_cuda(m, x, autocast)
    times = {n: [] for n in names}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every row alike
        for n, m in runners.items():
            sync(device)
            t0 = time.perf_counter()
            step(m, x, autocast)
            sync(device)
            times[n].append(time.perf_counter() - t0)
    for n in names:
        rows[n]["time"] = statistics.median(times[n])
        if device.type == "cpu":
            rows[n]["peak"] = None if args.compile else peak_bytes_cpu_child(args, n)

    ref = rows["mlp"]
    peak_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of a fresh process"
    print(
        f"# KAN block vs GPT-2 MLP: d={args.width}, tokens={args.tokens}, {args.dtype}, {device}, "
        f"{'torch.compile' if args.compile else 'eager'}, threads={torch.get_num_threads()}, "
        f"median of {args.repeats}; peak = {peak_kind}"
    )
    print("| block | params | fwd+bwd ms | x MLP | saved for bwd MB | x MLP | peak MB | x MLP |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:.1f}"
        peak_ratio = "n/a" if r["peak"] is None else f"{r['peak'] / ref['peak']:.2f}"
        print(
            f"| {n} | {r['params']:,} | {r['time'] * 1e3:.1f} | {r['time'] / ref['time']:.2f} | "
            f"{r['saved'] / 2**20:.1f} | {r['saved'] / ref['saved']:.3f} | {peak} | {peak_ratio} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
