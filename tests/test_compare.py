"""eval/compare.py (``kangpt compare``), eval/quality.py and the measuring helpers of kangpt.measure.

Fast checks of what the tables rest on (parameter counts against transformers' GPT-2, byte counts,
peak memory), plus a tiny end-to-end comparison on CPU. No speed target is tested: speed is
measured and reported, never asserted.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kangpt import cli
from kangpt.compare import GPT2_SIZES, MODELS, PARTS, SHAPES, main, parameter_table
from kangpt.config import load_config
from kangpt.kan import BASES
from kangpt.measure import (
    MiB,
    PeakMemory,
    SavedTensorBytes,
    adamw_state_bytes_per_parameter,
    training_state_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
# transformers' GPT2LMHeadModel parameter counts (LM head tied to the token embeddings).
GPT2_PARAMETERS = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpt2_table():
    return parameter_table(list(GPT2_SIZES), SHAPES, "bspline")


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
        # Only the feed-forward part differs between the three models.
        for part in ("embeddings", "attention", "layer norms"):
            assert rows["kan"][part] == rows["kan-wide"][part] == rows["gpt2"][part]


def test_kan_models_are_parameter_matched_or_mlp_wide(gpt2_table):
    for size in GPT2_SIZES:
        rows = gpt2_table[size]
        assert abs(rows["kan"]["ratio"] - 1) < 0.01  # the config promises 1%; the issue asks 2%
        assert abs(rows["kan"]["feed-forward"] / rows["gpt2"]["feed-forward"] - 1) < 0.01
        assert rows["kan-wide"]["kan_hidden_size"] == 4 * SHAPES[size]["n_embd"]
        assert rows["kan-wide"]["ratio"] > 4


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
    for chart in ("parameters.png", "memory.png", "speed.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"


def test_console_command_and_bad_arguments(tmp_path, capsys):
    assert cli.main(["compare", "--size", "tiny", "--params-only", "--out", str(tmp_path)]) == 0
    assert "KAN-GPT-2, parameter-matched" in capsys.readouterr().out
    assert json.loads((tmp_path / "compare.json").read_text())["parameters"]["tiny"]["gpt2"]["total"] > 0
    assert cli.main(["compare", "--models", "kan", "--out", str(tmp_path)]) == 1
    assert "--models must start with gpt2" in capsys.readouterr().err
    assert cli.main(["compare", "--size", "tiny", "--seq-len", "1000", "--out", str(tmp_path)]) == 1


def test_quality_runs_differ_only_in_the_feed_forward_block(tmp_path):
    quality = load_script("quality")
    base = load_config(
        ROOT / "configs" / "default.yaml", [*quality.QUALITY_DEFAULTS, "--model.kan_hidden_size=7"]
    )
    configs = quality.run_configs(base, list(quality.MODELS), tmp_path)
    dicts = {name: c.to_dict() for name, c in configs.items()}
    for name, d in dicts.items():
        assert d["data"] == dicts["mlp"]["data"]
        assert {k: v for k, v in d["train"].items() if k != "out_dir"} == {
            k: v for k, v in dicts["mlp"]["train"].items() if k != "out_dir"
        }
        assert d["train"]["out_dir"] == str(tmp_path / "runs" / name)
        assert "kan_hidden_size" not in d["model"]  # always parameter-matched
        assert d["model"]["ffn_type"] == ("mlp" if name == "mlp" else "kan")
    counts = quality.check_parameter_match(configs, vocab_size=4096)
    assert all(abs(row["ratio"] - 1) <= 0.02 for row in counts.values())


@pytest.mark.slow
def test_tiny_quality_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KANGPT_CACHE", str(tmp_path / "cache"))
    quality = load_script("quality")
    out = tmp_path / "quality"
    argv = [
        "--models",
        "mlp,rbf",
        "--out",
        str(out),
        "--model.n_layer=1",
        "--model.n_embd=32",
        "--model.n_head=2",
        "--model.n_positions=32",
        "--data.max_documents=40",
        "--data.vocab_size=300",
        "--data.block_size=32",
        "--train.max_steps=4",
        "--train.eval_interval=2",
        "--train.log_interval=1",
        "--train.batch_size=4",
        "--train.warmup_steps=1",
        "--train.eval_blocks=8",
    ]
    assert quality.main(argv) == 0
    assert "| GPT-2 (MLP) |" in capsys.readouterr().out
    results = json.loads((out / "quality.json").read_text())
    assert list(results["models"]) == ["mlp", "rbf"]
    assert results["data"]["val_tokens"] == 8 * 32
    for row in results["models"].values():
        assert [tokens for tokens, _ in row["curve"]] == [2 * 4 * 32, 4 * 4 * 32]
        assert row["best_val_loss"] <= row["final_val_loss"] and row["peak_bytes"] > 0
    assert (out / "validation.png").is_file() and (out / "configs" / "rbf.yaml").is_file()
