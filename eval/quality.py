"""Is a KAN feed-forward block better than GPT-2's MLP at equal parameters and equal tokens?

Trains GPT-2 (``ffn_type: mlp``) and KAN-GPT-2 with each KAN basis, parameter-matched to GPT-2
within 2%, with the project's own training loop (``kangpt.training.train``): the same data,
tokenizer, seed, token budget, batch and learning-rate schedule; only the feed-forward block
differs. Every model is evaluated on the same validation tokens in the same order.

    python eval/quality.py                                  # the default: about 15 minutes on 2 CPU cores
    python eval/quality.py --data 'books/*.txt'             # any text files (a file, folder or glob)
    python eval/quality.py --models mlp,bspline --train.max_steps=2000 --model.n_embd=256

Any ``--section.key=value`` override of ``train.py`` applies to every model. Each model trains in a
fresh process (``OUT/runs/NAME``, config in ``OUT/configs/NAME.yaml``, so ``python train.py
OUT/configs/NAME.yaml`` repeats it). One table on stdout: parameters, final and best validation loss
and perplexity, training tokens/s (median over the logged windows after the first), peak memory
(CUDA ``max_memory_allocated``, or on CPU the peak RSS from building the model to the end of the
run above the RSS just before) and wall time; ``OUT/quality.json`` and ``OUT/validation.png``
(validation loss against training tokens) beside it. Quality is reported as measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from kangpt import training
from kangpt.config import ConfigError, RunConfig, build_config, load_config, model_config
from kangpt.data import DataError
from kangpt.kan import BASES
from kangpt.measure import MiB, peak_rss_bytes, reset_peak_rss, rss_bytes
from kangpt.modeling_kangpt import KANGPT2LMHeadModel
from kangpt.plotting import new_figure
from kangpt.report import parameter_counts
from kangpt.run_dir import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("mlp", *BASES)
LABELS = {"mlp": "GPT-2 (MLP)", **{b: f"KAN-GPT-2, {b}" for b in BASES}}
MATCH_TOLERANCE = 0.02  # every KAN model's parameter count within 2% of GPT-2's
# Settings of every quality run, applied before the user's overrides. The default budget (400 steps
# of 16 x 128 tokens, 819,200 tokens, at configs/default.yaml's shape) fits five models in about
# 15 minutes on 2 CPU cores.
QUALITY_DEFAULTS = [
    "--train.max_steps=400",
    "--train.eval_interval=50",
    "--train.log_interval=10",
    "--train.save_interval=0",
    "--train.keep_checkpoints=1",
    "--train.trackers=[]",
    "--train.sample_prompt=null",
    "--train.resume=null",
]


def run_configs(base: RunConfig, names: list[str], out: Path) -> dict[str, RunConfig]:
    """One run config per model: ``base`` with that feed-forward block and its own run folder."""
    configs = {}
    for name in names:
        raw = base.to_dict()
        model = {k: v for k, v in raw["model"].items() if k != "kan_hidden_size"}  # None: parameter-matched
        model["ffn_type"] = "mlp" if name == "mlp" else "kan"
        if name != "mlp":
            model["kan_basis"] = name
        raw["model"] = model
        raw["train"].update(out_dir=str(out / "runs" / name), overwrite=True)
        configs[name] = build_config(raw)
    return configs


def check_parameter_match(configs: dict[str, RunConfig], vocab_size: int) -> dict[str, dict]:
    """Parameter counts by part (meta device) at the tokenizer's vocabulary; ConfigError if a KAN
    model is not within ``MATCH_TOLERANCE`` of GPT-2's total."""
    counts = {}
    for name, config in configs.items():
        with torch.device("meta"):
            model = KANGPT2LMHeadModel(model_config(config, vocab_size=vocab_size))
        counts[name] = parameter_counts(model)
        if config.model["ffn_type"] == "kan":
            counts[name]["kan_hidden_size"] = model.config.kan_hidden_size
    reference = counts["mlp"]["total"]
    for name, row in counts.items():
        row["ratio"] = row["total"] / reference
        if abs(row["ratio"] - 1) > MATCH_TOLERANCE:
            raise ConfigError(
                f"{name}: {row['total']:,} parameters, {row['ratio']:.3f}x GPT-2's {reference:,}; "
                f"not parameter-matched within {MATCH_TOLERANCE:.0%} at this shape"
            )
    return counts


def prepare_data(config: RunConfig):
    """Load the corpus once as training will (trains and caches the BPE): tokenizer, baseline, sizes."""
    from accelerate import Accelerator

    corpus = training.load_corpus(config.data, config.train, Accelerator(cpu=True))
    return {
        "vocab_size": len(corpus.tokenizer),
        "unigram_baseline": corpus.baseline,
        "train_blocks": len(corpus.train) if hasattr(corpus.train, "__len__") else None,
        "val_blocks": len(corpus.val),
        "val_tokens": len(corpus.val) * config.data.block_size,
    }


def run_model(name: str, config: RunConfig, out: Path) -> dict:
    """Train one model in a fresh process; return its wall time and peak memory."""
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    print(f"\n=== {LABELS[name]}: python train.py {path} ===", file=sys.stderr, flush=True)
    start = time.perf_counter()
    # The default allocator, not kangpt.measure.MALLOC_ENV: returning every freed block to the system
    # would make the page faults, not the models, set the tokens/s.
    argv = [sys.executable, __file__, "--child", str(path)]
    pid = os.spawnve(os.P_NOWAIT, sys.executable, argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"training {name} failed (exit code {os.waitstatus_to_exitcode(status)})")
    peak = json.loads((Path(config.train.out_dir) / "peak_memory.json").read_text())
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, **peak}


def child(path: str) -> int:
    """Child process: train the run config at ``path``; write the peak memory of the run next to it.

    The peak is taken from the moment the model is built (after the data is loaded) to the end.
    """
    config = load_config(path)
    marks = {}
    build_model = training.build_model

    def build_model_from_here(*args, **kwargs):  # data loaded: measure from the model on
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        marks["rss_before_model"] = rss_bytes()
        return build_model(*args, **kwargs)

    training.build_model = build_model_from_here
    code = training.train(config)
    if code != 0:
        return code
    peak = {"peak_rss_bytes": peak_rss_bytes() - marks["rss_before_model"]}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    (Path(config.train.out_dir) / "peak_memory.json").write_text(json.dumps(peak))
    return 0


def summarize(name: str, config: RunConfig, counts: dict, run: dict) -> dict:
    """Final and best validation loss, perplexity, tokens/s and memory of one finished run."""
    records = read_metrics(Path(config.train.out_dir) / "metrics.jsonl")
    tokens_per_step = (
        config.train.batch_size * config.train.gradient_accumulation_steps * config.data.block_size
    )
    curve = [(r["step"] * tokens_per_step, r["val_loss"]) for r in records if "val_loss" in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    final, best = curve[-1][1], min(loss for _, loss in curve)
    return {
        "label": LABELS[name],
        "parameters": counts[name]["total"],
        "parameter_ratio": counts[name]["ratio"],
        "kan_hidden_size": counts[name].get("kan_hidden_size"),
        "final_val_loss": final,
        "best_val_loss": best,
        "final_val_ppl": math.exp(final),
        "best_val_ppl": math.exp(best),
        "tokens_per_s": statistics.median(speeds[1:] or speeds),  # the first window holds the warm-up
        "peak_bytes": run.get("cuda_max_allocated_bytes", run["peak_rss_bytes"]),
        "wall_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
        "curve": curve,
    }


def markdown(results: dict) -> str:
    s, d = results["settings"], results["data"]
    memory = (
        "CUDA max_memory_allocated" if results["cuda"] else "peak RSS from model build to end, above before"
    )
    lines = [
        f"### Quality at equal parameters and tokens: {s['n_layer']} layers, d={s['n_embd']}, "
        f"{s['tokens']:,} training tokens ({s['max_steps']} steps × {s['tokens_per_step']:,}), "
        f"seed {s['seed']}",
        "",
        f"Data {s['dataset']!r}, BPE vocabulary {d['vocab_size']:,}; validation: the same "
        f"{d['val_tokens']:,} tokens ({d['val_blocks']} blocks of {s['block_size']}) for every model; "
        f"unigram baseline {d['unigram_baseline']:.3f} nats/token. Schedule: peak lr {s['learning_rate']}, "
        f"warmup {s['warmup_steps']}, cosine to {s['min_learning_rate']}. Memory: {memory}.",
        "",
        "| model | KAN width | params | × GPT-2 | final val loss | best val loss | final ppl | best ppl "
        "| tokens/s | peak MiB | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["models"].values():
        width = "" if row["kan_hidden_size"] is None else row["kan_hidden_size"]
        lines.append(
            f"| {row['label']} | {width} | {row['parameters']:,} | {row['parameter_ratio']:.3f}× | "
            f"{row['final_val_loss']:.4f} | {row['best_val_loss']:.4f} | {row['final_val_ppl']:.2f} | "
            f"{row['best_val_ppl']:.2f} | {row['tokens_per_s']:,.0f} | {row['peak_bytes'] / MiB:,.1f} | "
            f"{row['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> bool:
    """Validation loss against training tokens, one line per model; False without matplotlib."""
    try:
        fig = new_figure(7, 4.5, layout=None)
    except ModuleNotFoundError:
        return False
    ax = fig.subplots()
    for row in results["models"].values():
        tokens, losses = zip(*row["curve"], strict=True)
        ax.plot([t / 1e6 for t in tokens], losses, "o-", markersize=3, label=row["label"])
    ax.axhline(results["data"]["unigram_baseline"], color="gray", linestyle="--", label="unigram baseline")
    ax.set(
        xlabel="training tokens (millions)",
        ylabel="validation loss (nats/token)",
        title="GPT-2 vs KAN-GPT-2 at equal parameters and tokens",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Other --section.key=value arguments override the run config of every model.",
    )
    parser.add_argument(
        "--config",
        default=str(ROOT / "configs" / "default.yaml"),
        help="base run config (default: configs/default.yaml)",
    )
    parser.add_argument(
        "--data", help="text files (a file, folder or glob) or dataset; default: the config's"
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, starting with mlp (default: {','.join(MODELS)})",
    )
    parser.add_argument(
        "--out", default="out/quality", help="folder of the runs, quality.json, validation.png"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.child:
        return child(args.child)

    names = args.models.split(",")
    if names[0] != "mlp" or any(n not in MODELS for n in names) or len(set(names)) != len(names):
        parser.error(f"--models must start with mlp and name each of {', '.join(MODELS)} at most once")
    out = Path(args.out)
    try:
        data_override = [f"--data.dataset={args.data}"] if args.data else []
        base = load_config(args.config, [*QUALITY_DEFAULTS, *data_override, *overrides])
        configs = run_configs(base, names, out)
        data = prepare_data(base)
        counts = check_parameter_match(configs, data["vocab_size"])
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    try:
        runs = {name: run_model(name, config, out) for name, config in configs.items()}
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    t, m = base.train, base.model
    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * base.data.block_size
    shape = model_config(base, vocab_size=data["vocab_size"])
    results = {
        "settings": {
            "config": args.config,
            "dataset": base.data.dataset,
            "n_layer": shape.n_layer,
            "n_embd": shape.n_embd,
            "block_size": base.data.block_size,
            "max_steps": t.max_steps,
            "tokens_per_step": tokens_per_step,
            "tokens": t.max_steps * tokens_per_step,
            "seed": t.seed,
            "learning_rate": t.learning_rate,
            "min_learning_rate": t.min_learning_rate,
            "warmup_steps": t.warmup_steps,
            "overrides": overrides,
            "model_overrides": m,
        },
        "data": data,
        "cuda": torch.cuda.is_available(),
        "models": {name: summarize(name, configs[name], counts, runs[name]) for name in names},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    plotted = plot_curves(results, out / "validation.png")
    print(
        f"\nwrote {out / 'quality.json'}" + (f", {out / 'validation.png'}" if plotted else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
