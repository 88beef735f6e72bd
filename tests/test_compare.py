"""eval/compare.py (``kangpt compare``), eval/quality.py and the measuring helpers of
kangpt.comparison.measure.

Fast checks of what the tables rest on (parameter counts against transformers' GPT-2, byte counts,
peak memory), plus a tiny end-to-end comparison on CPU. No speed target is tested: speed is
measured and reported, never asserted.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from kangpt import commands
from kangpt.commands.compare import main
from kangpt.comparison.measure import (
    MiB,
    PeakMemory,
    SavedTensorBytes,
    adamw_state_bytes_per_parameter,
    training_state_bytes,
)
from kangpt.comparison.models import GPT2_SIZES, MODELS, PARTS, SHAPES, parameter_table
from kangpt.kan import BASES
from kangpt.training.run_config import load_config

ROOT = Path(__file__).resolve().parent.parent
# transformers' GPT2LMHeadModel parameter counts (LM head tied to the token embeddings).
GPT2_PARAMETERS = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}


@pytest.fixture(scope="module")
def gpt2_table():
    return parameter_table(list(GPT2_SIZES), SHAPES, None)


def test_parameter_breakdown_sums_to_the_total_and_matches_transformers_gpt2(gpt2_table):
    for size in GPT2_SIZES:
        rows = gpt2_table[size]
        assert set(rows) == set(MODELS)
        for row in rows.values():
            assert sum(row[p] for p in PARTS[:-1]) == row["total"]
        assert rows["gpt2"]["total"] == GPT2_PARAMETERS[size]
        with torch.device("meta"):
            reference = GPT2LMHeadModel(
                GPT2Config(**{k: SHAPES[size][k] for k in ("n_layer", "n_embd", "n_head")})
            )
        assert rows["gpt2"]["total"] == sum(p.numel() for p in reference.parameters())
        # Only the feed-forward part differs between the models.
        for part in ("embeddings", "attention", "layer norms"):
            assert (
                rows["kan"][part]
                == rows["kan-edge"][part]
                == rows["kan-edge-wide"][part]
                == rows["gpt2"][part]
            )


def test_kan_models_are_parameter_matched_or_mlp_wide(gpt2_table):
    for size in GPT2_SIZES:
        rows = gpt2_table[size]
        for name in ("kan", "kan-edge"):  # the config promises 1%
            assert abs(rows[name]["ratio"] - 1) < 0.01
            assert abs(rows[name]["feed-forward"] / rows["gpt2"]["feed-forward"] - 1) < 0.01
        assert rows["kan-edge"]["kan_hidden_size"] < SHAPES[size]["n_embd"]  # 9 coefficients per edge
        assert rows["kan-edge-wide"]["kan_hidden_size"] == 4 * SHAPES[size]["n_embd"]
        assert rows["kan-edge-wide"]["ratio"] > 4


@pytest.mark.parametrize("basis", BASES)
def test_every_basis_is_matched_within_one_percent_at_mini_size(basis):
    rows = parameter_table(["mini"], SHAPES, basis)["mini"]
    assert abs(rows["kan"]["ratio"] - 1) < 0.01


def test_training_state_is_16_bytes_per_parameter_in_fp32():
    assert adamw_state_bytes_per_parameter(torch.float32) == 16
    assert adamw_state_bytes_per_parameter(torch.bfloat16) == 8
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    n = sum(p.numel() for p in model.parameters())
    state = training_state_bytes(model, optimizer)
    assert state["parameters"] == state["gradients"] == 4 * n
    step_counters = 4 * len(list(model.parameters()))  # AdamW keeps one fp32 scalar step per tensor
    assert state["optimizer"] == 8 * n + step_counters
    assert state["total"] == 16 * n + step_counters


def test_tied_weights_are_counted_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    state = training_state_bytes(model)
    assert state["parameters"] == 4 * 40 and state["gradients"] == 0 and state["optimizer"] == 0


def test_saved_tensor_bytes_counts_each_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(256))
    x = torch.randn(256, requires_grad=True)
    with SavedTensorBytes([w]) as saved:
        (x * w).sum()  # mul saves x and w: only x counts
    assert saved.bytes == x.nbytes
    with SavedTensorBytes() as saved:
        (x * x).sum()  # x saved twice,
        (x[:128] * 2 * x[:128]).sum()  # and through a view: one storage; x[:128] * 2 is a new one
    assert saved.bytes == x.nbytes + x[:128].nbytes


def test_peak_memory_on_cpu_sees_a_transient_tensor():
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * MiB // 4)  # 64 MiB, touched
        del block
    assert peak.growth >= 0.9 * 64 * MiB


def test_tiny_comparison_on_cpu_writes_tables_json_and_charts(tmp_path, capsys):
    out = tmp_path / "compare"
    argv = [
        "--size",
        "tiny",
        "--models",
        "gpt2,kan",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--repeats",
        "1",
        "--gen-repeats",
        "1",
        "--device",
        "cpu",
        "--estimate-sizes",
        "tiny",
        "--estimate-seq-len",
        "32",
        "--compile",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "### Parameters" in printed and "training step ms" in printed and "saved for backward" in printed
    results = json.loads((out / "compare.json").read_text())
    assert set(results["parameters"]) == {*GPT2_SIZES, "tiny"}
    assert set(results["memory"]) == set(results["speed"]) == set(results["ratios"]) == {"gpt2", "kan"}
    for name, m in results["memory"].items():
        assert m["parameters"] == results["parameters"]["tiny"][name]["total"]
        assert m["saved_bytes"] > 0 and m["train_peak_bytes"] > 0 and m["generate_peak_bytes"] > 0
        assert m["state_bytes"]["parameters"] == 4 * m["parameters"]  # fp32, tied head counted once
        assert m["state_bytes"]["total"] >= 16 * m["parameters"]
        s = results["speed"][name]
        assert s["train_tokens_per_s"] > 0 and s["generate_tokens_per_s"] > 0
    assert all(v == 1 for v in results["ratios"]["gpt2"].values())
    assert results["args"]["new_tokens"] == 4 and results["args"]["prompt_len"] == 8
    expected = [f"{mode}, batch {batch}" for mode in ("eager", "compiled") for batch in (1, 2)]
    for settings in results["generation"].values():  # batch 1 and --batch 2, eager and compiled
        assert list(settings) == expected
        assert all(set(g) == {"prefill_s", "decode_tokens_per_s", "compile_s"} for g in settings.values())
        assert all(g["prefill_s"] > 0 for g in settings.values())  # a duration (the others: differences)
    assert "| compiled, batch 2 | KAN-GPT-2 (default), parameter-matched |" in printed
    assert "Estimate against measurement at tiny" in printed
    for name, row in results["estimate_check"].items():
        # At least the weights, gradients and AdamW state (measured from the tensors in the child); at
        # most that plus three times the measured activations kept for backward.
        m = results["memory"][name]
        state, saved = m["state_bytes"]["total"], m["saved_bytes"]
        assert state <= row["train_peak_bytes"] <= state + 3 * saved, (name, row, state, saved)
        assert 0 < row["generate_peak_bytes"] < row["train_peak_bytes"]
    assert set(results["estimate"]["tiny"]) == {"gpt2", "kan"}
    for chart in ("parameters.png", "memory.png", "speed.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"


def test_console_command_and_bad_arguments(tmp_path, capsys):
    assert commands.main(["compare", "--size", "tiny", "--params-only", "--out", str(tmp_path)]) == 0
    assert "KAN-GPT-2 (default), parameter-matched" in capsys.readouterr().out
    assert json.loads((tmp_path / "compare.json").read_text())["parameters"]["tiny"]["gpt2"]["total"] > 0
    assert commands.main(["compare", "--models", "kan", "--out", str(tmp_path)]) == 1
    assert "--models must start with gpt2" in capsys.readouterr().err
    assert commands.main(["compare", "--size", "tiny", "--seq-len", "1000", "--out", str(tmp_path)]) == 1


def quality_base(quality, *extra):
    flat = [
        f"--{sec}.{k}={json.dumps(v)}" for sec, values in quality.PROTOCOL.items() for k, v in values.items()
    ]
    return load_config(ROOT / "configs" / "default.yaml", [*flat, *extra])


def test_quality_runs_differ_only_in_the_feed_forward_block_learning_rate_and_seed(tmp_path, eval_script):
    quality = eval_script("quality")
    base = quality_base(quality, "--model.kan_hidden_size=64")  # ignored: every model is parameter-matched
    variants = quality.parse_variants("mlp,kan,edge-bspline,group-rbf,rational", [])
    for corpus in quality.CORPORA:
        configs = {
            (n, lr, seed): quality.run_config(base, corpus, v, lr, seed, tmp_path)
            for n, v in variants.items()
            for lr in (1e-3, 4e-3)
            for seed in (1, 2)
        }
        dicts = {key: c.to_dict() for key, c in configs.items()}
        reference = dicts["mlp", 1e-3, 1]
        for (name, lr, seed), d in dicts.items():
            assert d["data"] == reference["data"]
            assert d["data"]["dataset"] == quality.CORPORA[corpus][1]["data"]["dataset"]
            own = variants[name].get("train", {})  # the block's own training settings (rational's lr scale)
            varied = {"out_dir", "learning_rate", "min_learning_rate", "seed", *own}
            assert {k: v for k, v in d["train"].items() if k not in varied} == {
                k: v for k, v in reference["train"].items() if k not in varied
            }
            assert {k: d["train"][k] for k in own} == own
            assert (d["train"]["learning_rate"], d["train"]["min_learning_rate"], d["train"]["seed"]) == (
                lr,
                lr / 10,
                seed,
            )
            assert d["train"]["out_dir"] == str(tmp_path / "runs" / corpus / name / f"lr-{lr:g}-seed-{seed}")
            assert "kan_hidden_size" not in d["model"]  # always parameter-matched
            assert d["model"]["ffn_type"] == ("mlp" if name == "mlp" else "kan")
        firsts = {n: configs[n, 1e-3, 1] for n in variants}
        counts = quality.parameter_match(firsts, vocab_size=4096)
        assert all(abs(row["ratio"] - 1) <= 0.01 for row in counts.values())
        assert counts["edge-bspline"]["kan_hidden_size"] < counts["group-rbf"]["kan_hidden_size"] == 512


class FakeRunner:
    """Stands in for quality.Runner: 'trains' instantly, the validation loss a parabola in log(lr)
    around ``best``, the test loss that plus a per-seed offset."""

    def __init__(self, out, best):
        self.out, self.best, self.runs = out, best, []

    def run_all(self, configs):
        results = []
        for c in configs:
            t = c.train
            self.runs.append((Path(t.out_dir).parent.name, t.learning_rate, t.seed))
            best = self.best[Path(t.out_dir).parent.name]
            val = 4.0 + (math.log2(t.learning_rate / best)) ** 2 / 10
            results.append(
                {
                    "lr": t.learning_rate,
                    "seed": t.seed,
                    "val_loss": val,
                    "test_loss": val + t.seed / 100,
                    "curve": [(1, val)],
                    "tokens_per_s": 1.0,
                    "wall_s": 1.0,
                }
            )
        return results


def test_protocol_picks_each_models_lr_on_validation_widens_the_grid_and_reports_test_over_seeds(
    tmp_path, eval_script
):
    quality = eval_script("quality")
    base = quality_base(quality)
    variants = quality.parse_variants("mlp,rational", [])
    runner = FakeRunner(tmp_path, {"mlp": 2e-3, "rational": 16e-3})  # rational's best is 2 steps above
    results = quality.protocol(base, ["code"], variants, [1e-3, 2e-3, 4e-3], [1, 2, 3], 3, runner)["code"]
    assert results["mlp"]["lr"] == 2e-3 and sorted(map(float, results["mlp"]["sweep"])) == [1e-3, 2e-3, 4e-3]
    assert results["rational"]["lr"] == 16e-3  # widened 4e-3 -> 8e-3 -> 16e-3 -> 32e-3, then stopped
    assert sorted(map(float, results["rational"]["sweep"])) == [1e-3, 2e-3, 4e-3, 8e-3, 16e-3, 32e-3]
    for name, row in results.items():
        lr = row["lr"]
        assert sorted(seed for n, r, seed in runner.runs if n == name and r == lr) == [1, 2, 3]
        assert row["test"]["values"] == pytest.approx([4.01, 4.02, 4.03])
        assert row["test"]["mean"] == pytest.approx(4.02) and row["test"]["min"] == pytest.approx(4.01)
    capped = FakeRunner(tmp_path, {"mlp": 2e-3, "rational": 64e-3})
    results = quality.protocol(base, ["code"], variants, [1e-3, 2e-3, 4e-3], [1], 1, capped)["code"]
    assert results["rational"]["lr"] == 8e-3  # one widening step allowed: the best seen


def test_verdict_says_when_a_difference_is_inside_the_spread(eval_script):
    quality = eval_script("quality")
    ref = quality.spread([4.0, 4.1])
    assert quality.verdict(quality.spread([3.8, 3.95]), ref) == "better"
    assert quality.verdict(quality.spread([4.2, 4.3]), ref) == "worse"
    assert quality.verdict(quality.spread([3.9, 4.05]), ref) == "inside the spread"


def test_quality_refuses_bad_arguments_with_one_line(capsys, eval_script):
    quality = eval_script("quality")
    for argv, message in (
        (["--models", "rational,mlp"], "--models must start with mlp"),
        (["--corpora", "poems"], "--corpora"),
        (["--lrs", "1e-3,x"], "--lrs"),
        (["--variant", "oops"], "--variant"),
        (["--model.n_head=5"], "n_head"),
    ):
        assert quality.main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_tiny_quality_run(tmp_path, monkeypatch, capsys, eval_script):
    monkeypatch.setenv("KANGPT_CACHE", str(tmp_path / "cache"))
    quality = eval_script("quality")
    out = tmp_path / "quality"
    tiny = [
        "--models",
        "mlp,rational",
        "--corpora",
        "english",  # every corpus's run configs are checked above
        "--lrs",
        "2e-3,4e-3",
        "--seeds",
        "1,2",
        "--quick",
        "--out",
        str(out),
        "--model.n_layer=1",
        "--model.n_embd=32",
        "--model.n_head=2",
        "--model.n_positions=32",
        "--data.max_documents=60",
        "--data.vocab_size=300",
        "--data.block_size=32",
        "--train.max_steps=4",
        "--train.eval_interval=2",
        "--train.log_interval=1",
        "--train.batch_size=4",
        "--train.warmup_steps=1",
        "--train.eval_blocks=8",
    ]
    assert quality.main(tiny) == 0
    printed = capsys.readouterr().out
    assert "#### english" in printed and "#### code" not in printed and "| GPT-2 (MLP) |" in printed
    results = json.loads((out / "quality.json").read_text())["results"]
    for corpus, models in results.items():
        for name, row in models.items():
            lr = row["lr"]
            assert row["sweep"][f"{lr:g}"] == min(row["sweep"].values())  # chosen on validation
            tests = []
            for seed in (1, 2):
                metrics = (
                    out / "runs" / corpus / name / f"lr-{lr:g}-seed-{seed}" / "metrics.jsonl"
                ).read_text()
                tests += [
                    json.loads(line)["test_loss"] for line in metrics.splitlines() if "test_loss" in line
                ]
            assert row["test"]["values"] == pytest.approx(tests) and len(tests) == 2
            assert [tokens for tokens, _ in row["curve"]] == [2 * 4 * 32, 4 * 4 * 32]
    assert (out / "validation.png").is_file()
    finished = sorted(p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.jsonl"))
    assert quality.main(tiny) == 0  # every run is reused, none trained again
    assert sorted(p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.jsonl")) == finished
    # A run saved before a setting existed (missing, so at its default) and under another name of its
    # folder is the same run; a changed one is not.
    older, changed = sorted(out.glob("runs/**/run.yaml"))[:2]
    saved = yaml.safe_load(older.read_text())
    del saved["train"]["kan_function_weight_decay"]
    saved["train"]["out_dir"] = "elsewhere/the/same/run"  # a folder moved, or named relative
    older.write_text(yaml.safe_dump(saved))
    saved = yaml.safe_load(changed.read_text())
    saved["train"]["weight_decay"] = 0.3
    changed.write_text(yaml.safe_dump(saved))
    assert quality.main(tiny) == 0
    trained = {p.parent for p in out.glob("runs/**/metrics.jsonl") if p.stat().st_mtime_ns not in finished}
    assert trained == {changed.parent}


def test_bench_kan_prints_no_peak_ratio_to_an_mlp_step_that_grew_no_page(capsys, eval_script):
    # On CPU the peak is a fresh process's RSS growth, which for a tiny compiled block can be zero.
    bench_kan = eval_script("bench_kan")
    args = bench_kan.parse_args(["--device", "cpu", "--tokens", "64", "--width", "64"])
    rows = {
        "mlp": {"params": 10, "time": 1e-3, "saved": 2**20, "peak": 0},
        "kan": {"params": 11, "time": 3e-3, "saved": 2**21, "peak": 2**20},
    }
    bench_kan.print_table(args, torch.device("cpu"), rows)
    assert "| kan | 11 | 3.0 | 3.00 | 2.0 | 2.000 | 1.0 | n/a |" in capsys.readouterr().out


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


NO_CUDA_64 = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n-embd", "0"], "--n-embd must be a positive integer, got 0"),
        (["--n-head", "3"], "--n-head 3 does not divide the width n_embd=64"),
        (["--n-embd", "48", "--n-head", "5"], "--n-head 5 does not divide the width n_embd=48"),
        (["--n-layer", "-2"], "--n-layer must be a positive integer, got -2"),
        (["--vocab-size", "0"], "--vocab-size must be a positive integer, got 0"),
        (["--new-tokens", "-5"], "--new-tokens must be a positive integer, got -5"),
        (["--prompt-len", "0"], "--prompt-len must be a positive integer, got 0"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--estimate-batch", "0"], "--estimate-batch must be a positive integer, got 0"),
        (["--dropout", "nan"], "--dropout must be a probability in [0, 1), got nan"),
        (["--dropout", "inf"], "--dropout must be a probability in [0, 1), got inf"),
        (["--dropout", "1"], "--dropout must be a probability in [0, 1), got 1.0"),
        (["--estimate-sizes", "small,huge"],
         "--estimate-sizes: unknown size 'huge'; the sizes are tiny, mini, small, medium, large, xl"),
        (["--out", "{file}"], "--out '{file}' is a file, not a folder"),
        (["--out", "{file}/compare"], "--out '{file}/compare': '{file}' is a file, not a folder"),
        (["--device", "cuda:64"],
         f"--device 'cuda:64' is not available: torch finds {NO_CUDA_64} cuda device"
         f"{'' if NO_CUDA_64 == 1 else 's'} here"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device (e.g. cpu, cuda, cuda:1, mps)"),
    ],
)
def test_bad_arguments_are_one_error_line_and_write_nothing(args, message, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("mine\n")
    before = _snapshot(tmp_path)
    out = ["--out", str(tmp_path / "compare")] if "--out" not in args else []
    argv = ["compare", "--size", "tiny", "--params-only", *out, *(a.format(file=file) for a in args)]
    assert commands.main(argv) == 1
    assert capsys.readouterr().err == f"error: {message.format(file=file)}\n"
    assert _snapshot(tmp_path) == before and file.read_text() == "mine\n"
