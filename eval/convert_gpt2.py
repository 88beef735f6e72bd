"""Convert a GPT-2 trained here into a KAN-GPT-2, and compare it on the same held-out tokens.

1. GPT-2 (``ffn_type: mlp``) is trained by ``train.py configs/default.yaml`` for ``--pretrain-steps``
   (at ``--n-layer`` x ``--n-embd``; the stdlib corpus, the default BPE).
2. ``kangpt convert`` turns it into the default KAN-GPT-2 (its wall time is reported).
3. The converted model is fine-tuned for ``--finetune-steps`` (``train.py configs/finetune.yaml
   --train.init_from=...``, the same batch of 16 x 128 tokens).
4. The default KAN-GPT-2 is trained from scratch for the same total tokens (pretraining + fine-tuning).

All four are evaluated on the same held-out tokens: every block of the stdlib validation split.

    python eval/convert_gpt2.py --out out/convert                             # configs/default.yaml's shape
    python eval/convert_gpt2.py --n-layer 6 --n-embd 256 --out out/convert-6x256
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from kangpt.comparison.measure import run_fresh_process
from kangpt.data import load_documents, pack_documents
from kangpt.training.evaluation import validation_loss
from kangpt.training.run_config import load_config

ROOT = Path(__file__).resolve().parent.parent


def child(argv: list[str]) -> None:
    """``python ARGV`` in a fresh process; its failure ends this script with its message."""
    try:
        run_fresh_process(argv)
    except RuntimeError as err:
        raise SystemExit(f"error: {err}") from None


def train(argv: list[str]) -> None:
    child([str(ROOT / "train.py"), *argv])


QUIET = ["--train.trackers=[]", "--train.sample_prompt=null", "--train.save_interval=0",
         "--train.overwrite=true"]
DEFAULT = str(ROOT / "configs" / "default.yaml")
BATCH = 16  # sequences per step of every run here, so that steps convert to tokens alike


def make_models(args: argparse.Namespace, out: Path, steps: dict[str, int]) -> float:
    """Train GPT-2, convert it, fine-tune the conversion, train KAN-GPT-2 from scratch (each in a
    fresh process, into ``out``); return the conversion's wall time in seconds."""
    common = [f"--model.n_layer={args.n_layer}", f"--model.n_embd={args.n_embd}",
             f"--model.n_head={args.n_head}", f"--train.batch_size={BATCH}"]
    train([DEFAULT, *common, *QUIET, "--model.ffn_type=mlp", f"--train.max_steps={steps['gpt2']}",
           f"--train.out_dir={out / 'gpt2'}"])
    start = time.perf_counter()
    child(["-m", "kangpt.commands", "convert", str(out / "gpt2" / "model"), str(out / "converted"),
           "--calibration-tokens", "32768", "--overwrite"])
    convert_seconds = time.perf_counter() - start
    lr = args.finetune_lr
    train([str(ROOT / "configs" / "finetune.yaml"), *QUIET, f"--train.init_from={out / 'converted'}",
           f"--train.out_dir={out / 'finetuned'}", f"--train.max_steps={steps['finetuned']}",
           "--data.block_size=128", f"--train.batch_size={BATCH}", f"--train.learning_rate={lr}",
           f"--train.min_learning_rate={lr / 10}", "--train.warmup_steps=20",
           f"--train.eval_interval={steps['finetuned']}"])
    train([DEFAULT, *common, *QUIET, f"--train.max_steps={steps['scratch']}",
           f"--train.out_dir={out / 'scratch'}"])
    return convert_seconds


def held_out_rows(folders: dict[str, Path], held_out: torch.Tensor) -> dict[str, dict]:
    """Each model folder's loss on the ``held_out`` blocks and its parameter count."""
    from transformers import AutoModelForCausalLM

    import kangpt  # noqa: F401  (registers KAN-GPT-2 with the Auto classes)

    rows = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        parameters = sum(p.numel() for p in model.parameters())
        rows[name] = {"loss": validation_loss(model, held_out), "parameters": parameters}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--out", default="out/convert")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    steps = {"gpt2": args.pretrain_steps, "finetuned": args.finetune_steps,
             "scratch": args.pretrain_steps + args.finetune_steps}
    convert_seconds = make_models(args, out, steps)

    from transformers import AutoTokenizer

    data = load_config(DEFAULT).data
    _, val_docs = load_documents(data.dataset, val_fraction=data.val_fraction)
    tokenizer = AutoTokenizer.from_pretrained(out / "gpt2" / "model")
    held_out = torch.tensor(pack_documents(val_docs, tokenizer, data.block_size)["input_ids"])
    folders = {"gpt2": out / "gpt2" / "model", "converted": out / "converted",
               "finetuned": out / "finetuned" / "model", "scratch": out / "scratch" / "model"}
    rows = held_out_rows(folders, held_out)
    rows["converted"]["steps"] = steps["gpt2"]  # GPT-2's training, no more
    rows["finetuned"]["steps"] = steps["gpt2"] + steps["finetuned"]
    rows["gpt2"]["steps"], rows["scratch"]["steps"] = steps["gpt2"], steps["scratch"]
    report = json.loads((out / "converted" / "conversion.json").read_text())
    labels = {"gpt2": "GPT-2 (trained here)", "converted": "converted, no fine-tuning",
              "finetuned": f"converted + {steps['finetuned']} fine-tuning steps",
              "scratch": "KAN-GPT-2 from scratch, same total tokens"}
    print(f"### {args.n_layer} layers x d={args.n_embd}: held-out loss on {held_out.numel():,} stdlib "
          f"validation tokens; conversion {convert_seconds:.0f} s (wall, incl. loading), "
          f"{report['method']}\n")
    print("| model | params | training tokens | held-out loss | Δ vs GPT-2 |\n|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {labels[name]} | {row['parameters']:,} | {row['steps'] * BATCH * data.block_size:,} | "
              f"{row['loss']:.4f} | {row['loss'] - rows['gpt2']['loss']:+.4f} |")
    errors = ", ".join(f"{b['relative_error']:.4f}" for b in report["blocks"])
    print(f"\nper-block relative error of the conversion: {errors}; grid {report['grid']}")
    summary = {"args": vars(args), "rows": rows, "convert_seconds": convert_seconds, "conversion": report,
               "held_out_tokens": held_out.numel(),
               "perplexity": {k: math.exp(v["loss"]) for k, v in rows.items()}}
    (out / "convert_gpt2.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
