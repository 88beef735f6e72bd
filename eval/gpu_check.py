"""Every GPU check of kangpt in one run, ending with one summary table (``eval/gpu_check.sh``).

1. The fused Triton kernels' tests on CUDA (fp32 and bf16): ``tests/test_kan_triton.py``.
2. ``eval/bench_kan.py``: the default KAN block against GPT-2's MLP at d=768, 8 x 1024 tokens, bf16:
   eager, compiled, and on the Triton kernels; time and peak VRAM ratios.
3. ``eval/compare.py`` at GPT-2 small (124M), bf16, batch 8 x 1024: measured peak VRAM and training
   tokens/s of GPT-2 and KAN-GPT-2, the estimate beside the measurement.
4. 100 steps of ``train.py configs/kangpt2-124m.yaml`` and ``configs/gpt2-124m.yaml`` on the stdlib
   corpus (bf16, compiled; a 32k BPE trained here, since no hub is reachable): tokens/s and MFU.

    eval/gpu_check.sh                 # on a GPU machine: under 8 minutes on one H200
    eval/gpu_check.sh --dry-run       # the same steps at tiny sizes on CPU (Triton's interpreter)

Each step's output lands in ``--out`` (default ``out/gpu_check``); a failing step is reported in the
table and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Peak dense bf16 tensor-core throughput used for MFU (NVIDIA H100/H200 SXM: 989 TFLOPS).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
TARGETS = {"block_triton": 1.2, "train_tokens": 0.85, "train_vram": 1.0}


def run(step: str, argv: list[str], out: Path, env: dict | None = None) -> tuple[bool, float]:
    """Run ``python ARGV`` from the project root, its output to ``out/STEP.log``; (success, seconds)."""
    from kangpt.comparison.measure import run_fresh_process

    start = time.perf_counter()
    try:
        run_fresh_process(argv, env={"HF_HUB_OFFLINE": "1", **(env or {})}, log=out / f"{step}.log", cwd=ROOT)
        ok = True
    except RuntimeError as error:  # the end of the log, so that a failure is readable where it ran
        print(error, file=sys.stderr, flush=True)
        ok = False
    seconds = time.perf_counter() - start
    print(f"[{step}] {'ok' if ok else 'FAILED'} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return ok, seconds


def bench_steps(dry: bool) -> dict[str, list[str]]:
    size = (
        ["--device", "cpu", "--dtype", "fp32", "--tokens", "64", "--width", "64", "--repeats", "1"]
        if dry
        else ["--device", "cuda", "--dtype", "bf16", "--tokens", "8192", "--width", "768", "--repeats", "15"]
    )
    return {
        "bench_eager": [*size, "--models", "mlp,kan"],
        "bench_compiled": [*size, "--models", "mlp,kan", "--compile"],
        "bench_triton": [*size, "--models", "mlp,kan-triton"],
    }


def train_argv(config: str, out_dir: Path, dry: bool) -> list[str]:
    common = [
        "--data.dataset=stdlib",
        "--data.name=null",
        "--data.tokenizer=bpe",
        "--data.streaming=false",
        "--train.eval_interval=100",
        "--train.save_interval=0",
        "--train.trackers=[]",
        "--train.sample_prompt=null",
        "--train.log_interval=10",
        f"--train.out_dir={out_dir}",
        "--train.overwrite=true",
        "--train.eval_blocks=8",
    ]
    if dry:
        common += [
            "--model.n_layer=2",
            "--model.n_embd=64",
            "--model.n_head=2",
            "--model.n_positions=64",
            "--data.block_size=64",
            "--data.vocab_size=512",
            "--data.max_documents=60",
            "--train.max_steps=12",
            "--train.batch_size=2",
            "--train.gradient_accumulation_steps=1",
            "--train.mixed_precision='no'",
            "--train.compile=false",
            "--train.warmup_steps=2",
            "--train.log_interval=2",
            "--train.eval_interval=12",
        ]
    else:
        common += [
            "--data.vocab_size=32768",
            "--train.max_steps=100",
            "--train.gradient_accumulation_steps=1",
            "--train.warmup_steps=10",
            "--train.mixed_precision=bf16",
            "--train.compile=true",
        ]
    return ["train.py", str(ROOT / "configs" / config), *common]


def training_speed(run_dir: Path) -> dict:
    """Median tokens/s over the logged windows after the first two (compilation), and the parameter count."""
    import torch

    from kangpt import KANGPT2Config, KANGPT2LMHeadModel

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    config = KANGPT2Config.from_pretrained(run_dir / "model")
    with torch.device("meta"):
        params = sum(p.numel() for p in KANGPT2LMHeadModel(config).parameters())
    return {"tokens_per_s": statistics.median(speeds[2:] or speeds), "parameters": params, "config": config}


def mfu(speed: dict, device_name: str) -> float | None:
    """Model FLOPs utilisation: (6 N + 12 L d T) FLOPs per token (PaLM's count) at the measured rate."""
    peak = next((flops for name, flops in PEAK_FLOPS.items() if name in device_name), None)
    if peak is None:
        return None
    c = speed["config"]
    flops_per_token = 6 * speed["parameters"] + 12 * c.n_layer * c.n_embd * c.n_positions
    return flops_per_token * speed["tokens_per_s"] / peak


def compare_argv(dry: bool) -> list[str]:
    """``eval/compare.py``'s sizes: GPT-2 small in bf16 on the GPU; a tiny model on CPU in a dry run."""
    if dry:
        return ["--size", "tiny", "--device", "cpu", "--batch", "2", "--seq-len", "32", "--estimate-sizes",
                "tiny", "--estimate-seq-len", "32", "--repeats", "1", "--gen-repeats", "1"]
    return ["--size", "small", "--device", "cuda", "--dtype", "bf16", "--batch", "8", "--seq-len", "1024",
            "--estimate-sizes", "small", "--repeats", "3", "--gen-repeats", "1", "--new-tokens", "64"]


def run_steps(out: Path, dry: bool) -> tuple[dict, dict, dict]:
    """Run every step; (step -> (ok, seconds), bench step -> its rows, train name -> its speed)."""
    status, bench, trains = {}, {}, {}
    interpreter = {"TRITON_INTERPRET": "1"} if dry else {}
    kernel_tests = ["-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/test_kan_triton.py"]
    status["kernel tests"] = run("kernel_tests", kernel_tests, out, interpreter)
    for step, options in bench_steps(dry).items():
        argv = ["eval/bench_kan.py", *options, "--json", str(out / f"{step}.json")]
        status[step] = run(step, argv, out, interpreter if step == "bench_triton" else None)
        if status[step][0]:
            bench[step] = json.loads((out / f"{step}.json").read_text())["rows"]
    argv = ["eval/compare.py", *compare_argv(dry), "--models", "gpt2,kan", "--out", str(out / "compare")]
    status["compare"] = run("compare", argv, out)
    for name, config in (("gpt2", "gpt2-124m.yaml"), ("kan", "kangpt2-124m.yaml")):
        status[f"train {name}"] = run(f"train_{name}", train_argv(config, out / f"train_{name}", dry), out)
        if status[f"train {name}"][0]:
            trains[name] = training_speed(out / f"train_{name}")
    return status, bench, trains


def bench_rows(bench: dict) -> list[tuple[str, str]]:
    """The KAN block against the MLP: time and peak ratios of each bench step that ran."""
    from kangpt.comparison.models import ratio

    rows = []
    for step, key in (("bench_eager", "kan"), ("bench_compiled", "kan"), ("bench_triton", "kan-triton")):
        if step in bench:
            kan, mlp = bench[step][key], bench[step]["mlp"]
            peak = ratio(kan["peak"], mlp["peak"])
            target = f" (target <= {TARGETS['block_triton']}x)" if step == "bench_triton" else ""
            what = f"KAN block / MLP, {step[6:]}"
            rows.append((f"{what}: fwd+bwd time{target}", f"{kan['time'] / mlp['time']:.2f}x"))
            rows.append((f"{what}: peak memory", "n/a" if peak is None else f"{peak:.2f}x"))
    return rows


def compare_rows(result: dict) -> list[tuple[str, str]]:
    """GPT-2 small against KAN-GPT-2 small (compare.json): peak memory measured and estimated, speed."""
    ratios, check = result["ratios"]["kan"], result["estimate_check"]
    estimated = check["kan"]["train_peak_bytes"] / check["gpt2"]["train_peak_bytes"]
    rows = [
        ("124M training peak VRAM, KAN / GPT-2 measured (target <= 1.0x)",
         f"{ratios['train_peak_bytes']:.2f}x"),
        ("124M training peak, KAN / GPT-2 estimated", f"{estimated:.2f}x"),
    ]
    for name in ("gpt2", "kan"):
        measured, estimate = result["memory"][name]["train_peak_bytes"], check[name]["train_peak_bytes"]
        rows.append((f"{name} training peak: measured / estimated GiB",
                     f"{measured / 2**30:.2f} / {estimate / 2**30:.2f}"))
    rows.append(("124M training tokens/s, KAN / GPT-2 (compare.py, eager)",
                 f"{ratios['train_tokens_per_s']:.2f}x"))
    for setting in result["generation"]["kan"]:  # eager at batch 1 and 8 (compiled with --compile)
        rows.append((f"124M decode tokens/s, KAN / GPT-2 ({setting}; target >= 1.0x)",
                     f"{ratios[f'{setting}, decode_tokens_per_s']:.2f}x"))
    return rows


def train_rows(trains: dict, device_name: str) -> list[tuple[str, str]]:
    """train.py's speed of each model, its MFU, and KAN-GPT-2's speed over GPT-2's."""
    rows = []
    for name, speed in trains.items():
        utilisation = mfu(speed, device_name)
        utilisation = "n/a" if utilisation is None else f"{utilisation:.1%}"
        speed_text = f"{speed['tokens_per_s']:,.0f}, {utilisation}"
        rows.append((f"train.py 100 steps, {name}: tokens/s, MFU", speed_text))
    if len(trains) == 2:
        rows.append((f"train.py tokens/s, KAN / GPT-2 (target >= {TARGETS['train_tokens']}x)",
                     f"{trains['kan']['tokens_per_s'] / trains['gpt2']['tokens_per_s']:.2f}x"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (Triton's interpreter)")
    parser.add_argument("--out", default="out/gpu_check", help="folder of every step's output")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to run the steps on CPU", file=sys.stderr)
        return 1
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    status, bench, trains = run_steps(out, args.dry_run)
    rows = bench_rows(bench)
    if status["compare"][0]:
        rows += compare_rows(json.loads((out / "compare" / "compare.json").read_text()))
    rows += train_rows(trains, device_name)
    print(f"\n### kangpt GPU check: {device_name}, torch {torch.__version__}\n")
    print("| check | result |\n|---|---|")
    for step, (ok, seconds) in status.items():
        print(f"| step: {step} | {'ok' if ok else 'FAILED'} ({seconds:.0f} s) |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    summary = {"device": device_name, "status": status, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(ok for ok, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
