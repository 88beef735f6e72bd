"""Tables and charts of a comparison (:func:`kangpt.comparison.models.run_comparison`'s results)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..io.plotting import new_figure
from .measure import MiB
from .models import MODELS, PARTS, ratio

# Targets for the parameter-matched KAN-GPT-2 against GPT-2 (reported, never asserted).
TARGETS = {"train_step_s": ("<=", 1.3), "saved_bytes": ("<=", 1.0), "generate_tokens_per_s": (">=", 0.8)}


def report_markdown(results: dict, args) -> str:
    """Every table the results hold, as markdown."""
    parts = [parameters_markdown(results["parameters"], results["shapes"])]
    if "memory" in results:
        parts.append(measurements_markdown(results, args, results["shapes"][args.size]))
    if "generation" in results:
        parts.append(generation_markdown(results["generation"], args))
    if "estimate" in results or "estimate_check" in results:
        parts.append(estimates_markdown(results, args))
    return "\n\n".join(parts)


def generation_markdown(generation: dict, args) -> str:
    """Prefill and decode speed per setting (mode, batch), every model against GPT-2."""
    lines = [
        f"Generation at {args.size}: a prompt of {args.prompt_len} tokens (prefill), then "
        f"{args.new_tokens} greedy decode steps with the KV cache; medians of {args.gen_repeats} interleaved "
        "repeats; the first call's extra time is compiling.",
        "",
        "| setting | model | prefill ms | × | decode tokens/s | × | first call +s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    reference = generation["gpt2"]
    for setting in reference:
        for name, figures in generation.items():
            g, ref = figures[setting], reference[setting]
            lines.append(
                f"| {setting} | {MODELS[name]} | {1e3 * g['prefill_s']:,.1f} | "
                f"{fmt_ratio(ratio(ref['prefill_s'], g['prefill_s']))} | {g['decode_tokens_per_s']:,.1f} | "
                f"{fmt_ratio(ratio(g['decode_tokens_per_s'], ref['decode_tokens_per_s']))} | "
                f"{g['compile_s']:,.1f} |"
            )
    return "\n".join(lines)


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
