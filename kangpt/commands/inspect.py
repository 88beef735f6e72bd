"""``kangpt inspect``: importance, edge pictures and formulas of a trained model; optionally prune it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import datasets
import torch

from ..interpret import (
    auto_symbolic,
    collect_statistics,
    edge_importance,
    importance_report,
    kan_layers,
    plot_edges,
    plot_group_functions,
    plot_importance,
    prune,
    sample_blocks,
    symbolic_model,
)
from ..interpret.symbolic import LIBRARY
from ..io.folders import atomic_folder
from ..io.loading import load_model
from ..io.plotting import new_figure
from ..training.evaluation import validation_loss
from .arguments import default_device, holds_something
from .errors import CommandError

HELP = "plot a trained model's KAN edges, fit formulas to them and optionally prune it"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="model folder (save_pretrained output, e.g. OUT_DIR/model)")
    parser.add_argument("--out", default="inspect", help="output folder (default: ./inspect)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--block", type=int, default=0, help="block to plot and fit (negative: from the end)")
    parser.add_argument("--layer", type=int, default=0, help="KAN layer of the block (0 or 1)")
    parser.add_argument("--top-k", type=int, default=8, help="edges to plot and fit")
    parser.add_argument("--tokens", type=int, default=8192, help="sample tokens for the statistics")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="other tokens for validation losses")
    parser.add_argument("--text", default=None, help="text file to take tokens from (default: stdlib corpus)")
    parser.add_argument("--block-size", type=int, default=None, help="block length (default: n_positions)")
    parser.add_argument("--samples", type=int, default=2048, help="sample inputs kept for plots and fits")
    parser.add_argument("--library", default=None, help="comma-separated formula names (default: all)")
    parser.add_argument("--symbolic", action="store_true",
                        help="also write symbolic-model/: every group function replaced by its formula")
    parser.add_argument("--prune-hidden", type=float, default=0.0, help="fraction of hidden units to remove")
    parser.add_argument("--prune-edges", type=float, default=0.0, help="fraction of edges to zero")
    parser.add_argument(
        "--prune-scope",
        choices=("block", "global"),
        default="block",
        help="block: every block loses the same fraction; global: the least important units overall",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """``kangpt inspect``: write into ``args.out``

    - ``importance.json`` (:func:`importance_report`) and ``importance.png`` (heatmap of the chosen
      layer), ``edges.png`` (its top-k edges with their formulas), ``groups.png`` (grouped layers),
    - ``symbolic.md`` and ``symbolic.json`` (:func:`auto_symbolic`),
    - with ``--prune-hidden``/``--prune-edges``: ``pruned/`` (model and tokenizer) and ``pruning.json``
      (:func:`prune`'s report plus validation losses before and after, on tokens not used for the
      statistics);
    - with ``--symbolic``: ``symbolic-model/`` (model and tokenizer: :func:`symbolic_model`) and
      ``symbolic-model.json`` (every group's formula and R², validation losses before and after).

    The folder is written under a temporary name and renamed when complete.
    """
    _check_inspect_args(args)
    out, folder = Path(args.out).expanduser(), Path(args.model_dir).expanduser()
    protected = {p for d in (folder.resolve(), Path.cwd()) for p in (d, *d.parents)}
    if out.resolve() in protected:
        raise CommandError(f"--out {str(out)!r} would replace the model folder or the working directory")
    if holds_something(out) and not args.overwrite:
        raise CommandError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")
    try:
        new_figure(1, 1)
    except ModuleNotFoundError as err:
        raise CommandError(str(err)) from err
    datasets.disable_progress_bars()
    tokenizer, model = load_model(args.model_dir, default_device(args.device), hub=False)
    if getattr(model.config, "ffn_type", None) != "kan":
        raise CommandError(f"{args.model_dir!r} has no KAN blocks to inspect")
    layers = kan_layers(model)
    if args.symbolic and any(layer.sharing != "group" for layer in layers.values()):
        raise CommandError("--symbolic replaces the function of each group: the model's KAN layers have "
                           "one function per edge (kan_sharing='edge')")
    block = args.block + model.config.n_layer if args.block < 0 else args.block
    if (block, args.layer) not in layers:
        raise CommandError(
            f"no KAN layer --block {args.block} --layer {args.layer}; layers: {sorted(layers)}"
        )
    stats_ids, eval_ids = _split_blocks(args, tokenizer, model.config.n_positions)

    with atomic_folder(out) as tmp:
        print(f"statistics of {len(layers)} KAN layers over {stats_ids.numel()} tokens")
        stats = collect_statistics(model, stats_ids, batch_size=args.batch_size, samples=args.samples)
        (tmp / "importance.json").write_text(json.dumps(importance_report(model, stats), indent=1) + "\n")
        kan, chosen = layers[block, args.layer], stats[block, args.layer]
        name = f"block {block}, layer {args.layer} ({kan.basis_name} {kan.in_features} -> {kan.out_features})"
        plot_importance(edge_importance(kan, chosen), tmp / "importance.png", title=f"importance, {name}")
        library = [s.strip() for s in args.library.split(",")] if args.library else None
        fits = auto_symbolic(
            model, chosen, block=block, layer=args.layer, top_k=args.top_k, library=library, out_dir=tmp
        )
        plot_edges(kan, chosen, tmp / "edges.png", top_k=args.top_k, fits=fits, title=name)
        if kan.sharing == "group":
            plot_group_functions(kan, chosen, tmp / "groups.png")
        for e in fits:
            print(
                f"  edge {e['input']:>4} -> {e['output']:<4} importance {e['importance']:.3g}  "
                f"{e['best']['formula']}  (R² {e['best']['r2']:.4f})"
            )
        if args.prune_hidden > 0 or args.prune_edges > 0:
            _prune_and_save(args, model, tokenizer, stats, eval_ids, tmp)
        if args.symbolic:
            _symbolic_and_save(args, model, tokenizer, stats, eval_ids, tmp)
    print(f"wrote {out}")
    return 0


def _check_inspect_args(args: argparse.Namespace) -> None:
    for flag, least in (("top_k", 1), ("tokens", 16), ("eval_tokens", 1), ("samples", 16), ("batch_size", 1)):
        if getattr(args, flag) < least:
            raise CommandError(f"--{flag.replace('_', '-')} must be at least {least}")
    if args.block_size is not None and args.block_size < 2:
        raise CommandError("--block-size must be at least 2")
    for flag in ("prune_hidden", "prune_edges"):
        if not 0 <= getattr(args, flag) < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be in [0, 1)")
    if args.library:
        unknown = [s.strip() for s in args.library.split(",") if s.strip() not in LIBRARY]
        if unknown:
            raise CommandError(f"unknown --library functions {unknown}; known: {', '.join(LIBRARY)}")


def _split_blocks(args, tokenizer, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks for the statistics and (disjoint) blocks for validation losses, in a seeded random order."""
    block_size = min(args.block_size or n_positions, n_positions)
    blocks = sample_blocks(tokenizer, block_size, text_file=args.text)
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
    n_stats = math.ceil(args.tokens / block_size)
    compared = args.prune_hidden > 0 or args.prune_edges > 0 or args.symbolic  # validation losses wanted
    n_eval = math.ceil(args.eval_tokens / block_size) if compared else 0
    if n_stats + n_eval > len(blocks):
        if len(blocks) < 1 + (n_eval > 0):
            raise CommandError(f"the text holds only {len(blocks)} block(s) of {block_size} tokens")
        n_stats = max(1, round(len(blocks) * n_stats / (n_stats + n_eval)))
        n_eval = min(n_eval, len(blocks) - n_stats)
        print(
            f"note: only {len(blocks)} blocks of {block_size} tokens: {n_stats} for statistics, "
            f"{n_eval} for validation losses"
        )
    return blocks[:n_stats], blocks[n_stats : n_stats + n_eval]


def _prune_and_save(args, model, tokenizer, stats, eval_ids: torch.Tensor, folder: Path) -> None:
    pruned, report = prune(
        model,
        stats,
        hidden_fraction=args.prune_hidden,
        edge_fraction=args.prune_edges,
        scope=args.prune_scope,
    )
    losses = [validation_loss(m, eval_ids, batch_size=args.batch_size) for m in (model, pruned)]
    report["validation_loss"] = {"before": losses[0], "after": losses[1], "tokens": eval_ids.numel()}
    pruned.save_pretrained(folder / "pruned")
    tokenizer.save_pretrained(folder / "pruned")
    (folder / "pruning.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"pruned: parameters {report['parameters']['before']} -> {report['parameters']['after']}, "
        f"non-zero KAN parameters {report['nonzero_kan_parameters']['before']} -> "
        f"{report['nonzero_kan_parameters']['after']}, validation loss {losses[0]:.4f} -> {losses[1]:.4f}"
    )


def _symbolic_and_save(args, model, tokenizer, stats, eval_ids: torch.Tensor, folder: Path) -> None:
    symbolic, fits = symbolic_model(model, stats)
    losses = [validation_loss(m, eval_ids, batch_size=args.batch_size) for m in (model, symbolic)]
    symbolic.save_pretrained(folder / "symbolic-model")
    tokenizer.save_pretrained(folder / "symbolic-model")
    report = {"validation_loss": {"before": losses[0], "after": losses[1], "tokens": eval_ids.numel()},
              "groups": fits}
    (folder / "symbolic-model.json").write_text(json.dumps(report, indent=1) + "\n")
    worst = min(fits, key=lambda fit: fit["r2"])
    print(f"symbolic model: {len(fits)} group functions as formulas (lowest R² {worst['r2']:.3f}), "
          f"validation loss {losses[0]:.4f} -> {losses[1]:.4f}")
