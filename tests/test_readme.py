"""The README's recipes for transformers and its ecosystem, run as written.

Every ``python`` and ``bash`` block from "Load and generate with transformers" up to "The KAN layer"
runs in a scratch folder laid out as the README assumes (``out/default/model``, written by a tiny
``train.py`` run, and ``eval/``), each in a fresh process; each block's outcome is then checked.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
START, END = "## Load and generate with transformers", "## The KAN layer"
TINY_RUN = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "data": {"dataset": "stdlib", "max_documents": 40, "val_fraction": 0.1, "vocab_size": 512,
             "block_size": 64},
    "train": {"max_steps": 10, "batch_size": 8, "warmup_steps": 2, "eval_interval": 10, "eval_blocks": 8,
              "save_interval": 0, "trackers": [], "sample_prompt": None},
}


def readme_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(START) : text.index(END)]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    bin_dir = str(Path(sys.executable).parent)  # console scripts (lm_eval) of this environment
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "KANGPT_CACHE": str(tmp_path_factory.mktemp("cache")),
            "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, env):
    """A folder as the README assumes it: ``out/default/model`` from ``train.py``, and ``eval/``."""
    work = tmp_path_factory.mktemp("readme")
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    command = [sys.executable, str(ROOT / "train.py"), str(config), "--train.out_dir=out/default"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (work / "eval").symlink_to(ROOT / "eval")
    return work


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def differ(a: Path, b: Path) -> bool:
    """Whether two model folders hold different weights (over the tensors both have)."""
    wa, wb = weights(a), weights(b)
    return any(not torch.equal(wa[k], wb[k]) for k in wa.keys() & wb.keys())


def check_generation(work: Path, out: str):
    # printed reprs: the batch of two continuations, then the pipeline's (either quote may open a string)
    assert re.search(r"""^\[["']def main\(.*["'], ["']class """, out, re.S), out
    assert re.search(r"""'generated_text': ["']import """, out), out


def check_lm_eval_cli(work: Path, out: str):
    assert "kangpt_stdlib_next_line" in out and "exact_match" in out and "word_perplexity" in out, out


def check_lm_eval_python(work: Path, out: str):
    assert "'exact_match,none':" in out, out


def check_trainer(work: Path, out: str):
    assert (work / "out/finetune/checkpoint-10").is_dir() and (work / "out/finetune/checkpoint-20").is_dir()
    assert differ(work / "out/finetune/model", work / "out/default/model")


def check_lora(work: Path, out: str):
    assert "trainable params:" in out, out
    adapter = json.loads((work / "out/lora/adapter/adapter_config.json").read_text())
    assert {"c_attn", "mlp.layers.0", "mlp.layers.1"} == set(adapter["target_modules"])
    merged, base = weights(work / "out/lora/merged"), weights(work / "out/default/model")
    assert merged.keys() == base.keys()  # a plain KAN-GPT-2 again
    kan = "transformer.h.0.mlp.layers.1.weight"
    assert not torch.equal(merged[kan], base[kan])  # the KAN layer's adapter trained and was folded in


def check_quantisation(work: Path, out: str):
    before, after = map(float, re.search(r"weights: ([\d.]+) MiB -> ([\d.]+) MiB", out).groups())
    assert after < 0.9 * before, out


def check_onnx(work: Path, out: str):
    assert (work / "out/model.onnx").is_file()
    assert float(re.search(r"largest difference from torch: (\S+)", out).group(1)) < 1e-4, out


# A distinctive piece of each block -> the check of its outcome.
CHECKS = {
    'pipeline("text-generation"': check_generation,
    "lm_eval --model hf": check_lm_eval_cli,
    "lm_eval.simple_evaluate": check_lm_eval_python,
    "trainer.save_model": check_trainer,
    "register_kan_lora": check_lora,
    "quantize_int8(model)": check_quantisation,
    "torch.onnx.export": check_onnx,
}


def check_of(code: str):
    found = [check for key, check in CHECKS.items() if key in code]
    assert len(found) == 1, f"a README block needs exactly one check, found {len(found)}:\n{code}"
    return found[0]


def test_every_recipe_has_its_check():
    assert len(BLOCKS) == len(CHECKS)
    assert len({check_of(code) for _, code in BLOCKS}) == len(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("language, code", BLOCKS, ids=[check_of(code).__name__ for _, code in BLOCKS])
def test_readme_recipe_runs_as_written(language, code, workdir, env):
    shell = ["bash", "-euo", "pipefail", "-c"]
    command = [sys.executable, "-c", code] if language == "python" else [*shell, code]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{code}\n---\n{result.stderr[-4000:]}"
    check_of(code)(workdir, result.stdout)
