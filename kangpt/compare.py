"""KAN-GPT-2 side by side with the original GPT-2: parameters, memory and speed.

    python eval/compare.py                      # parameters of GPT-2 small..XL; memory and speed of
                                                # the CPU-sized "mini" shape (4 layers, d=256)
    python eval/compare.py --size small --device cuda --dtype bf16 --batch 8 --seq-len 1024
    kangpt compare ...                          # the same program

Four models of each shape are compared:

- ``gpt2``: transformers' own ``GPT2LMHeadModel``, the reference of every ratio;
- ``kan``: KAN-GPT-2 as ``KANGPT2Config()`` builds it (``--basis`` changes its basis), its KAN block
  **parameter-matched** to GPT-2's MLP (within 1%);
- ``kan-edge``: KAN-GPT-2 with one B-spline function per edge (the KAN paper's layer),
  parameter-matched, so its hidden layer is narrower than the MLP's;
- ``kan-edge-wide``: the same **at the MLP's width**, ``d -> 4d -> d`` (about 9x the MLP's parameters:
  what KAN-GPTs that keep the width cost).

What each figure is:

1. Parameters by part (embeddings, the LM head being tied to them; attention; feed-forward; layer
   norms; total) for GPT-2 small, medium, large, XL and the chosen size: *counted* on models built
   on the meta device (no memory is allocated).
2. Memory at the chosen size, batch and sequence length, each model in a *fresh process*:
   bytes saved for backward by one training forward (*measured* with ``saved_tensors_hooks``, each
   storage once, parameters excluded); parameters + gradients + AdamW state (*counted* from the
   tensors after a step: 16 bytes per parameter in fp32, plus AdamW's 4-byte step counter per
   tensor); the peak of one training step (forward, backward, AdamW step) and of generation
   (prefill + cached decode): ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS
   above its RSS after start-up on CPU (*measured*).
3. Speed at the same settings, all models in one process: training tokens/s and cached-generation
   tokens/s, median over repeats interleaved across the models (*measured*).
4. Peak memory of a training step and of generation for GPT-2 and the default KAN-GPT-2 at small,
   medium, large and XL (``--estimate-*``, bf16, batch 8 x 1024 by default), *estimated* without
   allocating (``kangpt.memory_estimate``: fake tensors and torch's ``MemTracker``), and at the
   measured size too, so that the estimate can be checked against the measurement.

Training runs with fp32 weights under autocast to ``--dtype`` (mixed precision, as ``train.py``
does); generation casts the weights to ``--dtype``. Output: markdown tables on stdout, ``compare.json``
and bar charts ``parameters.png``, ``memory.png``, ``speed.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from .cli import CommandError, command
from .configuration_kangpt import KANGPT2Config
from .kan import BASES, triton_kernels_apply
from .measure import (
    DTYPES,
    MiB,
    PeakMemory,
    SavedTensorBytes,
    autocast,
    interleaved_median_times,
    rss_bytes,
    run_fresh_process,
    training_state_bytes,
)
from .modeling_kangpt import KANGPT2LMHeadModel
from .plotting import new_figure
from .report import parameter_counts

# Shapes. The GPT-2 ones are OpenAI's (vocabulary 50257, 1024 positions); "mini" is GPT-2 scaled
# down to CPU size (head width 64 as in GPT-2, the project's 4096-token BPE), "tiny" is for tests.
SHAPES = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "n_positions": 256},
    "mini": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 4096, "n_positions": 1024},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "n_positions": 1024},
    "large": {"n_layer": 36, "n_embd": 1280, "n_head": 20, "vocab_size": 50257, "n_positions": 1024},
    "xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25, "vocab_size": 50257, "n_positions": 1024},
}
GPT2_SIZES = ("small", "medium", "large", "xl")
MODELS = {
    "gpt2": "GPT-2 (transformers)",
    "kan": "KAN-GPT-2 (default), parameter-matched",
    "kan-edge": "KAN-GPT-2, per-edge B-spline, parameter-matched",
    "kan-edge-wide": "KAN-GPT-2, per-edge B-spline, MLP width",
}
PARTS = ("embeddings", "attention", "feed-forward", "layer norms", "total")
# Targets for the parameter-matched KAN-GPT-2 against GPT-2 (reported, never asserted).
TARGETS = {"train_step_s": ("<=", 1.3), "saved_bytes": ("<=", 1.0), "generate_tokens_per_s": (">=", 0.8)}
# Settings a child process needs to measure one model.
CHILD_KEYS = (
    "size",
    "n_layer",
    "n_embd",
    "n_head",
    "vocab_size",
    "basis",
    "device",
    "dtype",
    "batch",
    "seq_len",
    "prompt_len",
    "new_tokens",
    "dropout",
    "attn",
    "seed",
    "threads",
)


# ----------------------------------------------------------------------------------------------
# Models


def shape_of(args) -> dict:
    """The chosen shape: ``SHAPES[args.size]`` with the ``--n-layer``/``--n-embd``/... overrides."""
    shape = dict(SHAPES[args.size])
    for key in ("n_layer", "n_embd", "n_head", "vocab_size"):
        if getattr(args, key, None) is not None:
            shape[key] = getattr(args, key)
    return shape


def model_config(name: str, shape: dict, basis: str | None = None, dropout: float = 0.0, attn: str = "sdpa"):
    """Config of model ``name`` (see ``MODELS``) at ``shape``; the last token is BOS/EOS as in GPT-2.
    ``basis`` replaces the default basis of ``kan`` (None: keep it)."""
    common = {
        **shape,
        "bos_token_id": shape["vocab_size"] - 1,
        "eos_token_id": shape["vocab_size"] - 1,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "attn_implementation": attn,
    }
    if name == "gpt2":
        return GPT2Config(**common)
    if name == "kan":
        return KANGPT2Config(**common, ffn_type="kan", **({"kan_basis": basis} if basis else {}))
    edge = {**common, "ffn_type": "kan", "kan_basis": "bspline", "kan_sharing": "edge"}
    if name == "kan-edge":
        return KANGPT2Config(**edge)
    if name == "kan-edge-wide":
        return KANGPT2Config(**edge, kan_hidden_size=shape.get("n_inner") or 4 * shape["n_embd"])
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def build_model(name: str, shape: dict, device: str = "meta", **config_kwargs) -> torch.nn.Module:
    """Model ``name`` built directly on ``device`` (``"meta"``: shapes only, no memory)."""
    config = model_config(name, shape, **config_kwargs)
    cls = GPT2LMHeadModel if name == "gpt2" else KANGPT2LMHeadModel
    with torch.device(device):
        return cls(config)


def parameter_table(sizes: list[str], shapes: dict[str, dict], basis: str) -> dict:
    """``{size: {model: {part: count, ..., "ratio": total / GPT-2's total}}}``, counted on the meta device."""
    table = {}
    for size in sizes:
        rows = {}
        for name in MODELS:
            model = build_model(name, shapes[size], "meta", basis=basis)
            rows[name] = parameter_counts(model)
            if name != "gpt2":
                rows[name]["kan_hidden_size"] = model.config.kan_hidden_size
        for row in rows.values():
            row["ratio"] = row["total"] / rows["gpt2"]["total"]
        table[size] = rows
    return table


# ----------------------------------------------------------------------------------------------
# Memory: one model, in a fresh process


def inputs(shape: dict, batch: int, seq_len: int, seed: int, device: str) -> torch.Tensor:
    """Random token ids (batch, seq_len), the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape["vocab_size"], (batch, seq_len), generator=generator).to(device)


def make_train_step(model, optimizer, ids, dtype):
    """One training step: forward and loss under autocast, backward, AdamW step (gradients kept)."""

    def step(zero_grad: bool = True):
        with autocast(ids.device, dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)

    return step


def generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens with the KV cache (prefill + cached decode)."""
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id,
        )


def measure_memory(name: str, args) -> dict:
    """Memory figures of model ``name``; meant to run alone in a fresh process (see ``--child``).

    Generation is measured first, on a model built for it; then a fresh fp32 model is trained.
    """
    device, dtype, shape = args.device, DTYPES[args.dtype], shape_of(args)
    cuda = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    startup_rss = rss_bytes()  # torch and transformers imported, nothing built
    baseline = 0 if cuda else startup_rss  # CPU figures are RSS above the started process
    ids = inputs(shape, args.batch, args.seq_len, args.seed, device)
    config = {"basis": args.basis, "dropout": args.dropout, "attn": args.attn}

    torch.manual_seed(args.seed)
    model = build_model(name, shape, device, **config).eval().to(dtype)
    gc.collect()
    with PeakMemory(device) as generate_peak:
        generate(model, ids[:, : args.prompt_len], args.new_tokens)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    torch.manual_seed(args.seed)
    model = build_model(name, shape, device, **config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_train_step(model, optimizer, ids, dtype)
    step(zero_grad=False)  # warm-up; creates the optimizer state
    state = training_state_bytes(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    with SavedTensorBytes(model.parameters()) as saved, autocast(device, dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    del loss
    gc.collect()
    with PeakMemory(device) as train_peak:
        step()
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "saved_bytes": saved.bytes,
        "state_bytes": state,
        "train_peak_bytes": train_peak.peak - baseline,
        "generate_peak_bytes": generate_peak.peak - baseline,
        "startup_rss_bytes": startup_rss,
    }


def child_argv(args, name: str) -> list[str]:
    """Arguments of ``python -m kangpt.compare`` measuring model ``name`` alone."""
    spec = {key: getattr(args, key) for key in CHILD_KEYS}
    return ["-m", "kangpt.compare", "--child", name, "--child-spec", json.dumps(spec)]


# ----------------------------------------------------------------------------------------------
# Speed: all models in this process, interleaved


def estimate_memory(
    names: list[str],
    shapes: dict[str, dict],
    batch: int,
    seq_len: int,
    prompt_len: int,
    new_tokens: int,
    dtype: str,
    basis: str | None = None,
    fused: bool = True,
) -> dict:
    """``{size: {model: {"train_peak_bytes", "generate_peak_bytes"}}}`` for every shape, estimated
    (``kangpt.memory_estimate``). With ``fused``, the default KAN-GPT-2 runs through the fused Triton
    op where Triton is installed, as it does on a GPU; without, through the PyTorch path."""
    from .memory_estimate import estimate_generation_peak, estimate_training_peak

    table = {}
    for size, shape in shapes.items():
        table[size] = {}
        for name in names:
            config = model_config(
                name, shape, dropout=0.0, attn="sdpa", **({"basis": basis} if name == "kan" else {})
            )
            if name == "kan" and fused and triton_kernels_apply(config.kan_basis, config.kan_sharing):
                config.kan_kernel = "triton"
            cls = GPT2LMHeadModel if name == "gpt2" else KANGPT2LMHeadModel
            build = lambda cls=cls, config=config: cls(config)  # noqa: E731
            print(f"estimating the memory of {name} at {size} ...", file=sys.stderr, flush=True)
            table[size][name] = {
                "train_peak_bytes": estimate_training_peak(build, batch, seq_len, DTYPES[dtype]),
                "generate_peak_bytes": estimate_generation_peak(
                    build, batch, prompt_len, new_tokens, DTYPES[dtype]
                ),
            }
    return table


def measure_speed(names: list[str], args) -> dict:
    """Training and cached-generation speed of every model, repeats interleaved across models."""
    device, dtype, shape = args.device, DTYPES[args.dtype], shape_of(args)
    ids = inputs(shape, args.batch, args.seq_len, args.seed, device)
    models, steps = {}, {}
    for name in names:
        torch.manual_seed(args.seed)
        models[name] = build_model(
            name, shape, device, basis=args.basis, dropout=args.dropout, attn=args.attn
        )
        optimizer = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
        steps[name] = make_train_step(models[name].train(), optimizer, ids, dtype)
    train_s = interleaved_median_times(steps, args.repeats, device, warmup=2)
    steps.clear()  # frees the optimizers
    gc.collect()

    prompt = ids[:, : args.prompt_len]
    for model in models.values():
        model.zero_grad(set_to_none=True)
        model.eval().to(dtype)
    runs = {name: (lambda m=model: generate(m, prompt, args.new_tokens)) for name, model in models.items()}
    generate_s = interleaved_median_times(runs, args.gen_repeats, device, warmup=1)
    return {
        name: {
            "train_step_s": train_s[name],
            "train_tokens_per_s": args.batch * args.seq_len / train_s[name],
            "generate_s": generate_s[name],
            "generate_tokens_per_s": args.batch * args.new_tokens / generate_s[name],
        }
        for name in names
    }


# ----------------------------------------------------------------------------------------------
# Output


def ratio(value, reference) -> float | None:
    return None if value is None or not reference else value / reference


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def parameters_markdown(table: dict, shapes: dict) -> str:
    lines = [
        "### Parameters (counted on the meta device)",
        "",
        "| size | model | KAN width | embeddings | attention | feed-forward | layer norms | total "
        "| × GPT-2 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, rows in table.items():
        s = shapes[size]
        label = f"{size} ({s['n_layer']}×{s['n_embd']})"
        for name, row in rows.items():
            width = row.get("kan_hidden_size", "")
            counts = " | ".join(f"{row[p]:,}" for p in PARTS)
            lines.append(f"| {label} | {MODELS[name]} | {width} | {counts} | {row['ratio']:.3f}× |")
    return "\n".join(lines)


def measurements_markdown(results: dict, args, shape: dict) -> str:
    mem, speed, names = results["memory"], results["speed"], list(results["memory"])
    ref_mem, ref_speed = mem["gpt2"], speed["gpt2"]
    cuda = args.device.startswith("cuda")
    peak_kind = "`max_memory_allocated`" if cuda else "process peak RSS above its start-up RSS"
    header = (
        f"### {args.size} ({shape['n_layer']} layers, d={shape['n_embd']}, vocab {shape['vocab_size']}), "
        f"batch {args.batch} × {args.seq_len} tokens, {args.dtype}, {args.device}\n\n"
        f"Memory: each model in a fresh process. Saved for backward: measured (`saved_tensors_hooks`, "
        f"parameters excluded). Params + grads + AdamW: counted from the tensors. Peaks: measured, "
        f"{peak_kind}; training = forward + backward + AdamW step (fp32 weights, autocast {args.dtype}); "
        f"generation = prompt of {args.prompt_len} tokens + {args.new_tokens} cached decode steps "
        f"(weights in {args.dtype}).\n"
    )
    lines = [
        header,
        "| model | params | saved for backward MiB | × | params+grads+AdamW MiB | × "
        "| training peak MiB | × | generation peak MiB | × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        m = mem[name]
        cells = [f"{m['parameters']:,}"]
        for key in ("saved_bytes", "state_bytes", "train_peak_bytes", "generate_peak_bytes"):
            value = m[key]["total"] if key == "state_bytes" else m[key]
            ref = ref_mem[key]["total"] if key == "state_bytes" else ref_mem[key]
            cells += [f"{value / MiB:,.1f}", fmt_ratio(ratio(value, ref))]
        lines.append(f"| {MODELS[name]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Speed: all models in one process, median of {args.repeats} training steps and "
        f"{args.gen_repeats} generations, interleaved "
        f"(measured; threads={results['environment']['threads']}).",
        "",
        "| model | training step ms | × | training tokens/s | × | generation tokens/s | × |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        s = speed[name]
        lines.append(
            f"| {MODELS[name]} | {s['train_step_s'] * 1e3:,.1f} | "
            f"{fmt_ratio(ratio(s['train_step_s'], ref_speed['train_step_s']))} | "
            f"{s['train_tokens_per_s']:,.0f} | "
            f"{fmt_ratio(ratio(s['train_tokens_per_s'], ref_speed['train_tokens_per_s']))} | "
            f"{s['generate_tokens_per_s']:,.1f} | "
            f"{fmt_ratio(ratio(s['generate_tokens_per_s'], ref_speed['generate_tokens_per_s']))} |"
        )
    if "kan" in results["ratios"]:
        checks = []
        for key, (op, bound) in TARGETS.items():
            value = results["ratios"]["kan"][key]
            met = value <= bound if op == "<=" else value >= bound
            checks.append(f"{key} {value:.2f}× (target {op} {bound}×: {'met' if met else 'NOT met'})")
        lines += ["", "Parameter-matched KAN-GPT-2 / GPT-2: " + "; ".join(checks) + "."]
    return "\n".join(lines)


def estimates_markdown(results: dict, args) -> str:
    """The estimated peaks by size, and at the measured size the estimate beside the measurement."""
    lines = []
    if "estimate" in results:
        seq = args.estimate_seq_len
        lines += [
            f"### Peak memory, estimated ({args.estimate_dtype}, batch {args.estimate_batch} × {seq}; "
            f"training = forward + backward + AdamW step, fp32 weights; generation = prompt of {seq // 2} "
            f"+ {args.estimate_new_tokens} cached steps, weights in {args.estimate_dtype}; fake tensors + "
            "MemTracker)",
            "",
            "| size | model | training peak GiB | × GPT-2 | generation peak GiB | × GPT-2 |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for size, rows in results["estimate"].items():
            ref = rows["gpt2"]
            for name, row in rows.items():
                cells = []
                for key in ("train_peak_bytes", "generate_peak_bytes"):
                    cells += [f"{row[key] / 2**30:,.2f}", fmt_ratio(ratio(row[key], ref[key]))]
                lines.append(f"| {size} | {MODELS[name]} | " + " | ".join(cells) + " |")
    if "estimate_check" in results:
        kind = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS above start-up"
        lines += [
            "",
            f"### Estimate against measurement at {args.size} ({args.dtype}, batch {args.batch} × "
            f"{args.seq_len}; measured: {kind})",
            "",
            "| model | training peak MiB measured | estimated | estimated / measured "
            "| generation peak MiB measured | estimated | estimated / measured |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in results["estimate_check"].items():
            cells = []
            for key in ("train_peak_bytes", "generate_peak_bytes"):
                measured = results["memory"][name][key]
                cells += [
                    f"{measured / MiB:,.1f}",
                    f"{row[key] / MiB:,.1f}",
                    fmt_ratio(ratio(row[key], measured)),
                ]
            lines.append(f"| {MODELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios_to_gpt2(results: dict) -> dict:
    """``{model: {figure: model's / GPT-2's}}`` for the memory and speed figures of this run."""
    out = {}
    for name in results["memory"]:
        m, s = results["memory"][name], results["speed"][name]
        rm, rs = results["memory"]["gpt2"], results["speed"]["gpt2"]
        out[name] = {
            "parameters": ratio(m["parameters"], rm["parameters"]),
            "saved_bytes": ratio(m["saved_bytes"], rm["saved_bytes"]),
            "state_bytes": ratio(m["state_bytes"]["total"], rm["state_bytes"]["total"]),
            "train_peak_bytes": ratio(m["train_peak_bytes"], rm["train_peak_bytes"]),
            "generate_peak_bytes": ratio(m["generate_peak_bytes"], rm["generate_peak_bytes"]),
            **{k: ratio(s[k], rs[k]) for k in s},
        }
    return out


def plot(results: dict, out: Path) -> list[Path]:
    """Bar charts of parameters, memory and speed; returns the files written (none without matplotlib)."""
    table = results["parameters"]
    try:
        fig = new_figure(3.2 * len(table), 4, layout=None)
    except ModuleNotFoundError as err:
        print(f"{err} (no charts written)", file=sys.stderr)
        return []
    from matplotlib.patches import Rectangle  # matplotlib is there: new_figure checked

    written = []
    colors = {"gpt2": "tab:gray", "kan": "tab:blue", "kan-edge": "tab:green", "kan-edge-wide": "tab:orange"}
    axes = fig.subplots(1, len(table), squeeze=False)
    for ax, (size, rows) in zip(axes[0], table.items(), strict=True):
        names = list(rows)
        bottom = [0.0] * len(names)
        for part, hatch in zip(PARTS[:-1], ("", "//", "..", "xx"), strict=True):
            values = [rows[n][part] / 1e6 for n in names]
            ax.bar(
                names,
                values,
                bottom=bottom,
                color=[colors[n] for n in names],
                hatch=hatch,
                edgecolor="white",
                label=part,
            )
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(size)
        ax.set_ylabel("parameters (millions)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)  # the model names would overlap
    handles = [
        Rectangle((0, 0), 1, 1, facecolor="lightgray", hatch=h, edgecolor="white")
        for h in ("", "//", "..", "xx")
    ]
    fig.legend(handles, PARTS[:-1], loc="upper center", ncol=4)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    written.append(_save(fig, out / "parameters.png"))

    if "memory" in results:
        names = list(results["memory"])
        cuda = results["args"]["device"].startswith("cuda")
        figures = {
            "saved for backward": [results["memory"][n]["saved_bytes"] / MiB for n in names],
            "params + grads + AdamW": [results["memory"][n]["state_bytes"]["total"] / MiB for n in names],
            f"training peak ({'VRAM' if cuda else 'RSS'})": [
                results["memory"][n]["train_peak_bytes"] / MiB for n in names
            ],
            f"generation peak ({'VRAM' if cuda else 'RSS'})": [
                results["memory"][n]["generate_peak_bytes"] / MiB for n in names
            ],
        }
        a = results["args"]
        title = f"{a['size']}, batch {a['batch']} × {a['seq_len']} tokens, {a['dtype']}, {a['device']}"
        written.append(_bars(figures, names, colors, "MiB", title, out / "memory.png"))
        speed = {
            "training tokens/s": [results["speed"][n]["train_tokens_per_s"] for n in names],
            "generation tokens/s": [results["speed"][n]["generate_tokens_per_s"] for n in names],
        }
        written.append(_bars(speed, names, colors, "tokens/s", title, out / "speed.png"))
    return written


def _bars(figures: dict, names: list[str], colors: dict, unit: str, title: str, path: Path) -> Path:
    """One bar chart per figure, each bar labelled with its ratio to the first (GPT-2)."""
    fig = new_figure(3.2 * len(figures), 3.9, layout=None)
    axes = fig.subplots(1, len(figures), squeeze=False)
    fig.suptitle(title, fontsize=10)
    for ax, (figure, values) in zip(axes[0], figures.items(), strict=True):
        bars = ax.bar(names, values, color=[colors[n] for n in names])
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                f"{value / values[0]:.2f}×",
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(figure, fontsize=10)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``eval/compare.py`` and ``kangpt compare``."""
    parser.add_argument(
        "--size",
        choices=list(SHAPES),
        default="mini",
        help="shape measured for memory and speed (default: mini = 4 layers, d=256)",
    )
    parser.add_argument("--n-layer", type=int, help="override the shape's number of layers")
    parser.add_argument("--n-embd", type=int, help="override the shape's width")
    parser.add_argument("--n-head", type=int, help="override the shape's number of heads")
    parser.add_argument("--vocab-size", type=int, help="override the shape's vocabulary size")
    parser.add_argument("--basis", choices=BASES, help="basis of the default KAN-GPT-2 (default: its own)")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"models measured, comma-separated, gpt2 first, among {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="autocast dtype of training, weight dtype of generation",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--prompt-len", type=int, help="generation prompt length (default: seq-len / 2)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated (default: seq-len / 4)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout of every model (GPT-2 used 0.1)")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generations per model")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: torch's; 1 is steadier on a shared machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--params-only", action="store_true", help="only the parameter table (no memory, speed)"
    )
    parser.add_argument(
        "--estimate-sizes",
        default=",".join(GPT2_SIZES),
        help="sizes whose peak memory is estimated without allocating ('' for none)",
    )
    parser.add_argument("--estimate-batch", type=int, default=8, help="sequences per step of the estimates")
    parser.add_argument(
        "--estimate-seq-len", type=int, default=1024, help="tokens per sequence of the estimates"
    )
    parser.add_argument(
        "--estimate-dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the estimates"
    )
    parser.add_argument(
        "--estimate-new-tokens", type=int, default=16, help="decoding steps of the estimated generation"
    )
    parser.add_argument("--out", default="out/compare", help="folder of compare.json and the charts")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)


def check_arguments(args) -> None:
    """Fill defaults that depend on other arguments; reject impossible combinations (CommandError)."""
    shape = shape_of(args)
    args.prompt_len = args.prompt_len or max(1, args.seq_len // 2)
    args.new_tokens = args.new_tokens or max(1, args.seq_len // 4)
    names = args.models.split(",")
    if names[0] != "gpt2" or any(n not in MODELS for n in names) or len(set(names)) != len(names):
        raise CommandError(f"--models must start with gpt2 and name each of {', '.join(MODELS)} at most once")
    if min(args.batch, args.seq_len, args.repeats, args.gen_repeats) < 1:
        raise CommandError("--batch, --seq-len, --repeats and --gen-repeats must be positive")
    if max(args.seq_len, args.prompt_len + args.new_tokens) > shape["n_positions"]:
        raise CommandError(f"sequences longer than the model's {shape['n_positions']} positions")
    if args.prompt_len > args.seq_len:
        raise CommandError("--prompt-len cannot exceed --seq-len (the prompt is cut from the training batch)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda, but CUDA is not available")


def run(args) -> int:
    """Run the comparison ``args`` describes: print the tables, write JSON and charts to ``args.out``."""
    if args.child:
        spec = SimpleNamespace(**json.loads(args.child_spec))
        print(json.dumps(measure_memory(args.child, spec)))
        return 0
    check_arguments(args)
    transformers.utils.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {size: SHAPES[size] for size in GPT2_SIZES}
    shapes[args.size] = shape_of(args)
    results = {
        "args": vars(args),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "threads": args.threads or torch.get_num_threads(),
        },
        "shapes": shapes,
        "parameters": parameter_table(list(shapes), shapes, args.basis),
    }
    print(parameters_markdown(results["parameters"], shapes))

    if not args.params_only:
        names = args.models.split(",")
        results["memory"] = {}
        for name in names:
            print(f"measuring memory of {name} in a fresh process ...", file=sys.stderr, flush=True)
            results["memory"][name] = json.loads(run_fresh_process(child_argv(args, name)).splitlines()[-1])
        print("measuring speed ...", file=sys.stderr, flush=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        results["speed"] = measure_speed(names, args)
        results["ratios"] = ratios_to_gpt2(results)
        print()
        print(measurements_markdown(results, args, shapes[args.size]))
        results["estimate_check"] = estimate_memory(
            names,
            {args.size: shapes[args.size]},
            args.batch,
            args.seq_len,
            args.prompt_len,
            args.new_tokens,
            args.dtype,
            args.basis,
            fused=args.device.startswith("cuda"),
        )[args.size]
    sizes = [size for size in args.estimate_sizes.split(",") if size] if not args.params_only else []
    if sizes:
        results["estimate"] = estimate_memory(
            ["gpt2", "kan"],
            {size: SHAPES[size] for size in sizes},
            args.estimate_batch,
            args.estimate_seq_len,
            args.estimate_seq_len // 2,
            args.estimate_new_tokens,
            args.estimate_dtype,
            args.basis,
        )
    if "estimate" in results or "estimate_check" in results:
        print()
        print(estimates_markdown(results, args))

    (out / "compare.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    written = plot(results, out)
    print(f"\nwrote {out / 'compare.json'}" + "".join(f", {p}" for p in written), file=sys.stderr)
    return 0


@command("compare", "compare KAN-GPT-2 with GPT-2: parameters, memory and speed")
def compare_command(parser: argparse.ArgumentParser):
    """``kangpt compare``: the same arguments and program as ``eval/compare.py``."""
    add_arguments(parser)
    return run


def main(argv: list[str] | None = None) -> int:
    """``python eval/compare.py`` / ``python -m kangpt.compare``."""
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CommandError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
