"""eval/code_metrics.py: the import graph it reads, and its check that the library never imports the
commands."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def code_metrics(eval_script):
    return eval_script("code_metrics").main


def _checkout(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_relative_imports_resolve_to_the_modules_they_name(tmp_path, capsys, code_metrics):
    root = _checkout(tmp_path, {
        "kangpt/__init__.py": "from .kan import KANLinear\n",
        "kangpt/kan.py": "import torch\n",
        "kangpt/interpret/__init__.py": "from . import plots\nfrom .plots import f\n",
        "kangpt/interpret/plots.py": "from ..kan import KANLinear\nimport kangpt.kan\n\ndef f():\n    pass\n",
        "train.py": "from kangpt import KANLinear\n",
    })
    assert code_metrics([str(root)]) == 0
    out = capsys.readouterr().out
    assert "- kangpt -> kangpt.kan\n" in out
    assert "- kangpt.interpret -> kangpt.interpret.plots\n" in out
    assert "- kangpt.interpret.plots -> kangpt.kan\n" in out
    assert "- train -> kangpt\n" in out
    assert "- kangpt.interpret.plots.f: 2\n" in out


def test_a_library_module_importing_the_commands_fails_the_check(tmp_path, capsys, code_metrics):
    root = _checkout(tmp_path, {
        "kangpt/__init__.py": "",
        "kangpt/commands/__init__.py": "from ..interpret import plots\n",  # commands -> library: fine
        "kangpt/interpret/__init__.py": "",
        "kangpt/interpret/plots.py": "",
    })
    assert code_metrics([str(root)]) == 0
    (root / "kangpt/interpret/plots.py").write_text("from ..commands import main\n")
    assert code_metrics([str(root)]) == 1
    assert "library modules importing kangpt.commands: kangpt.interpret.plots" in capsys.readouterr().out


def test_this_checkout_keeps_the_commands_on_top(code_metrics):
    assert code_metrics([str(ROOT)]) == 0
