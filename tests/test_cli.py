"""The ``kangpt`` console script: the command table, ``kangpt generate`` output and errors."""

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from kangpt import KANGPT2Config, KANGPT2LMHeadModel, commands
from kangpt.data import load_tokenizer
from kangpt.kan import BASES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small untrained KAN-GPT-2 saved with a byte-level BPE, as train.py saves its model."""
    folder = tmp_path_factory.mktemp("model")
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    tokenizer = load_tokenizer("bpe", texts, vocab_size=300, cache_dir=str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(0)
    config = KANGPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    KANGPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_greedy_generation_prints_the_prompt_and_the_models_own_continuation(model_dir, capsys):
    assert commands.main(["generate", str(model_dir), "--prompt", "def add", "--max-new-tokens", "12",
                     "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = KANGPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = tokenizer("def add", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert printed.rstrip("\n") == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_compiled_generation_prints_what_eager_generation_does(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "def add", "--max-new-tokens", "12", "--temperature", "0"]
    assert commands.main(args) == 0
    eager = capsys.readouterr().out
    assert commands.main([*args, "--compile"]) == 0  # torch.compile with a static cache, on the CPU
    assert capsys.readouterr().out == eager


def test_sampling_is_reproducible_with_a_seed(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "import", "--max-new-tokens", "10", "--top-k", "20",
            "--top-p", "0.9", "--temperature", "1.5", "--seed", "3"]
    outputs = []
    for _ in range(2):
        assert commands.main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("import")


@pytest.fixture(scope="module")
def says_add(model_dir, tmp_path_factory):
    """The small model made to predict the token `` add`` whatever came before: its final layer norm
    gives a constant, that token's (enlarged) embedding, which the LM head shares."""
    folder = tmp_path_factory.mktemp("says_add")
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = KANGPT2LMHeadModel.from_pretrained(folder)
    add = tokenizer.convert_tokens_to_ids("\u0120add")  # byte-level BPE spells the space as \u0120
    with torch.no_grad():
        embeddings = model.get_output_embeddings().weight
        embeddings[add] *= 10  # its own logit is then far above any other's
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(embeddings[add])
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("prompt", ["def ", "x = 1\n    ", " "])
def test_a_prompt_ending_in_whitespace_is_printed_once_then_continued(says_add, prompt, capsys):
    tokenizer = AutoTokenizer.from_pretrained(says_add)
    model = KANGPT2LMHeadModel.from_pretrained(says_add).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    plain = model.generate(ids, max_new_tokens=1, do_sample=False)
    assert tokenizer.decode(plain[0]) == prompt + " add"  # fed as it is tokenized, the space doubles
    argv = ["generate", str(says_add), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]
    assert commands.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(prompt + "add add"), printed


CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("args, message", [
    (["generate", "/no/such/folder"], "no such model folder: '/no/such/folder'"),
    (["generate", "{empty}"], "'{empty}' is not a model folder (no config.json)"),
    (["generate", "{model}", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["generate", "{model}", "--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["generate", "{model}", "--temperature", "nan"],
     "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    (["generate", "{model}", "--temperature", "inf"],
     "--temperature must be a finite number >= 0 (0: greedy), got inf"),
    (["generate", "{model}", "--temperature", "-1"],
     "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["generate", "{model}", "--top-k", "-1"], "--top-k must be a non-negative integer, got -1"),
    (["generate", "{model}", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["generate", "{model}", "--device", "cuda:64"],
     f"--device 'cuda:64' is not available: torch finds {CUDA_DEVICES} cuda device"
     f"{'' if CUDA_DEVICES == 1 else 's'} here"),
    (["generate", "{model}", "--device", "meta"],
     "--device 'meta' is not available: torch finds 0 meta devices here"),
    (["generate", "{model}", "--device", "gpu"],
     "--device 'gpu' is not a torch device (e.g. cpu, cuda, cuda:1, mps)"),
    pytest.param(["generate", "{model}", "--device", "cuda"],
                 "--device 'cuda' is not available: torch finds 0 cuda devices here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_input_is_one_error_line(args, message, model_dir, tmp_path, capsys):
    args = [a.format(empty=tmp_path, model=model_dir) for a in args]
    before = _snapshot(model_dir)
    assert commands.main(args) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {message.format(empty=tmp_path)}\n" and captured.out == ""
    assert _snapshot(model_dir) == before


def _truncate_weights(folder: Path):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _unknown_basis(folder: Path):
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"kan_basis": "bspline"', '"kan_basis": "fourier"'))


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _wrong_type(folder: Path):
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"n_layer": 2', '"n_layer": "2"'))


@pytest.mark.parametrize("damage, message", [
    (_truncate_weights, "cannot load '{folder}': a weights file is damaged (Error while deserializing"),
    (_wrong_type, "cannot load '{folder}': Field 'n_layer' expected int, got str"),
    (_unknown_basis, "cannot load '{folder}': KANGPT2Config.kan_basis must be one of " + str(BASES)
     + ", got 'fourier'"),
])
def test_a_damaged_model_folder_is_one_error_line_and_stays_as_it_was(damage, message, model_dir, tmp_path,
                                                                        capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    damage(folder)
    before = _snapshot(folder)
    assert commands.main(["generate", str(folder), "--prompt", "def"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message.format(folder=folder)), err
    assert _snapshot(folder) == before


def test_a_missing_folder_named_like_a_hub_model_says_there_is_no_such_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert commands.main(["generate", "mine/model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: no such model folder: 'mine/model', and no hub model of that name"), err


def test_a_command_in_the_table_gets_its_own_subcommand(capsys, monkeypatch):
    echo = types.SimpleNamespace(
        HELP="print a word",
        configure=lambda parser: parser.add_argument("word"),
        run=lambda args: print(args.word * 2),
    )
    monkeypatch.setitem(commands.COMMANDS, "echo", echo)

    assert commands.main(["echo", "hi"]) == 0
    assert capsys.readouterr().out == "hihi\n"
    with pytest.raises(SystemExit):
        commands.main(["--help"])
    listed = capsys.readouterr().out
    assert "echo" in listed and "generate" in listed


def test_the_console_script_runs_as_a_module(model_dir):
    command = [sys.executable, "-m", "kangpt.commands", "generate", str(model_dir), "--prompt", "def"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def")
