"""transformers' own common model tests (``ModelTesterMixin``, ``ConfigTester``) run on KAN-GPT-2.

The mixins are not part of the transformers wheel: they are read at run time from the transformers
source distribution matching the installed version. Point ``TRANSFORMERS_TESTS_SRC`` at the extracted
sdist root (the folder holding ``tests/test_modeling_common.py``), e.g.::

    pip download "transformers==$(python -c 'import transformers; print(transformers.__version__)')" \
        --no-binary :all: --no-deps -d /tmp/tfsrc
    tar -xzf /tmp/tfsrc/transformers-*.tar.gz -C /tmp/tfsrc
    TRANSFORMERS_TESTS_SRC=/tmp/tfsrc/transformers-<version> pytest tests/test_transformers_common.py

Without it the module is skipped. The sdist ships only the top-level ``tests/*.py``: the modules they
import from sub-folders (the export and generation mixins, the common config kwargs) get stand-ins here
when missing, so the export and ``generate`` mixin tests do not run (``generate`` is tested in
``test_modeling.py``). Each test class runs the mixins on one feed-forward variant.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import transformers
from transformers.models.auto import modeling_auto

from kangpt import KANGPT2Config, KANGPT2LMHeadModel, KANGPT2Model

_SDIST = Path(os.environ.get("TRANSFORMERS_TESTS_SRC", "/nonexistent"))
_TESTS = _SDIST / "tests"
if not (_TESTS / "test_modeling_common.py").is_file():
    pytest.skip(
        "TRANSFORMERS_TESTS_SRC is unset or has no tests/test_modeling_common.py: set it to the extracted "
        "transformers sdist of the installed version to run transformers' common model tests",
        allow_module_level=True,
    )
_PKG = "_transformers_sdist_tests"


class _MissingGenerationTesterMixin:
    """Stand-in for ``tests/generation/test_utils.py``'s mixin, which the sdist does not ship."""


# Stand-ins for the modules the sdist's top-level tests import from sub-folders it does not ship.
_STANDINS = {
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    "generation.test_utils": {"GenerationTesterMixin": _MissingGenerationTesterMixin},
    "utils.test_configuration_utils": {
        "config_common_kwargs": {  # non-default values of PreTrainedConfig's common fields
            "return_dict": False,
            "output_hidden_states": True,
            "dtype": "float16",
            "chunk_size_feed_forward": 5,
            "architectures": ["KANGPT2LMHeadModel"],
            "problem_type": "regression",
            "id2label": {0: "negative", 1: "neutral", 2: "positive"},
        }
    },
}


def _import_sdist_tests(*names: str) -> list[types.ModuleType]:
    """Import ``tests/<name>.py`` of the sdist as modules of a private package (so their relative
    imports resolve), after registering stand-ins for the sub-modules the sdist lacks."""
    package = types.ModuleType(_PKG)
    package.__path__ = [str(_TESTS)]
    sys.modules[_PKG] = package
    for name, attributes in _STANDINS.items():
        if (_TESTS / f"{name.replace('.', '/')}.py").is_file():
            continue
        parent = f"{_PKG}.{name.rpartition('.')[0]}"
        sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
        module = sys.modules[f"{_PKG}.{name}"] = types.ModuleType(f"{_PKG}.{name}")
        module.__dict__.update(attributes)
    # test_configuration_common re-imports transformers through tests/__init__.py, absent from the sdist;
    # the marks transformers' conftest.py registers (flash_attn_test, ...) are unknown here.
    with (
        mock.patch.object(transformers.utils, "direct_transformers_import", lambda *a, **k: transformers),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return [importlib.import_module(f"{_PKG}.{name}") for name in names]


_common, _config_common = _import_sdist_tests("test_modeling_common", "test_configuration_common")
ModelTesterMixin, ids_tensor, random_attention_mask = (
    _common.ModelTesterMixin,
    _common.ids_tensor,
    _common.random_attention_mask,
)
GenerationTesterMixin = _common.GenerationTesterMixin
ConfigTester = _config_common.ConfigTester
_HAS_GENERATION_MIXIN = GenerationTesterMixin is not _MissingGenerationTesterMixin
_GENERATION_MIXINS = (GenerationTesterMixin,) if _HAS_GENERATION_MIXIN else ()


class KANGPT2ModelTester:
    """Tiny KAN-GPT-2 configs and inputs for the common tests (``config_overrides`` go to the config)."""

    def __init__(self, parent, **config_overrides):
        self.parent = parent
        self.batch_size = 13
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.pad_token_id = self.vocab_size - 1
        self.config_kwargs = {
            "vocab_size": self.vocab_size,
            "n_embd": self.hidden_size,
            "n_layer": self.num_hidden_layers,
            "n_head": self.num_attention_heads,
            "n_positions": 64,
            "n_inner": 37,
            "kan_hidden_size": 16,
            "kan_groups": 4,
            # no dropout: the mixins switch it off only under BERT's names, and compare train-mode runs
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": self.vocab_size - 1,
            "eos_token_id": self.vocab_size - 1,
            "pad_token_id": self.pad_token_id,
            **config_overrides,
        }

    def get_config(self) -> KANGPT2Config:
        return KANGPT2Config(**self.config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="class", autouse=True)
def _in_tree_model_names():
    """Name the classes in transformers' Auto name tables, as an in-tree model would be: the mixins
    read them to tell base models (no loss) from causal LMs (labels)."""
    with (
        mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {"kangpt2": "KANGPT2Model"}),
        mock.patch.dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {"kangpt2": "KANGPT2LMHeadModel"}),
    ):
        yield


class KANGPT2ModelTest(ModelTesterMixin, *_GENERATION_MIXINS, unittest.TestCase):
    """The common model tests with the default KAN feed-forward (B-spline basis)."""

    all_model_classes = (KANGPT2Model, KANGPT2LMHeadModel)
    test_can_init_all_missing_weights_before_2023 = True  # files without a copyright year count as "old"
    _torch_compile_train_cls = KANGPT2LMHeadModel  # test_torch_compile_for_training (slow, GPU)
    config_overrides: dict = {}

    def setUp(self):
        self.model_tester = KANGPT2ModelTester(self, **self.config_overrides)
        self.config_tester = ConfigTester(self, config_class=KANGPT2Config, **self.model_tester.config_kwargs)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_generation_tester_mixin_inheritance(self):
        if not _HAS_GENERATION_MIXIN:
            self.skipTest("GenerationTesterMixin (tests/generation/test_utils.py) is not in the sdist")
        super().test_generation_tester_mixin_inheritance()


class KANGPT2RationalModelTest(KANGPT2ModelTest):
    """The common model tests with the group-rational KAN basis."""

    config_overrides = {"kan_basis": "rational"}


class KANGPT2MLPModelTest(KANGPT2ModelTest):
    """The common model tests with GPT-2's MLP as the feed-forward block."""

    config_overrides = {"ffn_type": "mlp"}


class KANGPT2ConfigAsGPT2Test(unittest.TestCase):
    """transformers' ``ConfigTester`` as GPT-2's own test runs it: ``n_embd=37`` with the default
    ``n_head`` (12), which does not divide it. The config is built anyway; the attention refuses it."""

    def test_config(self):
        ConfigTester(self, config_class=KANGPT2Config, n_embd=37).run_common_tests()
