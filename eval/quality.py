"""Is KAN-GPT-2 a better language model than GPT-2 at equal parameters and equal tokens?

A fair comparison, in one command: GPT-2 (``ffn_type: mlp``) and KAN-GPT-2 variants, every one
parameter-matched to GPT-2 within 1%, trained with kangpt's own loop (``train.py``) on the same data,
tokenizer, token budget, batch and schedule; only the feed-forward block and the learning rate differ.

1. **Learning-rate sweep.** Every model trains at every peak learning rate of the same grid (seed
   ``--seeds[0]``); its learning rate is the one with the lowest final *validation* loss. When that
   is at an end of the grid, the grid is widened on that side (same ratio), up to ``--widen`` times.
2. **Seeds.** At its chosen learning rate every model trains again with each other seed.
3. **Held-out test.** The table reports the final loss on the *test* split, which no choice looked at:
   mean and spread (min-max) over the seeds, and whether the difference from GPT-2 is inside them.

Two corpora that exist on every machine, in two regimes:

- ``code``: the Python standard library's source (``data.dataset: stdlib``), 2% of the files held
  out for validation and another 2% for test; the token budget is a fraction of one epoch.
- ``english``: English prose, the documentation topics CPython ships for ``help()``
  (``pydoc-topics``), cut into paragraphs, 10% held out for validation and 10% for test; the same
  budget is several epochs of its ~100k training tokens (where overfitting shows).

    python eval/quality.py                       # GPT-2, the default KAN-GPT-2, per-edge B-spline
    python eval/quality.py --quick               # a smoke run: short budget, no widening
    python eval/quality.py --models mlp,kan,group-chebyshev,rational --corpora code
    python eval/quality.py --variant 'wide-grid={model: {kan_grid_size: 16}}' --models mlp,wide-grid

Any other ``--section.key=value`` overrides the run config of every run. Each run is ``python
train.py OUT/configs/CORPUS/MODEL/lr-LR-seed-SEED.yaml`` in a fresh process (its folder under
``OUT/runs/``); a finished run whose config is unchanged is reused, so an interrupted protocol
continues where it stopped. ``--jobs 2`` trains two runs at a time, each on its share of the cores.
Output: the tables on stdout (markdown), ``OUT/quality.json`` and ``OUT/validation.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from kangpt.comparison.measure import run_fresh_process
from kangpt.data import DataError
from kangpt.io.plotting import new_figure
from kangpt.modeling_kangpt import KANGPT2LMHeadModel
from kangpt.training.report import parameter_counts
from kangpt.training.run_config import (
    ConfigError,
    RunConfig,
    build_config,
    load_config,
    model_config,
    read_yaml,
)
from kangpt.training.run_dir import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MATCH_TOLERANCE = 0.01  # every KAN model's parameter count within 1% of GPT-2's

# name -> (label, overrides of the run config). Held-out splits are fractions of documents.
CORPORA = {
    "code": (
        "Python stdlib source, a fraction of one epoch",
        {"data": {"dataset": "stdlib", "val_fraction": 0.02, "test_fraction": 0.02}},
    ),
    "english": (
        "English prose (pydoc topics), several epochs",
        {"data": {"dataset": "pydoc-topics", "val_fraction": 0.1, "test_fraction": 0.1}},
    ),
}

# name -> (label, overrides). "kan" is whatever KANGPT2Config() builds by default.
VARIANTS = {
    "mlp": ("GPT-2 (MLP)", {"model": {"ffn_type": "mlp"}}),
    "kan": ("KAN-GPT-2 (default)", {"model": {"ffn_type": "kan"}}),
    "edge-bspline": (
        "KAN-GPT-2, per-edge B-spline",
        {"model": {"ffn_type": "kan", "kan_sharing": "edge", "kan_basis": "bspline"}},
    ),
    "edge-rbf": (
        "KAN-GPT-2, per-edge RBF",
        {"model": {"ffn_type": "kan", "kan_sharing": "edge", "kan_basis": "rbf"}},
    ),
    "edge-chebyshev": (
        "KAN-GPT-2, per-edge Chebyshev",
        {"model": {"ffn_type": "kan", "kan_sharing": "edge", "kan_basis": "chebyshev"}},
    ),
    "group-bspline": (
        "KAN-GPT-2, grouped B-spline",
        {"model": {"ffn_type": "kan", "kan_sharing": "group", "kan_basis": "bspline"}},
    ),
    "group-rbf": (
        "KAN-GPT-2, grouped RBF",
        {"model": {"ffn_type": "kan", "kan_sharing": "group", "kan_basis": "rbf"}},
    ),
    "group-chebyshev": (
        "KAN-GPT-2, grouped Chebyshev",
        {"model": {"ffn_type": "kan", "kan_sharing": "group", "kan_basis": "chebyshev"}},
    ),
    # The rational coefficients train best at the base learning rate (3x and 10x multipliers lost).
    "rational": (
        "KAN-GPT-2, group-rational (GR-KAN)",
        {
            "model": {"ffn_type": "kan", "kan_sharing": "group", "kan_basis": "rational"},
            "train": {"kan_function_lr_scale": 1.0},
        },
    ),
}

# Settings of every run, before the user's overrides: 300 steps of 16 x 128 tokens (614,400 tokens)
# at configs/default.yaml's shape, evaluated 4 times on the whole validation split.
PROTOCOL = {
    "train": {
        "max_steps": 300,
        "warmup_steps": 30,
        "eval_interval": 75,
        "log_interval": 25,
        "save_interval": 0,
        "keep_checkpoints": 1,
        "trackers": [],
        "sample_prompt": None,
        "resume": None,
        "overwrite": True,
        "compile": False,
    }
}
QUICK = {"train": {"max_steps": 60, "warmup_steps": 6, "eval_interval": 30, "log_interval": 10}}
DEFAULT_LRS = (1e-3, 2e-3, 4e-3)
DEFAULT_SEEDS = (1337, 1338)


# ---------------------------------------------------------------------------------------------
# The protocol


def merge(base: dict, extra: dict) -> dict:
    """``base`` with the sections of ``extra`` merged in, key by key (a new dict)."""
    out = {section: dict(values) for section, values in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def run_config(base: RunConfig, corpus: str, variant: dict, lr: float, seed: int, out: Path) -> RunConfig:
    """The config of one run: ``base`` on ``corpus``, with the variant's block, ``lr`` and ``seed``."""
    raw = merge(base.to_dict(), CORPORA[corpus][1])
    raw["model"] = {k: v for k, v in raw["model"].items() if k != "kan_hidden_size"}  # parameter-matched
    raw = merge(raw, {section: variant[section] for section in ("model", "train") if section in variant})
    raw["train"].update(
        learning_rate=lr,
        min_learning_rate=lr / 10,
        seed=seed,
        out_dir=str(out / "runs" / run_name(corpus, variant, lr, seed)),
    )
    return build_config(raw)


def run_name(corpus: str, variant: dict, lr: float, seed: int) -> str:
    return f"{corpus}/{variant['name']}/lr-{lr:g}-seed-{seed}"


def parameter_match(configs: dict[str, RunConfig], vocab_size: int) -> dict[str, dict]:
    """Parameters by part and KAN width of every model (meta device); ConfigError unless each total is
    within ``MATCH_TOLERANCE`` of GPT-2's (the first model)."""
    counts = {}
    for name, config in configs.items():
        with torch.device("meta"):
            model = KANGPT2LMHeadModel(model_config(config, vocab_size=vocab_size))
        counts[name] = {
            **parameter_counts(model),
            "kan_hidden_size": model.config.kan_hidden_size if model.config.ffn_type == "kan" else None,
        }
    reference = next(iter(counts.values()))["total"]
    for name, row in counts.items():
        row["ratio"] = row["total"] / reference
        if abs(row["ratio"] - 1) > MATCH_TOLERANCE:
            raise ConfigError(
                f"{name}: {row['total']:,} parameters, {row['ratio']:.4f}x GPT-2's {reference:,}; "
                f"not parameter-matched within {MATCH_TOLERANCE:.0%} at this shape"
            )
    return counts


def choose_lr(val_loss_by_lr: dict[float, float]) -> tuple[float, str | None]:
    """The learning rate with the lowest validation loss, and the side to widen the grid on when it
    is at an end ("low"/"high"), else None."""
    lrs = sorted(val_loss_by_lr)
    best = min(lrs, key=lambda lr: val_loss_by_lr[lr])
    if len(lrs) > 1 and best == lrs[0]:
        return best, "low"
    if len(lrs) > 1 and best == lrs[-1]:
        return best, "high"
    return best, None


def spread(values: list[float]) -> dict:
    """Mean, min and max of the per-seed losses."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def verdict(model: dict, reference: dict) -> str:
    """How ``model``'s test losses compare with ``reference``'s: better/worse when their min-max ranges
    are apart, else inside the spread."""
    if model["max"] < reference["min"]:
        return "better"
    if model["min"] > reference["max"]:
        return "worse"
    return "inside the spread"


# ---------------------------------------------------------------------------------------------
# Running


class Runner:
    """Runs ``python train.py CONFIG`` in fresh processes, ``jobs`` at a time, reusing finished runs.

    ``env`` adds environment variables to every run (the device). ``slot`` (a function returning a
    context manager) replaces the runner's own ``jobs`` slots: the size ladder (eval/scaling.py) runs
    every size's protocol at once on shared slots, so no core waits for one protocol's slowest run.
    """

    def __init__(self, out: Path, jobs: int, slot=None, env: dict | None = None):
        self.out, self.jobs, self.env = out, jobs, env or {}
        own = threading.Semaphore(jobs)
        self.slot = slot or (lambda: own)
        self.threads = max(1, (os.cpu_count() or 1) // jobs)

    def run_all(self, configs: list[RunConfig]) -> list[dict]:
        with ThreadPoolExecutor(max(1, len(configs))) as pool:
            return list(pool.map(self.run, configs))

    def run(self, config: RunConfig) -> dict:
        """Train one config (or reuse it); return its summary."""
        if not self._finished(config):
            with self.slot():
                self._train(config)
        return summarize(config)

    def _train(self, config: RunConfig) -> None:
        """Write the run's config under ``OUT/configs`` and train it with ``self.threads`` threads."""
        folder = Path(config.train.out_dir)
        path = self.out / "configs" / f"{folder.relative_to(self.out / 'runs').as_posix()}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        print(f"[{time.strftime('%H:%M:%S')}] python train.py {path}", file=sys.stderr, flush=True)
        env = {"OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false", **self.env}
        start = time.perf_counter()
        run_fresh_process([str(ROOT / "train.py"), str(path)], env=env)
        (folder / "wall_time.json").write_text(json.dumps({"wall_s": time.perf_counter() - start}))

    @staticmethod
    def _finished(config: RunConfig) -> bool:
        """Whether the run at ``config``'s folder ended with a test loss under the same settings (its
        run.yaml read as a config today: a setting added since then has its default). Its recorded
        ``out_dir`` may name the folder otherwise (relative, or before the protocol's folder moved)."""
        folder = Path(config.train.out_dir)
        try:
            saved = build_config(yaml.safe_load((folder / "run.yaml").read_text())).to_dict()
            saved["train"]["out_dir"] = config.train.out_dir
            same = saved == config.to_dict()
            records = read_metrics(folder / "metrics.jsonl")
        except (OSError, ValueError, ConfigError):
            return False
        return same and (folder / "wall_time.json").is_file() and any("test_loss" in r for r in records)


def summarize(config: RunConfig) -> dict:
    """Final validation and test loss, the validation curve, tokens/s and wall time of a finished run."""
    folder = Path(config.train.out_dir)
    records = read_metrics(folder / "metrics.jsonl")
    tokens_per_step = config.tokens_per_step()
    curve = [(r["step"] * tokens_per_step, r["val_loss"]) for r in records if "val_loss" in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    return {
        "lr": config.train.learning_rate,
        "seed": config.train.seed,
        "val_loss": curve[-1][1],
        "test_loss": next(r["test_loss"] for r in records if "test_loss" in r),
        "curve": curve,
        "tokens_per_s": statistics.median(speeds[1:] or speeds),  # the first window holds the warm-up
        "wall_s": json.loads((folder / "wall_time.json").read_text())["wall_s"],
    }


def protocol(
    base: RunConfig,
    corpora: list[str],
    variants: dict[str, dict],
    lrs: list[float],
    seeds: list[int],
    widen: int,
    runner: Runner,
) -> dict:
    """Sweep, widen, seeds; return ``{corpus: {model: result}}``."""

    def configs(plan):  # plan: [(corpus, name, lr, seed)]
        return [run_config(base, c, variants[n], lr, seed, runner.out) for c, n, lr, seed in plan]

    keys = [(c, n) for c in corpora for n in variants]
    grid = {key: sorted(lrs) for key in keys}
    sweep: dict[tuple, dict[float, dict]] = {key: {} for key in keys}
    todo = [(c, n, lr, seeds[0]) for c, n in keys for lr in grid[(c, n)]]
    for step in range(widen + 1):
        for (c, n, lr, _), result in zip(todo, runner.run_all(configs(todo)), strict=True):
            sweep[(c, n)][lr] = result
        todo = []
        for key in keys:
            best, side = choose_lr({lr: r["val_loss"] for lr, r in sweep[key].items()})
            if side is None or step == widen:
                continue
            lows, ratio = sorted(sweep[key]), lrs[1] / lrs[0] if len(lrs) > 1 else 2.0
            new = lows[0] / ratio if side == "low" else lows[-1] * ratio
            todo.append((*key, new, seeds[0]))
        if not todo:
            break
    chosen = {key: choose_lr({lr: r["val_loss"] for lr, r in sweep[key].items()})[0] for key in keys}
    more = [(c, n, chosen[(c, n)], seed) for c, n in keys for seed in seeds[1:]]
    extra = dict(zip(more, runner.run_all(configs(more)), strict=True))
    results: dict[str, dict] = {c: {} for c in corpora}
    for c, n in keys:
        lr = chosen[(c, n)]
        runs = [sweep[(c, n)][lr], *(extra[(c, n, lr, seed)] for seed in seeds[1:])]
        results[c][n] = {
            "label": variants[n]["label"],
            "lr": lr,
            "sweep": {f"{lr_:g}": r["val_loss"] for lr_, r in sorted(sweep[(c, n)].items())},
            "val": spread([r["val_loss"] for r in runs]),
            "test": spread([r["test_loss"] for r in runs]),
            "curve": runs[0]["curve"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "wall_s": sum(r["wall_s"] for r in sweep[(c, n)].values()) + sum(r["wall_s"] for r in runs[1:]),
        }
    return results


# ---------------------------------------------------------------------------------------------
# Presenting


def markdown(results: dict, settings: dict) -> str:
    """One table per corpus (test loss over seeds at each model's chosen learning rate) + the sweeps."""
    lines = [
        f"Shape: {settings['n_layer']} layers, d={settings['n_embd']}; {settings['tokens']:,} training "
        f"tokens ({settings['max_steps']} steps x {settings['tokens_per_step']:,}); seeds "
        f"{', '.join(map(str, settings['seeds']))}; learning-rate grid "
        f"{', '.join(f'{lr:g}' for lr in settings['lrs'])} (widened up to {settings['widen']}x at an "
        f"end), cosine to lr/10. Wall time {settings['wall_s'] / 60:.1f} min."
    ]
    for corpus, models in results.items():
        info = settings["corpora"][corpus]
        ref = next(iter(models.values()))
        lines += [
            "",
            f"#### {corpus}: {CORPORA[corpus][0]}",
            "",
            f"`{info['dataset']}`: BPE {info['vocab_size']:,}, {info['train_tokens']:,} training tokens "
            f"({settings['tokens'] / info['train_tokens']:.2f} epochs), validation {info['val_tokens']:,} "
            f"and test {info['test_tokens']:,} tokens; unigram baseline {info['unigram']:.3f}.",
            "",
            "| model | KAN width | params | × GPT-2 | lr | test loss, mean | min–max | Δ vs GPT-2 | "
            "vs GPT-2 | val loss, mean | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for name, row in models.items():
            p, t = info["parameters"][name], row["test"]
            width = "" if p["kan_hidden_size"] is None else p["kan_hidden_size"]
            delta = t["mean"] - ref["test"]["mean"]
            versus = "" if row is ref else verdict(t, ref["test"])
            lines.append(
                f"| {row['label']} | {width} | {p['total']:,} | {p['ratio']:.3f}× | {row['lr']:g} | "
                f"{t['mean']:.4f} | {t['min']:.4f}–{t['max']:.4f} | {delta:+.4f} | {versus} | "
                f"{row['val']['mean']:.4f} | {row['tokens_per_s']:,.0f} |"
            )
        all_lrs = sorted({float(lr) for row in models.values() for lr in row["sweep"]})
        lines += [
            "",
            f"Validation loss of the sweep ({corpus}, seed {settings['seeds'][0]}; chosen in bold):",
            "",
            "| model | " + " | ".join(f"{lr:g}" for lr in all_lrs) + " |",
            "|---|" + "---:|" * len(all_lrs),
        ]
        for row in models.values():
            cells = []
            for lr in all_lrs:
                loss = row["sweep"].get(f"{lr:g}")
                text = "" if loss is None else f"{loss:.4f}"
                cells.append(f"**{text}**" if loss is not None and lr == row["lr"] else text)
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> bool:
    """Validation loss against training tokens at each model's chosen learning rate (first seed), one
    panel per corpus; False without matplotlib."""
    try:
        fig = new_figure(6 * len(results), 4.5, layout=None)
    except ModuleNotFoundError:
        return False
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (corpus, models) in zip(axes, results.items(), strict=True):
        for row in models.values():
            tokens, losses = zip(*row["curve"], strict=True)
            ax.plot(
                [t / 1e6 for t in tokens],
                losses,
                "o-",
                markersize=3,
                label=f"{row['label']} (lr {row['lr']:g})",
            )
        ax.set(xlabel="training tokens (millions)", ylabel="validation loss (nats/token)", title=corpus)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------------------------
# Command line


def parse_variants(names: str, extra: list[str]) -> dict[str, dict]:
    """The variants named in ``names`` (GPT-2's MLP first), from :data:`VARIANTS` and ``--variant``s."""
    known = {name: {"label": label, **sections} for name, (label, sections) in VARIANTS.items()}
    for spec in extra:
        name, sep, text = spec.partition("=")
        sections = read_yaml(text) if sep else None
        if not name or not isinstance(sections, dict) or set(sections) - {"model", "train", "label"}:
            raise ConfigError(
                f"--variant must look like NAME={{model: {{...}}, train: {{...}}}}, got {spec!r}"
            )
        known[name] = {"label": sections.pop("label", name), **sections}
    chosen = names.split(",")
    unknown = [n for n in chosen if n not in known]
    if unknown or chosen[0] != "mlp" or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"--models must start with mlp and name each model once, among {', '.join(known)}; got {names!r}"
        )
    return {n: {"name": n, **known[n]} for n in chosen}


def protocol_parser(description: str, models: str) -> argparse.ArgumentParser:
    """The arguments of a protocol (this script's and eval/scaling.py's): base config, models, corpora,
    learning-rate grid, seeds, widening, jobs; ``models`` is the default of ``--models``."""
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other --section.key=value arguments override every run's config.",
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="base run config")
    parser.add_argument("--models", default=models, help="comma-separated, mlp first")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="define a model, e.g. 'g16={model: {kan_grid_size: 16}}' (repeatable)",
    )
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"among {', '.join(CORPORA)}")
    parser.add_argument(
        "--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS), help="peak learning rates"
    )
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="the first one sweeps")
    parser.add_argument(
        "--widen", type=int, default=2, help="grid steps added at most where the best is at an end"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (the cores are shared out)")
    return parser


def protocol_choices(args) -> tuple[dict[str, dict], list[str], list[float], list[int]]:
    """The models, corpora, learning rates and seeds ``args`` name; ConfigError for a bad one."""
    variants = parse_variants(args.models, args.variant)
    corpora = args.corpora.split(",")
    if not corpora or any(c not in CORPORA for c in corpora):
        raise ConfigError(f"--corpora must name some of {', '.join(CORPORA)}, got {args.corpora!r}")
    lrs, seeds = _numbers(args.lrs, float, "--lrs"), _numbers(args.seeds, int, "--seeds")
    if args.jobs < 1 or args.widen < 0:
        raise ConfigError("--jobs must be >= 1 and --widen >= 0")
    return variants, corpora, lrs, seeds


def protocol_config(path: str, settings: dict, overrides: list[str]) -> RunConfig:
    """The run config at ``path`` with the protocol's ``settings`` (sections of keys), then ``overrides``."""
    flat = [f"--{s}.{k}={json.dumps(v)}" for s, values in settings.items() for k, v in values.items()]
    return load_config(path, [*flat, *overrides])


def main(argv: list[str] | None = None) -> int:
    parser = protocol_parser(__doc__.split("\n\n")[0], "mlp,kan,edge-bspline")
    parser.add_argument("--quick", action="store_true", help="a short budget and no widening (smoke test)")
    parser.add_argument(
        "--out", default="out/quality", help="folder of the runs, quality.json, validation.png"
    )
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    try:
        variants, corpora, lrs, seeds = protocol_choices(args)
        base = protocol_config(args.config, merge(PROTOCOL, QUICK) if args.quick else PROTOCOL, overrides)
        settings = {
            "config": args.config,
            "widen": args.widen,
            "quick": args.quick,
            "jobs": args.jobs,
            **describe(base, corpora, variants, lrs, seeds, out),
        }
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        results = protocol(
            base, corpora, variants, lrs, seeds, 0 if args.quick else args.widen, Runner(out, args.jobs)
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    settings["wall_s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(markdown(results, settings))
    plotted = plot_curves(results, out / "validation.png")
    print(
        f"\nwrote {out / 'quality.json'}" + (f", {out / 'validation.png'}" if plotted else ""),
        file=sys.stderr,
    )
    return 0


def describe(base: RunConfig, corpora, variants, lrs, seeds, out: Path) -> dict:
    """The protocol's settings and, per corpus, the data's sizes and every model's parameters (checked);
    ``out`` is the protocol's folder."""
    from accelerate import Accelerator

    from kangpt.training.corpus import load_corpus

    t = base.train
    tokens_per_step = base.tokens_per_step()
    shape = model_config(base)
    settings = {
        "models": list(variants),
        "lrs": lrs,
        "seeds": seeds,
        "n_layer": shape.n_layer,
        "n_embd": shape.n_embd,
        "max_steps": t.max_steps,
        "tokens_per_step": tokens_per_step,
        "tokens": t.max_steps * tokens_per_step,
        "variants": variants,
        "corpora": {},
    }
    for corpus in corpora:
        config = run_config(base, corpus, variants["mlp"], lrs[0], seeds[0], out)
        data = load_corpus(config.data, config.train, Accelerator(cpu=True))
        configs = {n: run_config(base, corpus, v, lrs[0], seeds[0], out) for n, v in variants.items()}
        settings["corpora"][corpus] = {
            "dataset": config.data.dataset,
            "vocab_size": len(data.tokenizer),
            "train_tokens": len(data.train) * config.data.block_size,
            "val_tokens": len(data.val) * config.data.block_size,
            "test_tokens": len(data.test) * config.data.block_size,
            "unigram": data.baseline,
            "parameters": parameter_match(configs, len(data.tokenizer)),
        }
    return settings


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"{flag} must be distinct positive numbers, got {text!r}")
    return values


if __name__ == "__main__":
    sys.exit(main())
