"""Test-session settings: everything runs offline on data the tests build themselves.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. Triton reads
``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before any test module imports
``kangpt.kan_triton`` (a pytest-xdist worker imports every module it collects first).

Each pytest-xdist worker (one per core) computes on one thread: two workers of two threads each on
two cores spend their time waiting for one another. (The processes tests start keep torch's default.)
"""

import importlib.util
import os
import sys
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
import yaml
from training_runs import TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def eval_script():
    """Loads a script of ``eval/`` as a module: ``eval_script("quality").main(argv)``."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as an import does: dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """The kangpt and `datasets` caches in the test's own folder, and the hub never reached."""
    monkeypatch.setenv("KANGPT_CACHE", str(tmp_path / "kangpt-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the training runs: offline, one thread each, a shared temporary tokenizer cache."""
    cache = tmp_path_factory.mktemp("kangpt-cache")
    return {**os.environ, "KANGPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The tiny run config (``training_runs.TINY``) as a YAML file."""
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path
