"""How kangpt imports, as a user's script meets it: from any working directory, and quietly."""

import subprocess
import sys
from pathlib import Path

import kangpt


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_folder_named_kangpt_in_the_working_directory_does_not_hide_the_package(tmp_path):
    (tmp_path / "kangpt").mkdir()  # as in the folder above a clone named kangpt
    result = run_python("import kangpt; print(kangpt.__file__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == Path(kangpt.__file__)


def test_importing_kangpt_prints_nothing(tmp_path):
    """Not even the import-time warnings of torchao, which transformers imports when it is installed."""
    result = run_python("import kangpt.training.loop, kangpt.commands", tmp_path)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr


# The modelling closure: what a saved folder carries as remote code, nothing of training or commands.
MODELLING_FILES = [
    "configuration_kangpt.py",
    "kan.py",
    "kan_bases.py",
    "kan_fast.py",
    "kan_grouped.py",
    "kan_spec.py",
    "kan_symbolic.py",
    "kan_triton.py",
    "messages.py",
    "modeling_kangpt.py",
]


def test_a_saved_model_folder_holds_exactly_the_modules_of_the_package_root(tmp_path):
    config = kangpt.KANGPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    kangpt.KANGPT2LMHeadModel(config).save_pretrained(tmp_path)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == sorted(["config.json", "generation_config.json", "model.safetensors", *MODELLING_FILES])
    root = Path(kangpt.__file__).parent
    assert sorted(p.name for p in root.glob("*.py") if p.name != "__init__.py") == MODELLING_FILES
