"""Run configuration of ``train.py``: a YAML file with ``model:``, ``data:`` and ``train:`` sections.

::

    model:            # any KANGPT2Config field (vocab_size and the special-token ids come from the tokenizer,
      n_layer: 4      # n_positions from data.block_size)
    data:             # DataConfig
      block_size: 256
    train:            # TrainConfig
      max_steps: 1000

Command-line overrides ``--section.key=value`` (or ``--section.key value``) are applied on top;
values are parsed as YAML (``--train.overwrite=true``, ``--model.kan_grid_range=[-1,1]``), whose
``1e-3`` is a float as in YAML 1.2. pydantic checks each value against its field's declared type,
strictly (``"10"`` is no int; an int does for a float; no float is nan or inf). Unknown sections or
keys and values of the wrong type raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate.utils import LoggerType
from huggingface_hub.errors import StrictDataclassError
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from ..configuration_kangpt import KANGPT2Config
from ..data import BPE_VOCAB_SIZE_RULE, MIN_BPE_VOCAB_SIZE
from ..kan_spec import GRIDLESS_BASES
from ..messages import first_line

SECTIONS = ("model", "data", "train")
TRACKERS = tuple(t.value for t in LoggerType if t != LoggerType.ALL)
# Model fields that the training script sets from the tokenizer.
TOKENIZER_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# How pydantic checks a section's values (torch.dtype is an "arbitrary" type to it); no float setting
# means anything as nan or inf (an infinite learning rate passed "> 0"), so floats must be finite.
_STRICT = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the offending key or file."""


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 does (PyYAML follows YAML 1.1,
    whose floats need a dot, so ``learning_rate: 1e-3`` was the string "1e-3"), and refusing a mapping
    key given twice (PyYAML keeps the last value silently: a second ``train:`` section replaced the first)."""

    def construct_mapping(self, node, deep=False):
        """The mapping of ``node``; a ConstructorError at a key's second occurrence, naming its first."""
        first_lines = {}
        for key_node, _ in node.value:
            # A merge key ("<<: *base") may be overridden by the keys beside it, as YAML means it to.
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in first_lines:
                problem = f"duplicate key {key!r} (first at line {first_lines[key]})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_yaml(text: str):
    """The value of a YAML text, read safely, with YAML 1.2's floats (``1e-3``, ``2E5``)."""
    return yaml.load(text, Loader=_YAMLLoader)


@dataclass
class DataConfig:
    """The ``data:`` section: corpus, tokenizer and block size (see ``kangpt.data``)."""

    dataset: str = "stdlib"  # "stdlib", "pydoc-topics", local files/folder/glob (.txt/.jsonl/.parquet), hub
    name: str | None = None  # hub dataset config name
    text_field: str = "text"  # column holding the text (.jsonl/.parquet/hub)
    val_fraction: float = 0.01  # held-out fraction of documents when the dataset has no validation split
    test_fraction: float = 0.0  # > 0: hold out a test split too (if the dataset has none), read at the end
    validation_dataset: str | None = None  # local files/folder/glob that are the validation split
    test_dataset: str | None = None  # local files/folder/glob that are the test split
    streaming: bool = False  # stream the corpus instead of loading it into memory (sharded across ranks)
    max_documents: int | None = None  # read at most this many documents per split
    tokenizer: str = (
        "bpe"  # "bpe": train a byte-level BPE on the training split; else a tokenizer name or path
    )
    vocab_size: int = 4096  # vocabulary size of the trained BPE
    tokenizer_documents: int = 10000  # the BPE is trained on the first N training documents
    block_size: int = 256  # tokens per training sequence


@dataclass
class TrainConfig:
    """The ``train:`` section: optimisation, evaluation, checkpoints and outputs."""

    out_dir: str = "out/default"  # run folder: run.yaml, metrics.jsonl, checkpoints/, model/
    seed: int = 1337
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per process per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    learning_rate: float = 1e-3  # peak learning rate
    min_learning_rate: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0 to learning_rate
    weight_decay: float = 0.1  # AdamW decay of matrices (not of norms, biases or function coefficients)
    kan_function_lr_scale: float = 30.0  # learning-rate multiplier of grouped/rational function coefficients
    kan_function_weight_decay: float = 0.0  # AdamW decay of those coefficients
    kan_regularization: float = 0.0  # weight of the KAN sparsity regulariser (L1 + entropy) in the loss
    # [[step, grid_size], ...]: at each step refine every KAN layer's grid (coarse to fine; one process)
    kan_grid_schedule: list[list[int]] = field(default_factory=list)
    # at each of these steps, move every B-spline/RBF grid to the range its inputs take (one process)
    kan_grid_update_steps: list[int] = field(default_factory=list)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    mixed_precision: str | None = None  # "no", "bf16" or "fp16"; null: as `accelerate launch` says
    eval_interval: int = 100  # steps between validation runs (and at the last step)
    eval_blocks: int | None = None  # evaluate on the first N validation blocks; null: all of them
    log_interval: int = 10  # steps between metrics.jsonl / tracker records
    save_interval: int = 500  # steps between checkpoints; 0: only at the end or on SIGINT/SIGTERM
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: str | None = None  # "auto" (latest checkpoint in out_dir) or a checkpoint folder
    overwrite: bool = False  # replace a different run already in out_dir
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    init_from: str | None = None  # start from this model folder (KAN-GPT-2 or GPT-2), new optimizer/schedule
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # those installed are used
    sample_prompt: str | None = None  # generate from this prompt after training
    sample_tokens: int = 64  # tokens generated from sample_prompt


@dataclass
class RunConfig:
    """A whole run: ``model`` holds KANGPT2Config keyword arguments, ``data`` and ``train`` the rest."""

    model: dict
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        """Plain nested dict (what ``run.yaml`` holds)."""
        return {
            "model": dict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }

    def tokens_per_step(self, processes: int = 1) -> int:
        """Training tokens of one optimizer step over ``processes`` processes (each its own batches)."""
        t = self.train
        return t.batch_size * t.gradient_accumulation_steps * processes * self.data.block_size


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read the YAML file ``path`` (None: all defaults), apply ``--section.key=value`` overrides, validate."""
    parsed = _parse_overrides(overrides)
    raw = _read_config_file(Path(path)) if path is not None else {}
    for section, key, value in parsed:
        # A new mapping: sections that are YAML aliases of one (data: *m) must not share an override.
        raw[section] = {**_section(raw, section), key: value}
    return build_config(raw)


def parse_args(argv: list[str], default_config: str | Path | None = None) -> RunConfig:
    """``[CONFIG] [--section.key=value ...]`` -> RunConfig; CONFIG defaults to ``default_config``."""
    path = default_config
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
    return load_config(path, argv)


def build_config(raw: dict) -> RunConfig:
    """Validate a ``{"model": {...}, "data": {...}, "train": {...}}`` dict and build the RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"a run config must be a mapping with sections {SECTIONS}, got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    sections = {name: _section(raw, name) for name in SECTIONS}
    config = RunConfig(
        model=_check_section("model", sections["model"]),
        data=DataConfig(**_check_section("data", sections["data"])),
        train=TrainConfig(**_check_section("train", sections["train"])),
    )
    _check_values(config)
    return config


def _section(raw: dict, name: str) -> dict:
    """Section ``name`` of ``raw``: its mapping, ``{}`` when absent or empty (YAML reads ``model:`` alone
    as null); any other value (a list, 0, "") is refused rather than taken for an empty section."""
    section = raw.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {section!r}")
    return section


# Model fields a run that starts from a model folder (train.init_from) may still set.
INIT_FROM_MODEL_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def model_config(config: RunConfig, **tokenizer_fields) -> KANGPT2Config:
    """The KANGPT2Config of a run, with ``tokenizer_fields`` (vocab size, special-token ids) filled in.

    ``vocab_size`` from the ``model:`` section wins when it is given (e.g. padded to a multiple of 64).
    The context (``n_positions``) is ``data.block_size``: every position the model has is trained.
    With ``train.init_from``, the config is the folder's (a GPT-2 folder's as ``ffn_type="mlp"``), the
    dropout rates of the ``model:`` section applied; the tokenizer fields are the folder's too.
    """
    if config.train.init_from is not None:
        return _init_from_config(config)
    try:
        return KANGPT2Config(**{"n_positions": config.data.block_size, **tokenizer_fields, **config.model})
    except (ValueError, StrictDataclassError) as err:
        raise ConfigError(f"model: {first_line(err)}") from err


def _init_from_config(config: RunConfig) -> KANGPT2Config:
    """The KANGPT2Config of the folder ``train.init_from`` (see :func:`model_config`)."""
    from transformers import AutoConfig

    from ..modeling_kangpt import kangpt2_config_of

    path = config.train.init_from
    changed = sorted(set(config.model) - set(INIT_FROM_MODEL_FIELDS))
    if changed:
        raise ConfigError(f"model.{changed[0]} cannot be set with train.init_from (the model is the "
                          f"folder's); only {', '.join(INIT_FROM_MODEL_FIELDS)} can")
    if not Path(path, "config.json").is_file():
        raise ConfigError(f"train.init_from: {path!r} is not a model folder (no config.json)")
    try:
        loaded = AutoConfig.from_pretrained(path)
        if loaded.model_type == "gpt2":
            return kangpt2_config_of(loaded, ffn_type="mlp", **config.model)
        if loaded.model_type != KANGPT2Config.model_type:
            raise ConfigError(f"train.init_from: {path!r} holds a {loaded.model_type!r} model, "
                              "not a KAN-GPT-2 or a GPT-2")
        return KANGPT2Config(**{**loaded.to_dict(), **config.model})
    except (OSError, ValueError, StrictDataclassError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"train.init_from: cannot read {path!r}: {first_line(err)}") from err


def _read_config_file(path: Path) -> dict:
    """The sections of a run's YAML file (``{}`` for an empty one); ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")  # YAML's encoding, whatever the locale's
    except OSError as err:
        raise ConfigError(f"cannot read config {str(path)!r}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read config {str(path)!r}: not UTF-8 text ({err})") from None
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"malformed YAML in {str(path)!r}{where}: {problem}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{str(path)!r} must hold a mapping with sections {SECTIONS}, got {type(raw).__name__}"
        )
    return raw


def _parse_overrides(args: list[str]) -> list[tuple[str, str, object]]:
    """``["--train.max_steps=10", "--data.dataset", "x.txt"]`` -> ``[("train", "max_steps", 10), ...]``."""
    parsed, args = [], list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        name, sep, text = arg[2:].partition("=")
        if not sep:
            if not args:
                raise ConfigError(f"override {arg!r} has no value")
            text = args.pop(0)
        section, _, key = name.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in {arg!r} (sections: {', '.join(SECTIONS)})")
        try:
            value = read_yaml(text)
        except yaml.YAMLError:
            value = text
        parsed.append((section, key, value))
    return parsed


@functools.cache
def _section_types(section: str) -> dict[str, object]:
    """Key -> type annotation of a section: a dataclass's fields; for ``model``, KANGPT2Config's less
    the tokenizer's."""
    if section != "model":
        return typing.get_type_hints({"data": DataConfig, "train": TrainConfig}[section])
    hints = typing.get_type_hints(KANGPT2Config, localns={"torch": torch})
    fields = dataclasses.fields(KANGPT2Config)
    return {f.name: hints[f.name] for f in fields if f.name not in TOKENIZER_FIELDS}


def _section_defaults(section: str) -> dict[str, object]:
    """Key -> default of every key of a section, from the dataclass that declares it."""
    fields = dataclasses.fields({"model": KANGPT2Config, "data": DataConfig, "train": TrainConfig}[section])
    keys = _section_types(section)
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in fields if f.name in keys}


def describe_keys() -> str:
    """Every section and key with its default, as YAML lines (``kangpt train --help`` shows them); made
    from the dataclasses that declare the keys, so it lists what a run config takes."""
    lines = []
    for section in SECTIONS:
        lines.append(f"{section}:")
        shown = {key: _yaml_text(value) for key, value in _section_defaults(section).items()}
        if section == "model":  # a run's model takes its vocabulary size from the tokenizer unless set
            shown["vocab_size"] = "(the tokenizer's size)"
        lines += [f"  {key}: {text}" for key, text in shown.items()]
    return "\n".join(lines)


def _yaml_text(value) -> str:
    """A value as YAML writes it on one line (a tuple as the list YAML reads back)."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n...\n").strip()


@functools.cache
def _section_validator(section: str) -> TypeAdapter:
    """pydantic's validator of a section: any subset of its keys, each of its declared type, strictly (no
    "10" for an int, no 1 for a bool; an int does for a float), floats finite, no other key."""
    schema = TypedDict(f"{section}_section", _section_types(section), total=False)
    return TypeAdapter(with_config(_STRICT)(schema))


def _check_section(section: str, values: dict) -> dict:
    """The section's values, ints given for floats made floats; ConfigError naming the first bad key."""
    try:
        return _section_validator(section).validate_python(values)
    except ValidationError as err:
        errors = err.errors()
        key = errors[0]["loc"][0]
        if errors[0]["type"] == "extra_forbidden":
            hint = " (set from the tokenizer)" if key in TOKENIZER_FIELDS else ""
            raise ConfigError(f"unknown key {section}.{key}{hint}") from None
        # A union ("float | int") reports each of its members; an infinite float is not a wrong type.
        if any(e["type"] == "finite_number" for e in errors if e["loc"][0] == key):
            expected = "finite (no nan or inf)"
        else:
            expected = _type_name(_section_types(section)[key])
        raise ConfigError(f"{section}.{key} must be {expected}, got {values[key]!r}") from None


def _type_name(annotation) -> str:
    """How an error message names a type: ``int``, ``a list of str``, ``str or null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))  # a list or a tuple: "a list" once
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


def _check_grid_schedule(train: TrainConfig, model: KANGPT2Config) -> None:
    """``train.kan_grid_schedule``: [step, grid_size] pairs, both increasing, inside the run, finer than
    the model's grid, on a model whose KAN layers have a grid."""
    schedule = train.kan_grid_schedule
    if not schedule:
        return
    problem = None
    if model.ffn_type != "kan" or model.kan_basis in GRIDLESS_BASES:
        problem = "needs KAN layers with a grid (model.ffn_type 'kan', a spline-like model.kan_basis)"
    elif any(len(entry) != 2 for entry in schedule):
        problem = "must be a list of [step, grid_size] pairs"
    else:
        steps, sizes = [s for s, _ in schedule], [model.kan_grid_size] + [g for _, g in schedule]
        if not all(a < b for a, b in zip([0, *steps], [*steps, train.max_steps], strict=True)):
            problem = f"steps must increase within (0, train.max_steps={train.max_steps})"
        elif not all(a < b for a, b in zip(sizes, sizes[1:], strict=False)):
            problem = f"grid sizes must increase from model.kan_grid_size={model.kan_grid_size}"
    if problem:
        raise ConfigError(f"train.kan_grid_schedule {problem}, got {schedule!r}")


def _check_values(config: RunConfig) -> None:
    """Range checks that the types alone do not express (``model_config`` checks the model section)."""
    data, train = config.data, config.train

    def need(key: str, ok: bool, rule: str):
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key} {rule}, got {getattr(getattr(config, section), name)!r}")

    # The floor of a BPE that the run trains (with train.init_from the folder's tokenizer is used, see
    # model.py), known before the corpus is read; kangpt.data holds the rule.
    if data.tokenizer == "bpe" and train.init_from is None:
        need("data.vocab_size", data.vocab_size >= MIN_BPE_VOCAB_SIZE, BPE_VOCAB_SIZE_RULE)
    for key in ("vocab_size", "block_size"):
        need(f"data.{key}", getattr(data, key) > 1, "must be > 1")
    need("data.tokenizer_documents", data.tokenizer_documents > 0, "must be > 0")
    need("data.val_fraction", 0 < data.val_fraction <= 0.5, "must be in (0, 0.5]")
    need("data.test_fraction", 0 <= data.test_fraction <= 0.5, "must be in [0, 0.5]")
    for key in ("validation_dataset", "test_dataset"):
        need(f"data.{key}", getattr(data, key) is None or bool(getattr(data, key)), "must be null or a path")
    need("data.max_documents", data.max_documents is None or data.max_documents > 0, "must be > 0")
    given = config.model.get("n_positions", data.block_size)
    if train.init_from is None and given != data.block_size:  # two knobs that must agree: one is enough
        raise ConfigError(f"model.n_positions={given!r} differs from data.block_size={data.block_size}: "
                          "leave model.n_positions out, it follows data.block_size")
    model = model_config(config)
    try:
        model.check_widths()  # what the model's modules need, without building them
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    n_positions = model.n_positions
    need("data.block_size", data.block_size <= n_positions, f"must be <= model.n_positions={n_positions}")
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                "keep_checkpoints", "sample_tokens", "learning_rate"):
        need(f"train.{key}", getattr(train, key) > 0, "must be > 0")
    # The end-of-training sample needs room for its prompt inside the context.
    need("train.sample_tokens", train.sample_prompt is None or train.sample_tokens < n_positions,
         f"must be < model.n_positions={n_positions}")
    need("train.kan_function_lr_scale", train.kan_function_lr_scale > 0, "must be > 0")
    _check_grid_schedule(train, model)
    updates = train.kan_grid_update_steps
    if updates:
        increasing = all(a < b for a, b in zip([0, *updates], [*updates, train.max_steps], strict=True))
        need("train.kan_grid_update_steps", increasing,
             f"must increase within (0, train.max_steps={train.max_steps})")
        need("train.kan_grid_update_steps", model.ffn_type == "kan" and model.kan_basis in ("bspline", "rbf"),
             "needs KAN layers with a B-spline or RBF grid")
    for key in ("warmup_steps", "save_interval", "weight_decay", "kan_function_weight_decay", "grad_clip",
                "min_learning_rate", "kan_regularization"):
        need(f"train.{key}", getattr(train, key) >= 0, "must be >= 0")
    need("train.min_learning_rate", train.min_learning_rate <= train.learning_rate,
         f"must be <= train.learning_rate={train.learning_rate}")
    for key in ("beta1", "beta2"):
        need(f"train.{key}", 0 <= getattr(train, key) < 1, "must be in [0, 1)")
    need("train.eval_blocks", train.eval_blocks is None or train.eval_blocks > 0, "must be > 0")
    need("train.mixed_precision", train.mixed_precision in (None, "no", "bf16", "fp16"),
         "must be null, 'no', 'bf16' or 'fp16'")
    need("train.trackers", all(t in TRACKERS for t in train.trackers), f"must name trackers among {TRACKERS}")
    need("train.out_dir", bool(train.out_dir), "must not be empty")
    need("train.resume", train.resume is None or bool(train.resume), "must be 'auto' or a checkpoint path")
