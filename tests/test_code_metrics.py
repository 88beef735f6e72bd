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


def test_a_modelling_module_importing_a_sub_package_fails_the_check(tmp_path, capsys, code_metrics):
    root = _checkout(tmp_path, {
        "kangpt/__init__.py": "from .modeling import M\n",
        "kangpt/modeling.py": "from .kan import K\n",
        "kangpt/kan.py": "",
        "kangpt/training/__init__.py": "",
        "kangpt/training/loop.py": "from ..modeling import M\n",  # a sub-package importing the model: fine
    })
    assert code_metrics([str(root)]) == 0
    (root / "kangpt/kan.py").write_text("def f():\n    from .training.loop import train\n")
    assert code_metrics([str(root)]) == 1
    out = capsys.readouterr().out
    assert "modelling modules (package root) importing others: kangpt.kan -> kangpt.training.loop" in out


def test_an_import_cycle_fails_the_check(tmp_path, capsys, code_metrics):
    root = _checkout(tmp_path, {
        "kangpt/__init__.py": "",
        "kangpt/data/__init__.py": "from .corpora import load\n",  # a package and its own modules: no cycle
        "kangpt/data/corpora.py": "from .errors import E\n",
        "kangpt/data/errors.py": "",
        "kangpt/training/__init__.py": "",
        "kangpt/training/a.py": "from .b import x\n",
        "kangpt/training/b.py": "from ..data import load\n",
    })
    assert code_metrics([str(root)]) == 0
    (root / "kangpt/training/b.py").write_text("from ..data import load\nfrom . import a\n")
    assert code_metrics([str(root)]) == 1
    cycle = "import cycles: kangpt.training.a -> kangpt.training.b -> kangpt.training.a"
    assert cycle in capsys.readouterr().out
