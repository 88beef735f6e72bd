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
4. Generation at batch 1 and at ``--batch``, eagerly and, with ``--compile``, compiled (``torch.compile``
   with a static KV cache, as ``kangpt generate --compile`` runs): the prompt's prefill time apart
   from the decode steps' tokens/s (the time of ``generate`` with ``1 + new_tokens`` tokens less that
   with 1, medians over repeats interleaved across the models), and the first call's extra time,
   compiling (*measured*).
5. Peak memory of a training step and of generation for GPT-2 and the default KAN-GPT-2 at small,
   medium, large and XL (``--estimate-*``, bf16, batch 8 x 1024 by default), *estimated* without
   allocating (``kangpt.comparison.estimate``: fake tensors and torch's ``MemTracker``), and at the
   measured size too, so that the estimate can be checked against the measurement.

Training runs with fp32 weights under autocast to ``--dtype`` (mixed precision, as ``train.py``
does); generation casts the weights to ``--dtype``. Output: markdown tables on stdout, ``compare.json``
and bar charts ``parameters.png``, ``memory.png``, ``speed.png`` in ``--out``.

This module measures (:func:`run_comparison`); ``kangpt.comparison.report`` writes the tables and
charts; ``kangpt.commands.compare`` is the command.
"""

from __future__ import annotations

import gc
import json
import platform
import sys
from types import SimpleNamespace

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from ..configuration_kangpt import KANGPT2Config
from ..io.generating import compiled
from ..kan_fast import triton_kernels_apply
from ..modeling_kangpt import KANGPT2LMHeadModel
from ..training.report import parameter_counts
from .measure import (
    DTYPES,
    PeakMemory,
    SavedTensorBytes,
    autocast,
    interleaved_median_times,
    rss_bytes,
    run_fresh_process,
    training_state_bytes,
)

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


def comparison_config(
    name: str, shape: dict, basis: str | None = None, dropout: float = 0.0, attn: str = "sdpa"
):
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


def build_comparison_model(name: str, shape: dict, device: str = "meta", **config_kwargs) -> torch.nn.Module:
    """Model ``name`` built directly on ``device`` (``"meta"``: shapes only, no memory)."""
    config = comparison_config(name, shape, **config_kwargs)
    cls = GPT2LMHeadModel if name == "gpt2" else KANGPT2LMHeadModel
    with torch.device(device):
        return cls(config)


def parameter_table(sizes: list[str], shapes: dict[str, dict], basis: str) -> dict:
    """``{size: {model: {part: count, ..., "ratio": total / GPT-2's total}}}``, counted on the meta device."""
    table = {}
    for size in sizes:
        rows = {}
        for name in MODELS:
            model = build_comparison_model(name, shapes[size], "meta", basis=basis)
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


def generate(model, prompt: torch.Tensor, new_tokens: int, **options) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens with the KV cache (prefill + cached decode);
    ``options`` go to ``generate`` (those of :func:`kangpt.io.generating.compiled`, say)."""
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id,
            **options,
        )


def measure_generation(names: list[str], args) -> dict:
    """``{model: {"MODE, batch B": {prefill_s, decode_tokens_per_s, compile_s}}}`` for MODE eager and (with
    ``args.compile``) compiled, B 1 and ``args.batch``: see the module docstring."""
    device, dtype, shape = args.device, DTYPES[args.dtype], shape_of(args)
    models = {}
    for name in names:
        torch.manual_seed(args.seed)
        model = build_comparison_model(name, shape, device, basis=args.basis, attn=args.attn)
        models[name] = model.eval().to(dtype)
    results = {name: {} for name in names}
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        for batch in sorted({1, args.batch}):
            prompt = inputs(shape, batch, args.prompt_len, args.seed, device)
            runs = {}
            for name, model in models.items():
                extra = compiled(model) if mode == "compiled" else {}
                for tokens in (1, 1 + args.new_tokens):
                    runs[name, tokens] = lambda m=model, p=prompt, t=tokens, e=extra: generate(m, p, t, **e)
            first = interleaved_median_times(runs, 1, device, warmup=0)  # compiles, when compiled
            times = interleaved_median_times(runs, args.gen_repeats, device, warmup=0)
            for name in names:
                prefill, whole = times[name, 1], times[name, 1 + args.new_tokens]
                results[name][f"{mode}, batch {batch}"] = {
                    "prefill_s": prefill,
                    "decode_tokens_per_s": batch * args.new_tokens / (whole - prefill),
                    "compile_s": first[name, 1] + first[name, 1 + args.new_tokens] - prefill - whole,
                }
    return results


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
    model = build_comparison_model(name, shape, device, **config).eval().to(dtype)
    gc.collect()
    with PeakMemory(device) as generate_peak:
        generate(model, ids[:, : args.prompt_len], args.new_tokens)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    torch.manual_seed(args.seed)
    model = build_comparison_model(name, shape, device, **config).train()
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
    """Arguments of ``python -m kangpt.comparison.models NAME SETTINGS`` measuring model ``name`` alone."""
    spec = {key: getattr(args, key) for key in CHILD_KEYS}
    return ["-m", "kangpt.comparison.models", name, json.dumps(spec)]


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
    (``kangpt.comparison.estimate``). With ``fused``, the default KAN-GPT-2 runs through the fused Triton
    op where Triton is installed, as it does on a GPU; without, through the PyTorch path."""
    from .estimate import estimate_generation_peak, estimate_training_peak

    table = {}
    for size, shape in shapes.items():
        table[size] = {}
        for name in names:
            config = comparison_config(
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
        models[name] = build_comparison_model(
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


def ratio(value, reference) -> float | None:
    """``value / reference``; None where either is missing."""
    return None if value is None or not reference else value / reference


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
            **{f"{setting}, {k}": ratio(value, results["generation"]["gpt2"][setting][k])
               for setting, figures in results["generation"][name].items()
               for k, value in figures.items() if k != "compile_s"},
        }
    return out


def run_comparison(args) -> dict:
    """Every figure ``args`` asks for (see the module docstring), as the JSON-ready dict that
    ``compare.json`` holds; progress is told on stderr. ``args`` are those of ``kangpt compare``."""
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
    if not args.params_only:
        names = args.models.split(",")
        results["memory"] = {}
        for name in names:
            print(f"measuring memory of {name} in a fresh process ...", file=sys.stderr, flush=True)
            child = run_fresh_process(child_argv(args, name), peak_rss=True)
            results["memory"][name] = json.loads(child.splitlines()[-1])
        print("measuring speed ...", file=sys.stderr, flush=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        results["speed"] = measure_speed(names, args)
        print("measuring generation ...", file=sys.stderr, flush=True)
        results["generation"] = measure_generation(names, args)
        results["ratios"] = ratios_to_gpt2(results)
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
    return results


if __name__ == "__main__":  # a child process: the memory of one model, as one JSON line
    print(json.dumps(measure_memory(sys.argv[1], SimpleNamespace(**json.loads(sys.argv[2])))))
