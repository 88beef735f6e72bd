"""Does KAN-GPT-2's advantage over GPT-2 hold as the model grows? The quality protocol on a size ladder.

At every size of ``--sizes`` (``LAYERSxWIDTH`` or ``LAYERSxWIDTHxHEADS``; heads default to the base
config's) this runs ``eval/quality.py``'s protocol unchanged: every model parameter-matched to GPT-2,
its own learning-rate sweep (widened at an end), the other seeds at the chosen rate, the test split
reported. What changes with the size is the token budget: ``--tokens-per-param`` times GPT-2's total
parameter count at that size (embeddings included), so no size starves. The warm-up is a tenth of the
steps, as in the one-size protocol; the validation split is read once, at the end (the sweep reads
nothing else, and at the smallest sizes four reads cost more than the training).

Three settings differ from the one-size protocol, so that a ladder spanning 8x in parameters fits a
few hours of 2 CPU cores and its smallest size still trains for hundreds of steps (``LADDER``; any
``--section.key=value`` overrides them): a 1,024-token BPE (at 4,096 the embeddings are most of a
small model's parameters and of its cost), 4 x 128 tokens per step, and 2 tokens per parameter.
Fewer steps leave a small model near the unigram baseline, measuring how fast it leaves the start
rather than what its size can learn; the first CPU ladder (4,096 tokens, 16 x 128 per step, 0.46
tokens per parameter) trained its smallest size 42 steps and could not answer.

Per corpus and model it fits a power law ``loss = a * N**-alpha`` to the test losses of every seed
(least squares in log-log), against total parameters N and against training FLOPs (matrix-multiply
FLOPs of a training step, counted by ``torch.utils.flop_counter``, times the steps), with the
exponent's standard error; and it fits the KAN-minus-GPT-2 gap against log10(N) to say whether it
grows, holds or shrinks.

    python eval/scaling.py --jobs 2                                  # the CPU ladder (README)
    python eval/scaling.py --quick                                   # a smoke run
    python eval/scaling.py --sizes 4x128,6x192,8x256,8x384 --device cuda --jobs 1 \
        --data.vocab_size=4096 --train.batch_size=32 --out out/scaling-gpu    # on a GPU

Each size's runs live under ``OUT/LxW/`` (quality.py's layout); finished runs are reused, so an
interrupted ladder continues where it stopped. Output: the tables on stdout (markdown),
``OUT/scaling.json`` and ``OUT/scaling.png``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py, the protocol of one size
import quality  # noqa: E402

from kangpt.data import DataError  # noqa: E402
from kangpt.io.plotting import new_figure  # noqa: E402
from kangpt.modeling_kangpt import KANGPT2LMHeadModel  # noqa: E402
from kangpt.training.run_config import ConfigError, RunConfig, build_config, model_config  # noqa: E402

DEFAULT_SIZES = "4x32,4x48,4x72,4x112"  # 88k to 737k parameters (8.4x) at vocabulary 1024
# The smallest size's 300 steps of 512 tokens need 1.75 tokens per parameter; 2 is the round number above.
DEFAULT_TOKENS_PER_PARAM = 2.0
# The ladder's settings on top of the one-size protocol's (the module docstring says why).
LADDER = {"data": {"vocab_size": 1024}, "train": {"batch_size": 4}}
# --device -> the runs' environment: accelerate trains on a GPU when there is one, unless told the CPU.
DEVICES = {"auto": {}, "cpu": {"ACCELERATE_USE_CPU": "1"}, "cuda": {}}
# A fit's gap trend counts as a trend only beyond this many standard errors.
SIGNIFICANT = 2.0


# ---------------------------------------------------------------------------------------------
# Sizes and their budgets


def ladder_base(path: str, overrides: list[str]) -> RunConfig:
    """The run config at ``path`` with the one-size protocol's settings, ``LADDER``'s, then ``overrides``."""
    return quality.protocol_config(path, quality.merge(quality.PROTOCOL, LADDER), overrides)


def parse_sizes(text: str, default_heads: int) -> list[tuple[int, int, int]]:
    """``"4x64,4x128x8"`` -> ``[(4, 64, default_heads), (4, 128, 8)]``, smallest first."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or min(numbers) < 1:
            raise ConfigError(f"--sizes must be LAYERSxWIDTH[xHEADS] items like 4x128, got {item!r}")
        layers, width, heads = (*numbers, default_heads)[:3]
        if width % heads:
            raise ConfigError(f"--sizes: width {width} of {item!r} is not a multiple of {heads} heads")
        sizes.append((layers, width, heads))
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"--sizes names a size twice: {text!r}")
    return sorted(sizes, key=lambda s: s[0] * s[1] ** 2)


def size_name(size: tuple[int, int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def gpt2_parameters(base: RunConfig, size: tuple[int, int, int]) -> int:
    """GPT-2's total parameters (embeddings included) at ``size``, its vocabulary ``data.vocab_size``."""
    raw = shaped(base.to_dict(), size)
    raw["model"]["ffn_type"] = "mlp"
    with torch.device("meta"):
        model = KANGPT2LMHeadModel(model_config(build_config(raw), vocab_size=base.data.vocab_size))
    return sum(p.numel() for p in model.parameters())


def shaped(raw: dict, size: tuple[int, int, int]) -> dict:
    layers, width, heads = size
    raw = quality.merge(raw, {"model": {"n_layer": layers, "n_embd": width, "n_head": heads}})
    raw["model"].pop("kan_hidden_size", None)  # every model is parameter-matched at its size
    return raw


def size_config(base: RunConfig, size: tuple[int, int, int], tokens_per_param: float) -> RunConfig:
    """``base`` at ``size``, trained on ``tokens_per_param`` x GPT-2's parameters (whole steps)."""
    steps = max(4, round(tokens_per_param * gpt2_parameters(base, size) / base.tokens_per_step()))
    schedule = {
        "max_steps": steps,
        "warmup_steps": max(1, round(steps / 10)),
        "eval_interval": steps,  # only the final validation loss is read: at small sizes it costs most
        "log_interval": max(1, steps // 12),
    }
    return build_config(quality.merge(shaped(base.to_dict(), size), {"train": schedule}))


def flops_per_token(config: RunConfig, vocab_size: int) -> float:
    """Matrix-multiply FLOPs of one training token (forward and backward) of ``config``'s model: one
    sequence of ``block_size`` tokens counted by ``FlopCounterMode`` on the CPU, per token."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = KANGPT2LMHeadModel(model_config(config, vocab_size=vocab_size))
    ids = torch.randint(vocab_size, (1, config.data.block_size))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops() / ids.numel()


def training_flops(config: RunConfig, settings: dict, corpora, variants: dict, out: Path) -> dict:
    """``{corpus: {model: matmul FLOPs of its training}}`` at one size (``settings`` from
    ``quality.describe``); counted once per model and vocabulary size, which the corpora's BPEs share."""
    per_token: dict[tuple[str, int], float] = {}
    flops: dict[str, dict] = {}
    for corpus in corpora:
        vocab = settings["corpora"][corpus]["vocab_size"]
        flops[corpus] = {}
        for name, variant in variants.items():
            if (name, vocab) not in per_token:
                run = quality.run_config(config, corpus, variant, 1e-3, 0, out)  # rate, seed: no matter
                per_token[name, vocab] = flops_per_token(run, vocab)
            flops[corpus][name] = settings["tokens"] * per_token[name, vocab]
    return flops


# ---------------------------------------------------------------------------------------------
# Fits


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares ``y = intercept + slope * x`` with the slope's standard error (nan under 3 points)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    stderr = math.sqrt(residual / (n - 2) / sxx) if n > 2 else math.nan
    return {"slope": slope, "intercept": intercept, "stderr": stderr, "points": n}


def power_law(xs: list[float], losses: list[float]) -> dict:
    """``loss = a * x**-alpha`` fitted in log-log: alpha, its standard error, a."""
    line = fit_line([math.log(x) for x in xs], [math.log(v) for v in losses])
    return {"alpha": -line["slope"], "alpha_stderr": line["stderr"], "a": math.exp(line["intercept"])}


def gap_trend(params: list[float], gaps: list[float]) -> dict:
    """The KAN-minus-GPT-2 test-loss gap against log10(parameters), and what it says: does the gap
    grow, hold or shrink with size (a trend counts beyond ``SIGNIFICANT`` standard errors)."""
    line = fit_line([math.log10(p) for p in params], gaps)
    mean = sum(gaps) / len(gaps)
    moving = not math.isnan(line["stderr"]) and abs(line["slope"]) > SIGNIFICANT * line["stderr"]
    who = "advantage" if mean < 0 else "deficit"
    if not moving:
        answer = "holds"
    elif (line["slope"] < 0) == (mean < 0):  # the gap moves away from zero
        answer = "grows"
    else:
        answer = "shrinks"
    return {**line, "mean": mean, "answer": f"KAN-GPT-2's {who} {answer}"}


def analyse(ladder: dict, sizes: list[str], models: list[str]) -> dict:
    """Per corpus: each model's power laws (vs parameters and vs FLOPs) and each KAN model's gap trend."""
    fits: dict[str, dict] = {}
    for corpus in ladder[sizes[0]]["results"]:
        fits[corpus] = {}
        for name in models:
            points = [
                (ladder[s]["parameters"][corpus][name]["total"], ladder[s]["flops"][corpus][name], loss)
                for s in sizes
                for loss in ladder[s]["results"][corpus][name]["test"]["values"]
            ]
            params, flops, losses = zip(*points, strict=True)
            fits[corpus][name] = {"parameters": power_law(params, losses), "flops": power_law(flops, losses)}
            if name != "mlp":
                gaps = [
                    ladder[s]["results"][corpus][name]["test"]["mean"]
                    - ladder[s]["results"][corpus]["mlp"]["test"]["mean"]
                    for s in sizes
                ]
                reference = [ladder[s]["parameters"][corpus]["mlp"]["total"] for s in sizes]
                fits[corpus][name]["gap"] = gap_trend(reference, gaps)
    return fits


# ---------------------------------------------------------------------------------------------
# Running


class Slots:
    """``jobs`` training slots shared by every size's protocol, handed to the waiting run of the
    largest size first: its runs are the longest, and the ladder ends with its last stage."""

    def __init__(self, jobs: int):
        self.free, self.waiting, self.turn = jobs, [], threading.Condition()

    @contextmanager
    def for_size(self, rank: int):
        """A slot for a run of the size ``rank`` (larger ranks first, then first come first served)."""
        ticket = (-rank, next(self._tickets))
        with self.turn:
            heapq.heappush(self.waiting, ticket)
            self.turn.wait_for(lambda: self.free > 0 and self.waiting[0] == ticket)
            heapq.heappop(self.waiting)
            self.free -= 1
            self.turn.notify_all()
        try:
            yield
        finally:
            with self.turn:
                self.free += 1
                self.turn.notify_all()

    _tickets = itertools.count()


def run_ladder(base: RunConfig, sizes, corpora, variants, lrs, seeds, args) -> dict:
    """Every size's protocol, all at once on ``args.jobs`` shared slots (the largest size first in the
    queue, so that no core idles at the end); ``{size: {settings, parameters, flops, results}}``."""
    out = Path(args.out)
    slots = Slots(args.jobs)
    ladder = {}
    for size in sizes:  # one at a time: the first one trains and caches the tokenizers
        name = size_name(size)
        config = size_config(base, size, args.tokens_per_param)
        settings = quality.describe(config, corpora, variants, lrs, seeds, out / name)
        ladder[name] = {
            "config": config,
            "settings": settings,
            "parameters": {c: settings["corpora"][c].pop("parameters") for c in corpora},
        }

    def protocol(name: str) -> dict:
        rank = list(ladder).index(name)
        runner = quality.Runner(out / name, args.jobs, lambda: slots.for_size(rank), DEVICES[args.device])
        widen = 0 if args.quick else args.widen
        return quality.protocol(ladder[name]["config"], corpora, variants, lrs, seeds, widen, runner)

    names = list(reversed(ladder))
    with ThreadPoolExecutor(len(names)) as pool:
        for name, results in zip(names, pool.map(protocol, names), strict=True):
            ladder[name]["results"] = results
    for name, entry in ladder.items():
        entry["flops"] = training_flops(entry.pop("config"), entry["settings"], corpora, variants, out / name)
    return ladder


# ---------------------------------------------------------------------------------------------
# Presenting


def markdown(ladder: dict, fits: dict, variants: dict, meta: dict) -> str:
    """Per corpus: the ladder table, the fitted exponents and the answer."""
    sizes = list(ladder)
    first = ladder[sizes[0]]["settings"]
    lines = [
        f"Sizes {', '.join(sizes)} (layers x width; {meta['heads']}); "
        f"{meta['tokens_per_param']:g} training tokens per GPT-2 parameter (embeddings included) at "
        f"every size, {first['tokens_per_step']:,} tokens per step; "
        f"seeds {', '.join(map(str, meta['seeds']))}; "
        f"learning-rate grid {', '.join(f'{lr:g}' for lr in meta['lrs'])} per size and model (widened "
        f"up to {meta['widen']}x at an end), cosine to lr/10. Wall time {meta['wall_s'] / 60:.1f} min."
    ]
    for corpus in fits:
        lines += [
            "",
            f"#### {corpus}: {quality.CORPORA[corpus][0]}",
            "",
            f"BPE {first['corpora'][corpus]['vocab_size']:,}; unigram baseline "
            f"{first['corpora'][corpus]['unigram']:.3f} nats/token.",
            "",
            "| size | model | params (total) | non-embedding | tokens | steps | epochs | lr | "
            "test loss, mean | min–max | Δ vs GPT-2 | vs GPT-2 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for size in sizes:
            entry = ladder[size]
            info, ref = entry["settings"]["corpora"][corpus], entry["results"][corpus]["mlp"]
            tokens, steps = entry["settings"]["tokens"], entry["settings"]["max_steps"]
            for name, row in entry["results"][corpus].items():
                p, t = entry["parameters"][corpus][name], row["test"]
                versus = "" if name == "mlp" else quality.verdict(t, ref["test"])
                lines.append(
                    f"| {size} | {row['label']} | {p['total']:,} | {p['total'] - p['embeddings']:,} | "
                    f"{tokens:,} | {steps:,} | {tokens / info['train_tokens']:.2f} | "
                    f"{row['lr']:g} | {t['mean']:.4f} | {t['min']:.4f}–{t['max']:.4f} | "
                    f"{t['mean'] - ref['test']['mean']:+.4f} | {versus} |"
                )
        lines += [
            "",
            "| model | alpha vs parameters | alpha vs FLOPs | gap trend per decade of parameters |",
            "|---|---:|---:|---|",
        ]
        for name, fit in fits[corpus].items():
            trend = fit.get("gap")
            lines.append(
                f"| {variants[name]['label']} | {_alpha(fit['parameters'])} | {_alpha(fit['flops'])} | "
                + (
                    ""
                    if trend is None
                    else f"{trend['slope']:+.4f} ± {trend['stderr']:.4f}: {trend['answer']}"
                )
                + " |"
            )
    return "\n".join(lines)


def _alpha(fit: dict) -> str:
    return f"{fit['alpha']:.4f} ± {fit['alpha_stderr']:.4f}"


def plot(ladder: dict, fits: dict, variants: dict, path: Path) -> bool:
    """Test loss against parameters and against FLOPs (log-log, every seed, the fitted laws), a row per
    corpus; False without matplotlib."""
    try:
        fig = new_figure(11, 4.2 * len(fits), layout=None)
    except ModuleNotFoundError:
        return False
    axes = fig.subplots(len(fits), 2, squeeze=False)
    for row, corpus in zip(axes, fits, strict=True):
        for ax, axis in zip(row, ("parameters", "flops"), strict=True):
            for color, name in zip(("C0", "C1", "C2", "C3", "C4", "C5"), variants, strict=False):
                xs, ys = [], []
                for entry in ladder.values():
                    x = (
                        entry["parameters"][corpus][name]["total"]
                        if axis == "parameters"
                        else entry["flops"][corpus][name]
                    )
                    for loss in entry["results"][corpus][name]["test"]["values"]:
                        xs.append(x)
                        ys.append(loss)
                law = fits[corpus][name][axis]
                ends = [min(xs), max(xs)]
                ax.plot(xs, ys, "o", color=color, markersize=4, alpha=0.7)
                ax.plot(
                    ends,
                    [law["a"] * x ** -law["alpha"] for x in ends],
                    "-",
                    color=color,
                    label=f"{variants[name]['label']}: alpha {_alpha(law)}",
                )
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="parameters (total)" if axis == "parameters" else "training FLOPs (matmul)",
                ylabel="test loss (nats/token)",
                title=corpus,
            )
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = quality.protocol_parser(__doc__.split("\n\n")[0], "mlp,kan")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="LAYERSxWIDTH[xHEADS], comma-separated")
    parser.add_argument(
        "--tokens-per-param", type=float, default=DEFAULT_TOKENS_PER_PARAM, help="tokens per parameter"
    )
    parser.add_argument(
        "--device", choices=list(DEVICES), default="auto", help="where the runs train (auto: a GPU if any)"
    )
    parser.add_argument("--quick", action="store_true", help="a fifth of the tokens, no widening (smoke)")
    parser.add_argument("--out", default="out/scaling", help="folder of the runs, scaling.json, scaling.png")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    try:
        variants, corpora, lrs, seeds = quality.protocol_choices(args)
        if not (math.isfinite(args.tokens_per_param) and args.tokens_per_param > 0):
            raise ConfigError(f"--tokens-per-param must be a positive number, got {args.tokens_per_param}")
        if args.quick:
            args.tokens_per_param /= 5
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device on this machine")
        base = ladder_base(args.config, overrides)
        sizes = parse_sizes(args.sizes, base.model.get("n_head", 12))
        if len(sizes) < 2:
            raise ConfigError(f"--sizes must name at least two sizes to fit a law, got {args.sizes!r}")
        start = time.perf_counter()
        ladder = run_ladder(base, sizes, corpora, variants, lrs, seeds, args)
    except (ConfigError, DataError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    meta = {
        "sizes": list(ladder),
        "heads": ", ".join(sorted({f"{s[2]} attention heads" for s in sizes})),
        "tokens_per_param": args.tokens_per_param,
        "lrs": lrs,
        "seeds": seeds,
        "widen": 0 if args.quick else args.widen,
        "jobs": args.jobs,
        "wall_s": time.perf_counter() - start,
    }
    fits = analyse(ladder, list(ladder), list(variants))
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": meta, "ladder": ladder, "fits": fits}
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(ladder, fits, variants, meta))
    plotted = plot(ladder, fits, variants, out / "scaling.png")
    print(
        f"\nwrote {out / 'scaling.json'}" + (f", {out / 'scaling.png'}" if plotted else ""), file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
