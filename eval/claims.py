"""The claims made for KANs, tested on a language model: one command, one table, each claim answered.

The claims (what the KAN papers and what is written of them say), and the experiment that answers
each, KAN-GPT-2 (the default block) against GPT-2 at equal parameters and equal tokens, each at its own
best learning rate from the same sweep, on 2 seeds:

1. *Fewer parameters.* For each size of the ladder, the GPT-2 parameters that reach KAN-GPT-2's test
   loss on the same tokens: GPT-2 trained at the neighbouring sizes (and one above the largest) on that
   size's tokens, its loss interpolated in log-log between the two sizes that bracket KAN-GPT-2's (never
   extrapolated: outside them the answer is a bound). ``claims.png`` plots both curves.
2. *Slower to train.* The training step and generation ratios of ``kangpt compare`` (one run).
3. *Scale better.* The ladder's power-law exponents and the trend of the gap (``eval/scaling.py``).
4. *Less prone to overfitting.* The gap between training and held-out loss as epochs grow (the English
   ladder: 1.4 to 12 epochs), and at the largest size levers a user would reach for: dropout on the
   KAN block's hidden units, weight decay on the function coefficients, a coarser grid, one group (each
   swept over half, once and twice the rate the plain block chose there, widened at an end), and an
   early stop on validation (the test loss of the checkpoint with the best validation loss); against
   GPT-2's best: as trained, with its own dropout 0.1 (swept alike) or stopped early.
5. *Symbolic.* Every group function of the largest trained KAN-GPT-2 replaced by its formula (a model
   folder ``from_pretrained`` loads), and global pruning of hidden units: the largest share whose
   validation loss stays within 1% (no fine-tune), its test loss and folder size; and 30% and 50%
   pruned, then fine-tuned for a tenth of the run's steps at the rate its schedule ended on.
6. *No catastrophic forgetting.* The code models of one size fine-tuned on English for a fixed budget:
   the rise of the code test loss and the English test loss reached.

    python eval/claims.py --jobs 2        # the audit (hours on 2 cores); out/claims/claims.json, .md, .png
    python eval/claims.py --quick --out out/claims-quick   # a smoke run: tiny sizes, short budgets, one rate

Every run is a ``python train.py`` in a fresh process under ``OUT``; finished runs are reused, so the
ladder of ``eval/scaling.py --out OUT/ladder`` counts, and an interrupted audit continues.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import fmean
from types import SimpleNamespace

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py and scaling.py, the protocols
import quality  # noqa: E402
import scaling  # noqa: E402

from kangpt.io.plotting import PLOT_HINT, new_figure  # noqa: E402
from kangpt.training.run_config import INIT_FROM_MODEL_FIELDS, ConfigError, RunConfig, build_config  # noqa: E402
from kangpt.training.run_dir import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The levers of claim 4, each on the default block (parameter-matched anew).
LEVERS = {
    "kan-dropout": ("dropout 0.1 on the hidden units", {"model": {"kan_dropout": 0.1}}),
    "kan-decay": ("weight decay 0.1 on the coefficients", {"train": {"kan_function_weight_decay": 0.1}}),
    "kan-grid3": ("a coarser grid (3 intervals)", {"model": {"kan_grid_size": 3}}),
    "kan-groups1": ("one group", {"model": {"kan_groups": 1}}),
}
# The fair reference for the levers: GPT-2 with its own regulariser, dropout 0.1 on the embeddings,
# attention and residual branches (GPT-2's default, which the ladder turns off for both models).
GPT2_DROPOUT = {"name": "mlp-dropout", "label": "GPT-2 with its dropout 0.1",
                "model": {"ffn_type": "mlp", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}}
PRUNE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
WITHIN = 0.01  # claim 5: at most 1% more held-out loss
PRUNE_TARGET = 0.3  # claim 5: the share of hidden units pruned within it that the claim asks for
PRUNE_FINE_TUNED = (0.3, 0.5)  # claim 5: shares also pruned and then fine-tuned briefly (--quick: the first)
FINE_TUNE = {"steps": 300, "lrs": (1e-4, 3e-4, 1e-3)}  # claim 6: the English budget and its sweep
AUDIT = "`python eval/claims.py --jobs 2`"  # the command of the rows it alone measures
QUICK = {"sizes": "2x16,2x24", "above": "2x32", "forgetting_size": "2x16",  # --quick's defaults
         "lrs": "2e-3", "seeds": "1337,1338", "widen": 0}


def main(argv: list[str] | None = None) -> int:
    parser = quality.protocol_parser(__doc__.split("\n\n")[0], "mlp,kan")
    parser.add_argument("--sizes", default=scaling.DEFAULT_SIZES, help="the ladder, LAYERSxWIDTH[xHEADS]")
    parser.add_argument("--above", default="4x160", help="GPT-2 size above the ladder's largest (claim 1)")
    parser.add_argument("--forgetting-size", default="4x72", help="the size of claim 6")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets, one rate (smoke)")
    parser.add_argument("--out", default="out/claims", help="folder of every run and of the report")
    args, overrides = parser.parse_known_args(argv)
    if args.quick:  # its own defaults; an option given on the command line still counts
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        FINE_TUNE.update(steps=20, lrs=(1e-3,))
    try:
        report = audit(args, overrides)
    except (ConfigError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    (out / "claims.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "claims.md").write_text(text + "\n")
    print(text)
    if not plot_parameters(report["parameters"], out / "claims.png"):
        print("no claims.png: " + PLOT_HINT, file=sys.stderr)
    return 0


def audit(args, overrides: list[str]) -> dict:
    """Every experiment, in order; the report's data."""
    start = time.perf_counter()
    variants, corpora, lrs, seeds = quality.protocol_choices(args)
    if list(variants) != ["mlp", "kan"]:
        raise ConfigError("--models must be mlp,kan: the claims are the default block's")
    base = scaling.ladder_base(args.config, overrides)
    heads = base.model.get("n_head", 12)
    sizes = scaling.parse_sizes(args.sizes, heads)
    above = scaling.parse_sizes(args.above, heads)[0]
    out = Path(args.out)
    tpp = scaling.DEFAULT_TOKENS_PER_PARAM / (5 if args.quick else 1)
    ladder_args = SimpleNamespace(out=out / "ladder", jobs=args.jobs, quick=args.quick, widen=args.widen,
                                  tokens_per_param=tpp, device="cpu")
    ladder = scaling.run_ladder(base, sizes, corpora, variants, lrs, seeds, ladder_args)
    fits = scaling.analyse(ladder, list(ladder), list(variants))
    context = SimpleNamespace(base=base, sizes=sizes, ladder=ladder, corpora=corpora, lrs=lrs, seeds=seeds,
                              out=out, jobs=args.jobs, tpp=tpp, widen=args.widen,
                              prune_shares=PRUNE_FINE_TUNED[:1] if args.quick else PRUNE_FINE_TUNED)
    report = {
        "settings": {"sizes": list(ladder), "above": scaling.size_name(above), "lrs": lrs, "seeds": seeds,
                     "tokens_per_param": tpp, "quick": args.quick},
        "parameters": multiplier(context, above),
        "speed": speed(out, args.quick),
        "scaling": {corpus: fits[corpus]["kan"]["gap"] | {"alpha": {name: fits[corpus][name]["parameters"]
                                                                   for name in variants}}
                    for corpus in corpora},
        "overfitting": overfitting(context),
        "symbolic": symbolic(context),
        "forgetting": forgetting(context, scaling.parse_sizes(args.forgetting_size, heads)[0]),
    }
    report["settings"]["wall_s"] = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------
# The runs and what they read


def chosen(context, size: str, corpus: str, model: str) -> dict:
    """The ladder's result of ``model`` at ``size`` on ``corpus`` (its learning rate, test losses)."""
    return context.ladder[size]["results"][corpus][model]


def run_folder(out: Path, corpus: str, model: str, lr: float, seed: int) -> Path:
    """Where ``quality.Runner`` under ``out`` trained that run."""
    return out / "runs" / quality.run_name(corpus, {"name": model}, lr, seed)


def schedule_of(config: RunConfig) -> dict:
    keys = ("max_steps", "warmup_steps", "eval_interval", "log_interval")
    return {key: getattr(config.train, key) for key in keys}


def at_size(context, size: tuple, tokens_of: tuple | None = None) -> RunConfig:
    """The ladder's config at ``size``, on the token budget of size ``tokens_of`` (default its own)."""
    own = scaling.size_config(context.base, size, context.tpp)
    if tokens_of is None:
        return own
    budget = scaling.size_config(context.base, tokens_of, context.tpp)
    return build_config(quality.merge(own.to_dict(), {"train": schedule_of(budget)}))


def train_all(jobs: int, configs: list[RunConfig]) -> dict[Path, dict]:
    """Train (or reuse) ``configs`` together, ``jobs`` at a time, each by the ``quality.Runner`` of its
    protocol folder (the one above ``runs/``); their summaries by run folder."""
    slots = threading.Semaphore(jobs)

    def run(config: RunConfig) -> dict:
        folder = Path(config.train.out_dir)
        out = next(parent.parent for parent in folder.parents if parent.name == "runs")
        return quality.Runner(out, jobs, lambda: slots).run(config)

    with ThreadPoolExecutor(max(1, len(configs))) as pool:
        summaries = list(pool.map(run, configs))
    return {Path(c.train.out_dir): s for c, s in zip(configs, summaries, strict=True)}


# ---------------------------------------------------------------------------------------------
# 1. Fewer parameters


def multiplier(context, above: tuple) -> dict:
    """Per corpus and size: GPT-2's (parameters, test loss) at that size's tokens, KAN-GPT-2's test loss,
    and the GPT-2 parameters that reach it (``equivalent``; ``bound`` ">" or "<" when none bracket it)."""
    sizes = [*context.sizes, above]
    names = [scaling.size_name(s) for s in sizes]
    # (size, corpus) -> GPT-2 at the neighbouring sizes on that size's tokens: [(parameters, runs)]
    plans = {(names[i], corpus): [neighbour(context, sizes[j], names[j], size, names[i], corpus)
                                  for j in (i - 1, i + 1) if 0 <= j < len(sizes)]
             for i, size in enumerate(context.sizes) for corpus in context.corpora}
    summaries = train_all(context.jobs, [run for plan in plans.values() for _, runs in plan for run in runs])
    result = {c: {} for c in context.corpora}
    for (name, corpus), plan in plans.items():
        points = [(context.ladder[name]["parameters"][corpus]["mlp"]["total"],
                   chosen(context, name, corpus, "mlp")["test"]["mean"])]
        points += [(params, fmean(summaries[Path(r.train.out_dir)]["test_loss"] for r in runs))
                   for params, runs in plan]
        kan = chosen(context, name, corpus, "kan")["test"]["mean"]
        kan_params = context.ladder[name]["parameters"][corpus]["kan"]["total"]
        result[corpus][name] = {"kan_parameters": kan_params, "kan_loss": kan,
                                "gpt2": sorted(points), **equivalent(sorted(points), kan, kan_params)}
    return result


def plot_parameters(parameters: dict, path: Path) -> bool:
    """Claim 1's curves, a panel per corpus (parameters on a log axis): KAN-GPT-2's test loss over the
    ladder, and for each of its sizes GPT-2's test loss at more sizes on that size's tokens, with a
    dashed line from KAN-GPT-2's point to where GPT-2's curve reaches its loss (dotted to the end of
    the curve where that is a bound). False without matplotlib."""
    try:
        fig = new_figure(5.5 * len(parameters), 4.2)
    except ModuleNotFoundError:
        return False
    for ax, (corpus, sizes) in zip(fig.subplots(1, len(parameters), squeeze=False)[0], parameters.items(),
                                   strict=True):
        kan = [[r["kan_parameters"] for r in sizes.values()], [r["kan_loss"] for r in sizes.values()]]
        ax.plot(*kan, "*-", color="C1", markersize=10, label="KAN-GPT-2 (the ladder)")
        for color, (size, r) in zip(("C0", "C2", "C3", "C4", "C5", "C6"), sizes.items(), strict=False):
            gpt2 = zip(*r["gpt2"], strict=True)  # (parameters, losses)
            ax.plot(*gpt2, "o-", color=color, alpha=0.7, label=f"GPT-2 on {size}'s tokens")
            if r["equivalent"]:
                style = "--" if r["bound"] is None else ":"
                ax.plot([r["kan_parameters"], r["equivalent"]], [r["kan_loss"]] * 2, style, color=color)
        ax.set(xscale="log", xlabel="parameters (total)", ylabel="test loss (nats/token)", title=corpus)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=110)
    return True


def neighbour(context, size: tuple, name: str, budget: tuple, budget_name: str, corpus: str) -> tuple:
    """GPT-2 at ``size`` on ``budget``'s tokens (its seeds, at the rate its own size chose): its
    parameters and its runs."""
    own = name if name in context.ladder else list(context.ladder)[-1]  # above: the largest size's rate
    lr = chosen(context, own, corpus, "mlp")["lr"]
    config = at_size(context, size, budget)
    out = context.out / "parameters" / f"{name}-on-{budget_name}-tokens"
    runs = [quality.run_config(config, corpus, {"name": "mlp", "model": {"ffn_type": "mlp"}}, lr, seed, out)
            for seed in context.seeds]
    return scaling.gpt2_parameters(config, size), runs


def equivalent(points: list[tuple[float, float]], loss: float, params: int) -> dict:
    """The parameters at which GPT-2's loss (``points``, by parameters) reaches ``loss``, interpolated
    in log-log between the first pair that brackets it; the multiplier over ``params``."""
    for (n0, l0), (n1, l1) in zip(points, points[1:], strict=False):
        if min(l0, l1) <= loss <= max(l0, l1) and l0 != l1:
            t = (math.log(loss) - math.log(l0)) / (math.log(l1) - math.log(l0))
            n = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
            return {"equivalent": n, "multiplier": n / params, "bound": None}
    best, worst = min(p[1] for p in points), max(p[1] for p in points)
    if loss < best:  # better than GPT-2 at every size tried: more than the largest
        return {"equivalent": points[-1][0], "multiplier": points[-1][0] / params, "bound": ">"}
    if loss > worst:
        return {"equivalent": points[0][0], "multiplier": points[0][0] / params, "bound": "<"}
    return {"equivalent": None, "multiplier": None, "bound": "?"}


# ---------------------------------------------------------------------------------------------
# 2. Speed


def speed(out: Path, quick: bool) -> dict:
    """``kangpt compare``'s training-step time and generation speed of KAN-GPT-2 over GPT-2's, measured
    now in one run ("mini" on the CPU; ``--quick``: "tiny", a few steps)."""
    folder = out / "compare"
    command = [sys.executable, "-m", "kangpt.commands", "compare", "--models", "gpt2,kan", "--estimate-sizes",
               "", "--out", str(folder)]
    if quick:
        command += ["--size", "tiny", "--repeats", "1", "--gen-repeats", "1", "--seq-len", "32",
                    "--batch", "2"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    compared = json.loads((folder / "compare.json").read_text())
    ratios = compared["ratios"]["kan"]
    return {"train_step": ratios["train_step_s"], "generation": ratios["generate_tokens_per_s"],
            "size": compared["args"]["size"],
            "command": "kangpt compare --models gpt2,kan --estimate-sizes ''"}


# ---------------------------------------------------------------------------------------------
# 4. Overfitting


def overfitting(context) -> dict:
    """The training-to-held-out gap across the ladder, and the levers at the largest size (English)."""
    largest = context.sizes[-1]
    name = scaling.size_name(largest)
    gaps = {}
    for size in context.ladder:
        settings = context.ladder[size]["settings"]
        for corpus in context.corpora:
            epochs = settings["tokens"] / settings["corpora"][corpus]["train_tokens"]
            for model in ("mlp", "kan"):
                result = chosen(context, size, corpus, model)
                train = [final_train_loss(context.out / "ladder" / size, corpus, model, result["lr"], seed)
                         for seed in context.seeds]
                gaps.setdefault(corpus, {}).setdefault(size, {"epochs": epochs})[model] = {
                    "train": fmean(train), "validation": result["val"]["mean"],
                    "test": result["test"], "gap": result["val"]["mean"] - fmean(train)}
    config = at_size(context, largest)
    levers = {key: {"name": key, "label": label, **sections} for key, (label, sections) in LEVERS.items()}
    models = {"mlp": {"name": "mlp", "model": {"ffn_type": "mlp"}}, **levers}
    quality.parameter_match({key: quality.run_config(config, "english", variant, 1e-3, 0, context.out)
                             for key, variant in models.items()}, config.data.vocab_size)
    runner = quality.Runner(context.out / "levers", context.jobs)

    def sweep(variants: dict, model: str) -> dict:  # each grid centred on the rate ``model`` chose here
        lr = chosen(context, name, "english", model)["lr"]
        grid = sorted({lr / 2, lr, lr * 2}) if len(context.lrs) > 1 else [lr]
        swept = quality.protocol(config, ["english"], variants, grid, context.seeds, context.widen, runner)
        return swept["english"]

    return {"gaps": gaps, "size": name, "levers": sweep(levers, "kan"),
            "gpt2_dropout": sweep({"mlp-dropout": GPT2_DROPOUT}, "mlp")["mlp-dropout"],
            "early_stop": early_stop(context, largest, name)}


def final_train_loss(folder: Path, corpus: str, model: str, lr: float, seed: int) -> float:
    """The training loss a run logged last (its last window of steps)."""
    records = read_metrics(run_folder(folder, corpus, model, lr, seed) / "metrics.jsonl")
    return [r["loss"] for r in records if "loss" in r][-1]


def early_stop(context, size: tuple, name: str) -> dict:
    """Both models at the largest size on English at their own rates, validated 12 times with a
    checkpoint each time: the test loss of the checkpoint with the best validation loss."""
    config = at_size(context, size)
    steps = config.train.max_steps
    every = max(1, steps // 12)
    watch = {"train": {"eval_interval": every, "save_interval": every, "keep_checkpoints": 100}}
    out = context.out / "early-stop"
    runs = {}
    for model, sections in (("mlp", {"model": {"ffn_type": "mlp"}}), ("kan", {"model": {"ffn_type": "kan"}})):
        lr = chosen(context, name, "english", model)["lr"]
        variant = {"name": model, **quality.merge(sections, watch)}
        runs[model] = [quality.run_config(config, "english", variant, lr, seed, out)
                       for seed in context.seeds]
    train_all(context.jobs, [run for model_runs in runs.values() for run in model_runs])
    result = {}
    for model, model_runs in runs.items():
        best = [best_checkpoint_test_loss(run) for run in model_runs]
        result[model] = {"steps": [b[0] for b in best], "test": quality.spread([b[1] for b in best]),
                         "full_test": chosen(context, name, "english", model)["test"]}
    return result


def best_checkpoint_test_loss(config: RunConfig) -> tuple[int, float]:
    """The step with the lowest validation loss of a finished run, and the test loss of its checkpoint."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from kangpt.modeling_kangpt import KANGPT2LMHeadModel
    from kangpt.training.corpus import load_corpus
    from kangpt.training.evaluation import validation_loss

    folder = Path(config.train.out_dir)
    records = read_metrics(folder / "metrics.jsonl")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    step = min(val, key=val.get)
    model = KANGPT2LMHeadModel.from_pretrained(folder / "model")
    weights = load_file(folder / "checkpoints" / f"step-{step:06d}" / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is the embedding, saved once
        raise RuntimeError(f"the checkpoint of step {step} does not hold the model's weights: {missing}")
    corpus = load_corpus(config.data, config.train, Accelerator(cpu=True))
    return step, validation_loss(model.eval(), corpus.test[:]["input_ids"])


# ---------------------------------------------------------------------------------------------
# 5. Symbolic


def symbolic(context) -> dict:
    """Per corpus and seed, the largest KAN-GPT-2 as formulas, and pruned (then also fine-tuned for a
    tenth of its run's steps): held-out losses and sizes."""
    name = list(context.ladder)[-1]
    result, tunes = {}, {}  # tunes: (corpus, row index, share) -> the pruned model's fine-tune
    for corpus in context.corpora:
        lr = chosen(context, name, corpus, "kan")["lr"]
        result[corpus] = []
        for seed in context.seeds:
            folder = run_folder(context.out / "ladder" / name, corpus, "kan", lr, seed)
            row, runs = formulas_and_pruning(context.out, corpus, seed, folder, context.prune_shares)
            tunes |= {(corpus, len(result[corpus]), share): run for share, run in runs.items()}
            result[corpus].append(row)
    tuned = train_all(context.jobs, list(tunes.values()))
    for (corpus, index, share), run in tunes.items():
        summary = tuned[Path(run.train.out_dir)]
        result[corpus][index].setdefault("fine_tuned", {})[f"{share:g}"] = {
            "steps": run.train.max_steps, "val": summary["val_loss"], "test": summary["test_loss"]}
    return result


def formulas_and_pruning(out: Path, corpus: str, seed: int, folder: Path, shares: tuple) -> tuple[dict, dict]:
    """The trained run in ``folder`` as formulas, and pruned: its row of losses and sizes, and the
    fine-tunes of it pruned by each of ``shares`` (configs to train, by share)."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from kangpt.interpret import collect_statistics, prune, symbolic_model
    from kangpt.modeling_kangpt import KANGPT2LMHeadModel
    from kangpt.training.corpus import load_corpus
    from kangpt.training.evaluation import validation_loss

    config = build_config(yaml.safe_load((folder / "run.yaml").read_text()))
    data = load_corpus(config.data, config.train, Accelerator(cpu=True))
    model = KANGPT2LMHeadModel.from_pretrained(folder / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    stats = collect_statistics(model, data.train[:64]["input_ids"])
    val, test = data.val[:]["input_ids"], data.test[:]["input_ids"]
    formulas, fits = symbolic_model(model, stats)
    saved = out / "symbolic" / corpus / f"seed-{seed}"
    shutil.rmtree(saved, ignore_errors=True)
    formulas.save_pretrained(saved / "symbolic-model")
    row = {"seed": seed, "test": validation_loss(model, test), "val": validation_loss(model, val),
           "symbolic_test": validation_loss(formulas, test), "r2_mean": fmean(f["r2"] for f in fits),
           "r2_min": min(f["r2"] for f in fits)}
    row["bytes"] = (folder / "model" / "model.safetensors").stat().st_size
    for fraction in PRUNE_FRACTIONS:  # the largest share within 1% on validation
        pruned, report = prune(model, stats, hidden_fraction=fraction, scope="global")
        if validation_loss(pruned, val) > (1 + WITHIN) * row["val"]:
            break
        row.update(pruned_fraction=fraction, pruned_test=validation_loss(pruned, test),
                   pruned_parameters=report["parameters"])
        pruned.save_pretrained(saved / "pruned")
        row["pruned_bytes"] = (saved / "pruned" / "model.safetensors").stat().st_size
    runs = {}
    for share in shares:
        source = saved / f"pruned-{share:g}"
        prune(model, stats, hidden_fraction=share, scope="global")[0].save_pretrained(source)
        tokenizer.save_pretrained(source)
        tuned = out / "pruning" / "runs" / corpus / f"{share:g}-seed-{seed}"  # runs/: a Runner's folder
        runs[share] = pruned_fine_tune(config, source, tuned)
    return row, runs


def pruned_fine_tune(config: RunConfig, source: Path, out_dir: Path) -> RunConfig:
    """The run ``config`` continued briefly from its pruned model ``source``: a tenth of its steps on its
    own corpus, at the rate its schedule ended on."""
    raw = config.to_dict()
    raw["model"] = {k: v for k, v in raw["model"].items() if k in INIT_FROM_MODEL_FIELDS}
    steps, lr = max(1, config.train.max_steps // 10), config.train.min_learning_rate
    raw["train"].update(max_steps=steps, warmup_steps=0, eval_interval=steps, log_interval=max(1, steps // 4),
                        learning_rate=lr, min_learning_rate=lr, init_from=str(source), out_dir=str(out_dir))
    return build_config(raw)


# ---------------------------------------------------------------------------------------------
# 6. Forgetting


def forgetting(context, size: tuple) -> dict:
    """Each code model of ``size`` fine-tuned on English (a fixed budget, its own best rate on English
    validation, each seed): the code test loss before and after, the English test loss reached."""
    name = scaling.size_name(size)
    out = context.out / "forgetting"
    models, first = ("mlp", "kan"), context.seeds[0]
    sources = {model: {seed: run_folder(context.out / "ladder" / name, "code", model,
                                        chosen(context, name, "code", model)["lr"], seed) / "model"
                       for seed in context.seeds} for model in models}
    sweep = {(model, lr): fine_tune(context, size, sources[model][first], lr, first, out, model)
             for model in models for lr in FINE_TUNE["lrs"]}
    swept = train_all(context.jobs, list(sweep.values()))
    val = {key: swept[Path(run.train.out_dir)]["val_loss"] for key, run in sweep.items()}
    rates = {model: min(FINE_TUNE["lrs"], key=lambda lr, m=model: val[m, lr]) for model in models}
    runs = {model: [fine_tune(context, size, sources[model][seed], rates[model], seed, out, model)
                    for seed in context.seeds] for model in models}
    trained = train_all(context.jobs, [run for model_runs in runs.values() for run in model_runs])
    result = {}
    for model in models:
        before = [code_test_loss(sources[model][seed], sources[model][seed]) for seed in context.seeds]
        after = [code_test_loss(sources[model][seed], Path(run.train.out_dir) / "model")
                 for seed, run in zip(context.seeds, runs[model], strict=True)]
        result[model] = {"lr": rates[model], "code_before": quality.spread(before),
                         "code_after": quality.spread(after),
                         "rise": quality.spread([a - b for a, b in zip(after, before, strict=True)]),
                         "english": quality.spread([trained[Path(run.train.out_dir)]["test_loss"]
                                                   for run in runs[model]])}
    return result


def fine_tune(context, size: tuple, source: Path, lr: float, seed: int, out: Path, model: str) -> RunConfig:
    """The English run that starts from the code model ``source`` (its tokenizer: the code BPE)."""
    steps = FINE_TUNE["steps"]
    raw = quality.merge(at_size(context, size).to_dict(), quality.CORPORA["english"][1])
    raw["model"] = {k: v for k, v in raw["model"].items() if k in INIT_FROM_MODEL_FIELDS}
    raw["train"].update(max_steps=steps, warmup_steps=max(1, steps // 10), eval_interval=steps,
                        log_interval=max(1, steps // 12), learning_rate=lr, min_learning_rate=lr / 10,
                        seed=seed, init_from=str(source),
                        out_dir=str(out / "runs" / model / f"lr-{lr:g}-seed-{seed}"))
    return build_config(raw)


def code_test_loss(source: Path, model_folder: Path) -> float:
    """The test loss on the code test split of the run that trained ``source`` (with its tokenizer) of
    the model in ``model_folder``."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from kangpt.training.corpus import load_corpus
    from kangpt.training.evaluation import validation_loss

    config = build_config(yaml.safe_load((source.parent / "run.yaml").read_text()))
    test = load_corpus(config.data, config.train, Accelerator(cpu=True)).test[:]["input_ids"]
    return validation_loss(AutoModelForCausalLM.from_pretrained(model_folder).eval(), test)


# ---------------------------------------------------------------------------------------------
# The report


def markdown(report: dict) -> str:
    """The claims table, then the tables behind each row."""
    rows = [parameters_row(report), speed_row(report), scaling_row(report), overfitting_row(report),
            symbolic_row(report), forgetting_row(report)]
    lines = ["| claim | experiment | KAN-GPT-2 | GPT-2 | verdict | command |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join([*lines, "", *detail_tables(report)])


def parameters_row(report: dict) -> list[str]:
    cells, verdicts = [], []
    for corpus, sizes in report["parameters"].items():
        values = [f"{s}: {r['bound'] or ''}{r['multiplier']:.2f}x" if r["multiplier"] else f"{s}: ?"
                  for s, r in sizes.items()]
        cells.append(f"{corpus}: {', '.join(values)}")
        above = [r["multiplier"] > 1 and r["bound"] != "<" for r in sizes.values() if r["multiplier"]]
        verdicts.append(f"{corpus}: " + ("holds" if all(above) else "does not hold" if not any(above)
                                         else f"holds at {sum(above)} of {len(above)} sizes"))
    return ["1. fewer parameters", "GPT-2 parameters that reach KAN-GPT-2's test loss on the same tokens, "
            "over KAN-GPT-2's", "; ".join(cells), "1x by definition", "; ".join(verdicts), AUDIT]


def speed_row(report: dict) -> list[str]:
    speed = report["speed"]
    slow = speed["train_step"]
    verdict = "does not hold" if slow < 3 else "holds"
    what = f"`kangpt compare` ({speed['size']}, CPU, one run; on a GPU: `eval/gpu_check.sh`)"
    return ["2. 10x slower to train", what,
            f"training step {slow:.2f}x GPT-2's time, generation {speed['generation']:.2f}x its tokens/s",
            "1x", f"{verdict}: {slow:.2f}x, not 10x", f"`{speed['command']}`"]


def scaling_row(report: dict) -> list[str]:
    cells, verdicts = [], []
    for corpus, fit in report["scaling"].items():
        alpha = fit["alpha"]
        cells.append(f"{corpus}: alpha {alpha['kan']['alpha']:.3f} ± {alpha['kan']['alpha_stderr']:.3f}, gap "
                     f"{fit['slope']:+.2f} ± {fit['stderr']:.2f} per decade")
        grows = fit["answer"].endswith("grows") and "advantage" in fit["answer"]
        epochs = [size["epochs"] for size in report["overfitting"]["gaps"][corpus].values()]
        if max(epochs) > 1:  # size and repetition grow together: the ladder cannot tell them apart
            span = f"{min(epochs):.1f} to {max(epochs):.1f}"
            verdicts.append(f"{corpus}: cannot tell at this scale, its epochs grow with size ({span}; "
                            f"{fit['answer']}); a corpus every size reads under once would")
        else:
            verdict = "holds" if grows else "does not hold"
            verdicts.append(f"{corpus}: {verdict} (the gap's trend: {fit['answer']})")
    mlp = "; ".join(f"{c}: alpha {f['alpha']['mlp']['alpha']:.3f} ± {f['alpha']['mlp']['alpha_stderr']:.3f}"
                    for c, f in report["scaling"].items())
    return ["3. scale better", "power law of test loss in parameters over the ladder; the gap's trend",
            "; ".join(cells), mlp, "; ".join(verdicts), "`python eval/scaling.py --jobs 2`"]


def overfitting_row(report: dict) -> list[str]:
    over = report["overfitting"]
    english = over["gaps"].get("english", {})
    most = max(english, key=lambda s: english[s]["epochs"]) if english else None
    row = english[most] if most else None
    best = min(over["levers"].items(), key=lambda item: item[1]["test"]["mean"])
    stop = over["early_stop"]["kan"]["test"]
    dropout = over["gpt2_dropout"]["test"]["mean"]
    kan_cell = (f"at {row['epochs']:.1f} epochs ({most}): held-out minus training {row['kan']['gap']:.2f}, "
                f"test {spread_text(row['kan']['test'])}; best lever ({best[0]}) test "
                f"{spread_text(best[1]['test'])}; early stop test {spread_text(stop)}") if row else "?"
    gpt2_stop = over["early_stop"]["mlp"]["test"]
    gpt2_cell = (f"gap {row['mlp']['gap']:.2f}, test {spread_text(row['mlp']['test'])}; with its dropout 0.1 "
                 f"test {spread_text(over['gpt2_dropout']['test'])}; early stop test {spread_text(gpt2_stop)}"
                 ) if row else "?"
    gpt2 = min(row["mlp"]["test"]["mean"], dropout, gpt2_stop["mean"]) if row else math.nan  # GPT-2's best
    fixed = min(best[1]["test"]["mean"], stop["mean"]) <= gpt2
    verdict = (overfitting_verdict(english) if english else "?") + (
        "; its best lever brings it level with GPT-2's best or better" if fixed
        else "; no lever brings it level with GPT-2's best")
    epochs = [r["epochs"] for r in english.values()]
    span = f"{min(epochs):.1f} to {max(epochs):.1f}" if epochs else "?"
    what = f"English, {span} epochs; levers at the largest size"
    return ["4. less prone to overfitting", what, kan_cell, gpt2_cell, verdict, AUDIT]


def overfitting_verdict(sizes: dict) -> str:
    """Whether KAN-GPT-2 keeps its standing as epochs grow: its test loss against GPT-2's at the fewest
    and the most epochs (apart beyond the seeds' spread or not), and at how many sizes its held-out
    minus training gap is the larger (each model at its own rate: the gap alone also tracks how hard
    that rate fits)."""
    ordered = sorted(sizes.values(), key=lambda r: r["epochs"])
    larger = sum(r["kan"]["gap"] > r["mlp"]["gap"] for r in ordered)
    gaps = f"its held-out minus training gap the larger at {larger} of {len(ordered)} sizes"
    first, last = ordered[0], ordered[-1]

    def standing(r: dict) -> str:
        delta = r["kan"]["test"]["mean"] - r["mlp"]["test"]["mean"]
        compared = quality.verdict(r["kan"]["test"], r["mlp"]["test"])
        return f"{compared} at {r['epochs']:.1f} epochs ({delta:+.2f})"

    if quality.verdict(last["kan"]["test"], last["mlp"]["test"]) == "worse" != quality.verdict(
            first["kan"]["test"], first["mlp"]["test"]):
        return f"does not hold: {standing(first)}, {standing(last)}; {gaps}"
    return f"{'does not hold' if 2 * larger > len(ordered) else 'holds'}: {gaps}"


def symbolic_row(report: dict) -> list[str]:
    cells, exact, small, tuned_small = [], [], [], []
    for corpus, rows in report["symbolic"].items():
        changes = [100 * (r["symbolic_test"] / r["test"] - 1) for r in rows]
        pruned = [r.get("pruned_fraction", 0.0) for r in rows]
        tuned = [max([r.get("pruned_fraction", 0.0), *pruned_within(r)]) for r in rows]
        r2 = fmean(r["r2_mean"] for r in rows)
        cells.append(f"{corpus}: formulas {fmean(changes):+.2f}% test loss (R² {r2:.2f} mean); "
                     f"{min(pruned):.0%}-{max(pruned):.0%} of hidden units pruned within 1%, "
                     f"{min(tuned):.0%}-{max(tuned):.0%} with a fine-tune")
        exact.append(max(abs(c) for c in changes) <= 100 * WITHIN)
        small.append(min(pruned) >= PRUNE_TARGET)
        tuned_small.append(min(tuned) >= PRUNE_TARGET)
    formulas = "holds" if all(exact) else "does not hold"
    pruning = ("reached" if all(small) else "reached with a fine-tune of a tenth of the run's steps"
               if all(tuned_small) else "not reached, also with a fine-tune of a tenth of the run's steps")
    verdict = f"formulas within 1%: {formulas}; {PRUNE_TARGET:.0%} of hidden units pruned within it: "
    verdict += pruning
    return ["5. interpretable: formulas", "every group function a formula (a model folder); global pruning",
            "; ".join(cells), "(no functions to fit)", verdict,
            f"{AUDIT}; one model: `kangpt inspect MODEL --symbolic --prune-hidden 0.3 --prune-scope global`"]


def pruned_within(row: dict) -> list[float]:
    """The shares of hidden units whose pruning, then a short fine-tune, cost at most 1% on validation."""
    tuned = row.get("fine_tuned", {})
    return [float(share) for share, r in tuned.items() if r["val"] <= (1 + WITHIN) * row["val"]]


def forgetting_row(report: dict) -> list[str]:
    f = report["forgetting"]
    kan, gpt2 = f["kan"]["rise"], f["mlp"]["rise"]
    if kan["max"] < gpt2["min"]:
        verdict = "holds: KAN-GPT-2 forgets less, beyond the spread"
    elif kan["min"] > gpt2["max"]:
        verdict = "does not hold: KAN-GPT-2 forgets more, beyond the spread"
    else:
        verdict = "cannot tell: inside the spread"
    cell = "code test loss {:+.3f} ({:+.3f} to {:+.3f}) after English, English test {:.3f}"
    return ["6. no catastrophic forgetting", "code model fine-tuned on English, a fixed budget",
            cell.format(kan["mean"], kan["min"], kan["max"], f["kan"]["english"]["mean"]),
            cell.format(gpt2["mean"], gpt2["min"], gpt2["max"], f["mlp"]["english"]["mean"]), verdict, AUDIT]


def detail_tables(report: dict) -> list[str]:
    """The multiplier's points, the overfitting gaps and levers, symbolic and pruning."""
    return [*parameters_table(report["parameters"]), "", *overfitting_tables(report["overfitting"]), "",
            *symbolic_table(report["symbolic"])]


def parameters_table(parameters: dict) -> list[str]:
    lines = ["### 1. GPT-2 at each size's tokens", "",
             "| corpus | size | KAN-GPT-2 params | its test | GPT-2 (params: test) | equivalent | x |",
             "|---|---|---:|---:|---|---:|---:|"]
    for corpus, sizes in parameters.items():
        for size, r in sizes.items():
            points = ", ".join(f"{n:,}: {loss:.3f}" for n, loss in r["gpt2"])
            bound = r["bound"] if r["bound"] in (">", "<") else ""
            equivalent = f"{bound}{r['equivalent']:,.0f}" if r["equivalent"] else "?"
            ratio = f"{bound}{r['multiplier']:.2f}" if r["multiplier"] else "?"
            lines.append(f"| {corpus} | {size} | {r['kan_parameters']:,} | {r['kan_loss']:.3f} | {points} | "
                         f"{equivalent} | {ratio} |")
    return lines


def overfitting_tables(over: dict) -> list[str]:
    lines = ["### 4. Training and held-out losses as epochs grow", "",
             "| corpus | size | epochs | GPT-2 train | its validation | KAN-GPT-2 train | its validation |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for corpus, sizes in over["gaps"].items():
        for size, r in sizes.items():
            gpt2, kan = r["mlp"], r["kan"]
            lines.append(f"| {corpus} | {size} | {r['epochs']:.1f} | {gpt2['train']:.3f} | "
                         f"{gpt2['validation']:.3f} | {kan['train']:.3f} | {kan['validation']:.3f} |")
    lines += ["", f"Levers at {over['size']} on English (test loss, mean and min-max of the seeds, each "
                  "at its own best rate):", "", "| lever | rate | test |", "|---|---:|---:|"]
    rows = [*over["levers"].values(), over["gpt2_dropout"]]
    lines += [f"| {r['label']} | {r['lr']:g} | {spread_text(r['test'])} |" for r in rows]
    for model, r in over["early_stop"].items():
        lines.append(f"| early stop, {model} (best validation at steps {r['steps']}) | | "
                     f"{spread_text(r['test'])}; to the end {r['full_test']['mean']:.3f} |")
    return lines


def symbolic_table(symbolic: dict) -> list[str]:
    lines = ["### 5. Formulas and pruning (the largest KAN-GPT-2, each seed)", "",
             "| corpus | seed | test | as formulas | R² mean, min | pruned share | its test | bytes | "
             "pruned more, then fine-tuned: validation, test |",
             "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for corpus, rows in symbolic.items():
        for r in rows:
            pruned = (f"{r.get('pruned_fraction', 0):.0%} | {r.get('pruned_test', r['test']):.4f} | "
                      f"{r['bytes']:,} -> {r.get('pruned_bytes', r['bytes']):,}")
            tuned = "; ".join(f"{float(share):.0%} ({t['steps']} steps): {t['val']:.4f} (unpruned "
                              f"{r['val']:.4f}), {t['test']:.4f}"
                              for share, t in r.get("fine_tuned", {}).items())
            lines.append(f"| {corpus} | {r['seed']} | {r['test']:.4f} | {r['symbolic_test']:.4f} | "
                         f"{r['r2_mean']:.2f}, {r['r2_min']:.2f} | {pruned} | {tuned} |")
    return lines


def spread_text(spread: dict) -> str:
    return f"{spread['mean']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"


if __name__ == "__main__":
    sys.exit(main())
