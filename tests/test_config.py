"""Run configs: shipped files, overrides, validation errors, learning-rate schedule, run-folder decisions."""

import dataclasses
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from kangpt import KANGPT2LMHeadModel, modeling_kangpt
from kangpt.commands import main
from kangpt.io.manifest import write_manifest
from kangpt.training.optimizer import learning_rate
from kangpt.training.run_config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    build_config,
    load_config,
    model_config,
    parse_args,
    read_yaml,
)
from kangpt.training.run_dir import RunDir, read_metrics

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def meta_parameter_count(config_path: Path, vocab_size: int = 50257) -> int:
    """Parameters of the model a shipped config builds, counted without allocating them."""
    with torch.device("meta"):
        model = KANGPT2LMHeadModel(model_config(load_config(config_path), vocab_size=vocab_size))
    return sum(p.numel() for p in model.parameters())


def test_the_shipped_configs_exist():
    names = {p.stem for p in SHIPPED}
    assert {"default", "gpt2-124m", "kangpt2-124m", "gpt2-355m", "kangpt2-355m"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds_a_model_config(path):
    config = load_config(path)
    model = model_config(config, vocab_size=50257)
    assert config.data.block_size <= model.n_positions
    assert config.train.out_dir.startswith("out/")


def test_gpt2_configs_have_gpt2_shapes_and_kan_twins_match_their_size():
    # GPT-2 small has 124,439,808 parameters and medium 354,823,168 (tied LM head, 1024 positions).
    assert meta_parameter_count(CONFIGS / "gpt2-124m.yaml") == 124_439_808
    assert meta_parameter_count(CONFIGS / "gpt2-355m.yaml") == 354_823_168
    for size in ("124m", "355m"):
        assert load_config(CONFIGS / f"gpt2-{size}.yaml").model["ffn_type"] == "mlp"
        assert load_config(CONFIGS / f"kangpt2-{size}.yaml").model["ffn_type"] == "kan"
        mlp, kan = (
            meta_parameter_count(CONFIGS / f"gpt2-{size}.yaml"),
            meta_parameter_count(CONFIGS / f"kangpt2-{size}.yaml"),
        )
        assert abs(kan - mlp) / mlp < 0.01


@pytest.mark.parametrize(
    "name, kind",
    [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), *((f"deepspeed-zero{stage}", "DEEPSPEED") for stage in (2, 3))],
)
def test_accelerate_launch_configs_parse(name, kind):
    launch = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    assert launch.distributed_type.value == kind
    if kind == "FSDP":
        wrapped = launch.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert wrapped == "KANGPT2Block" and hasattr(modeling_kangpt, wrapped)
    if kind == "DEEPSPEED":
        assert launch.deepspeed_config["zero_stage"] == int(name[-1])


def test_overrides_are_parsed_as_yaml_and_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 5\n  learning_rate: 1e-3\n")
    config = parse_args(
        [
            str(path),
            "--train.max_steps=7",
            "--train.overwrite=true",
            "--model.kan_grid_range=[-1, 1]",
            "--data.dataset",
            "corpus/*.txt",
            "--train.resume=auto",
            "--data.max_documents=null",
        ]
    )
    assert config.train.max_steps == 7 and config.train.overwrite is True and config.train.resume == "auto"
    assert config.train.learning_rate == pytest.approx(1e-3)  # a float, as in YAML 1.2 (PyYAML: a string)
    assert config.model == {"kan_grid_range": [-1, 1]}
    assert config.data.dataset == "corpus/*.txt" and config.data.max_documents is None


def test_yaml_reads_floats_as_yaml_1_2_and_ints_stay_ints(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  layer_norm_epsilon: 1E-6\ntrain:\n  learning_rate: 2e-3\n  grad_clip: 1\n")
    config = load_config(path, ["--train.min_learning_rate=5e-5", "--train.seed=7"])
    assert config.model == {"layer_norm_epsilon": 1e-6}
    assert (config.train.learning_rate, config.train.min_learning_rate) == (2e-3, 5e-5)
    assert type(config.train.grad_clip) is float and config.train.grad_clip == 1.0  # an int does for a float
    assert config.train.seed == 7 and type(config.train.seed) is int
    with pytest.raises(ConfigError, match=r"train.max_steps must be int, got 1000.0"):
        load_config(path, ["--train.max_steps=1e3"])


def test_default_config_is_used_without_a_config_argument(tmp_path):
    default = tmp_path / "default.yaml"
    default.write_text("train:\n  max_steps: 3\n")
    assert parse_args(["--train.seed=1"], default_config=default).train.max_steps == 3


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, "unknown section 'trian'"),
        ({"train": {"max_step": 3}}, "unknown key train.max_step"),
        ({"model": {"n_layers": 3}}, "unknown key model.n_layers"),
        ({"model": {"eos_token_id": 3}}, "unknown key model.eos_token_id (set from the tokenizer)"),
        ({"train": {"max_steps": "ten"}}, "train.max_steps must be int, got 'ten'"),
        ({"train": {"overwrite": "maybe"}}, "train.overwrite must be bool"),
        ({"train": {"overwrite": 1}}, "train.overwrite must be bool, got 1"),
        ({"train": {"max_steps": "10"}}, "train.max_steps must be int, got '10'"),
        ({"train": {"learning_rate": "1e-3"}}, "train.learning_rate must be float, got '1e-3'"),
        ({"train": {"kan_grid_schedule": [[10, 8.5]]}}, "kan_grid_schedule must be a list of a list of int"),
        ({"model": {"kan_grid_range": "wide"}}, "model.kan_grid_range must be a list of float or int, got"),
        ({"data": {"block_size": 2.5}}, "data.block_size must be int"),
        ({"model": {"n_layer": "four"}}, "model.n_layer must be int"),
        ({"train": {"trackers": "tensorboard"}}, "train.trackers must be a list of str"),
        ({"train": {"max_steps": 0}}, "train.max_steps must be > 0"),
        (
            {"model": {"n_positions": 64}, "data": {"block_size": 128}},
            "model.n_positions=64 differs from data.block_size=128: leave model.n_positions out",
        ),
        ({"model": {"n_embd": 96, "n_head": 5}}, "model: KANGPT2Config.n_head must divide n_embd=96"),
        ({"model": {"n_embd": 100, "n_head": 4}}, "model: KANGPT2Config.kan_groups must divide n_embd=100"),
        ({"train": {"trackers": ["tensorboard", "tensorbored"]}}, "train.trackers must name trackers among"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision must be null, 'no', 'bf16' or 'fp16'"),
        ({"train": "fast"}, "section 'train' must be a mapping"),
        ({"data": {"test_fraction": 0.7}}, "data.test_fraction must be in [0, 0.5]"),
        ({"train": {"kan_function_lr_scale": 0}}, "train.kan_function_lr_scale must be > 0"),
        ({"train": {"kan_regularization": -1}}, "train.kan_regularization must be >= 0"),
        ({"train": {"kan_function_weight_decay": -0.1}}, "train.kan_function_weight_decay must be >= 0"),
        ({"train": {"kan_grid_schedule": [[10, 8, 1]]}}, "kan_grid_schedule must be a list of [step, grid"),
        ({"train": {"kan_grid_schedule": [[20, 8], [10, 16]]}}, "kan_grid_schedule steps must increase"),
        ({"train": {"kan_grid_schedule": [[10, 16], [20, 8]]}}, "grid sizes must increase from model"),
        ({"train": {"kan_grid_schedule": [[10, 4]]}}, "grid sizes must increase from model.kan_grid_size=5"),
        ({"train": {"kan_grid_schedule": [[2000, 8]]}}, "steps must increase within (0, train.max_steps"),
        (
            {"model": {"ffn_type": "mlp"}, "train": {"kan_grid_schedule": [[10, 8]]}},
            "train.kan_grid_schedule needs KAN layers with a grid",
        ),
        (
            {"model": {"kan_basis": "symbolic"}, "train": {"kan_grid_schedule": [[10, 8]]}},
            "train.kan_grid_schedule needs KAN layers with a grid",
        ),
        ({"train": {"kan_grid_update_steps": [20, 10]}}, "train.kan_grid_update_steps must increase"),
        ({"train": {"kan_grid_update_steps": [1000]}}, "train.kan_grid_update_steps must increase within"),
        (
            {"model": {"kan_basis": "chebyshev"}, "train": {"kan_grid_update_steps": [10]}},
            "needs KAN layers with a B-spline or RBF grid",
        ),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert message in str(err.value)


def test_malformed_and_missing_files_are_reported_with_their_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n   seed: [1\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in '.*bad.yaml' at line 3"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"cannot read config '.*missing.yaml'"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="overrides look like --section.key=value"):
        parse_args([str(tmp_path / "missing.yaml"), "max_steps=3"])


@pytest.fixture
def train_cli(tmp_path, monkeypatch, capsys):
    """``kangpt train ARGS`` run in-process in an empty folder, training stubbed out: (exit code, stderr).
    It also checks that nothing was written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("kangpt.commands.train.train", lambda config: pytest.fail(f"trained {config}"))

    def run(*args: str) -> tuple[int, str]:
        before = sorted(tmp_path.rglob("*"))
        code = main(["train", *args])
        assert sorted(tmp_path.rglob("*")) == before
        return code, capsys.readouterr().err

    return run


def test_a_config_file_that_is_not_text_is_one_error_line(train_cli, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\x80\x81\xff")
    assert train_cli("binary.yaml") == (
        1, "error: cannot read config 'binary.yaml': not UTF-8 text ('utf-8' codec can't decode byte 0x80 "
           "in position 0: invalid start byte)\n")


# Every float setting of every section (model.kan_grid_range, a list of floats, is tested below).
FLOAT_KEYS = [
    "train.learning_rate", "train.min_learning_rate", "train.weight_decay", "train.kan_function_lr_scale",
    "train.kan_function_weight_decay",
    "train.kan_regularization", "train.beta1", "train.beta2", "train.grad_clip",
    "data.val_fraction", "data.test_fraction",
    "model.resid_pdrop", "model.embd_pdrop", "model.attn_pdrop", "model.layer_norm_epsilon",
    "model.initializer_range",
]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_float_settings_must_be_finite(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        build_config({section: {name: value}})
    assert str(err.value) == f"{key} must be finite (no nan or inf), got {value!r}"


def test_a_list_of_floats_must_be_finite_and_an_infinite_override_is_refused(train_cli):
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"kan_grid_range": [float("-inf"), 1.0]}})
    assert str(err.value) == "model.kan_grid_range must be finite (no nan or inf), got [-inf, 1.0]"
    assert train_cli("--train.learning_rate=.inf") == (
        1, "error: train.learning_rate must be finite (no nan or inf), got inf\n")


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  max_steps: 3\ndata:\n  block_size: 8\ntrain:\n  seed: 1\n",
         "at line 5, column 1: duplicate key 'train' (first at line 1)"),
        ("train:\n  max_steps: 3\n  seed: 1\n  max_steps: 4\n",
         "at line 4, column 3: duplicate key 'max_steps' (first at line 2)"),
    ],
    ids=["section", "key"],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, message):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"malformed YAML in {str(path)!r} {message}"


def test_a_merge_key_may_still_be_overridden():
    merged = read_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")
    assert merged == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_overrides_change_only_their_section_when_sections_are_yaml_aliases(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("model: &m {n_layer: 2}\ndata: *m\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["--data.dataset=corpus.txt"])
    assert str(err.value) == "unknown key data.n_layer"


def test_an_empty_section_takes_overrides(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("model:\ntrain:\n")
    assert load_config(path).model == {}
    config = load_config(path, ["--model.n_layer=1", "--train.max_steps=3"])
    assert config.model == {"n_layer": 1} and config.train.max_steps == 3


@pytest.mark.parametrize("value", [[], 0, "", False], ids=repr)
def test_a_section_that_is_neither_a_mapping_nor_empty_is_refused(value):
    with pytest.raises(ConfigError) as err:
        build_config({"train": value})
    assert str(err.value) == f"section 'train' must be a mapping of keys to values, got {value!r}"


def test_a_bpe_too_small_for_its_bytes_is_refused_before_any_data_is_read(train_cli):
    assert train_cli("--data.vocab_size=100") == (
        1, "error: data.vocab_size must be at least 257 (256 bytes + <|endoftext|>), got 100\n")
    # Only a trained BPE has that floor: a named tokenizer brings its own vocabulary.
    assert load_config(None, ["--data.vocab_size=100", "--data.tokenizer=gpt2"]).data.vocab_size == 100


def test_train_help_lists_every_key_with_its_default(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert exit_.value.code == 0
    keys = yaml.safe_load(capsys.readouterr().out.split("which CONFIG and the overrides change:\n", 1)[1])
    assert list(keys) == ["model", "data", "train"]
    assert set(keys["data"]) == {f.name for f in dataclasses.fields(DataConfig)}
    assert set(keys["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert keys["model"]["n_layer"] == 12 and keys["model"]["kan_grid_range"] == [-2.0, 2.0]
    assert keys["model"]["vocab_size"] == "(the tokenizer's size)" and "eos_token_id" not in keys["model"]
    data = keys["data"]
    assert (data["dataset"], data["vocab_size"], data["name"]) == ("stdlib", 4096, None)
    assert keys["train"]["learning_rate"] == 1e-3 and keys["train"]["trackers"] == ["tensorboard"]
    assert keys["train"]["kan_grid_schedule"] == [] and keys["train"]["overwrite"] is False


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_minimum():
    cfg = build_config(
        {"train": {"learning_rate": 1.0, "min_learning_rate": 0.1, "warmup_steps": 10, "max_steps": 110}}
    ).train
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(4, cfg) == pytest.approx(0.5)
    assert learning_rate(10, cfg) == pytest.approx(1.0)  # end of warmup: the peak
    assert learning_rate(60, cfg) == pytest.approx(
        0.55
    )  # half-way through the decay: the mean of peak and minimum
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    assert all(learning_rate(s, cfg) >= learning_rate(s + 1, cfg) for s in range(10, 120))


def make_run(path: Path, **train) -> RunDir:
    """A run folder holding run.yaml of a default config with ``train`` overrides, and two complete
    (empty, with their manifests) checkpoints."""
    config = build_config({"train": {"out_dir": str(path), **train}})
    run = RunDir(path)
    run.start(config, resumed_at=None)
    for step in (5, 10):
        run.checkpoint(step).mkdir(parents=True)
        write_manifest(run.checkpoint(step))
    (run.checkpoints / ".tmp-step-000015").mkdir()  # half-written: never the latest
    return run


def test_run_folder_start_up_decisions(tmp_path):
    out = tmp_path / "run"

    def plan(**train):
        return RunDir(out).plan(build_config({"train": {"out_dir": str(out), **train}}))

    assert plan() is None  # no folder yet: fresh start
    run = make_run(out)
    assert run.latest_checkpoint() == run.checkpoint(10)
    assert plan(resume="auto") == run.checkpoint(10)
    assert plan(resume="auto", max_steps=5000) == run.checkpoint(10)  # training longer is the same run
    assert plan(resume=str(run.checkpoint(5))) == run.checkpoint(5)
    assert plan(overwrite=True) is None
    with pytest.raises(
        ConfigError, match="already holds this run .latest checkpoint: step-000010.; continue it"
    ):
        plan()
    with pytest.raises(ConfigError, match=r"holds a different run \(train.seed: 1337 -> 1\)"):
        plan(resume="auto", seed=1)
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        plan(resume=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="exclude each other"):
        plan(resume="auto", overwrite=True)


def test_a_folder_of_something_else_is_never_used(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    config = build_config({"train": {"out_dir": str(tmp_path), "overwrite": True}})
    with pytest.raises(ConfigError, match="is not empty and holds no kangpt run"):
        RunDir(tmp_path).plan(config)


def test_overwriting_removes_only_what_a_run_writes(tmp_path):
    run = make_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    run.metrics.write_text('{"step": 1}\n')
    replacement = build_config({"train": {"out_dir": str(tmp_path), "overwrite": True, "seed": 1}})
    run.start(replacement, resumed_at=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.yaml"]
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["train"]["seed"] == 1


def test_resuming_drops_the_metrics_of_steps_after_the_checkpoint(tmp_path):
    run = make_run(tmp_path / "run")
    run.metrics.write_text("".join(f'{{"step": {step}, "loss": 1.0}}\n' for step in range(1, 8)))
    run.start(build_config({"train": {"out_dir": str(run.path), "resume": "auto"}}), resumed_at=5)
    assert [r["step"] for r in read_metrics(run.metrics)] == [1, 2, 3, 4, 5]
    assert run.latest_checkpoint() == run.checkpoint(10)  # checkpoints are kept
    elsewhere = RunDir(tmp_path / "new" / "run")  # resuming from a checkpoint path into a new folder
    elsewhere.start(build_config({"train": {"out_dir": str(elsewhere.path)}}), resumed_at=10)
    assert (elsewhere.path / "run.yaml").is_file() and read_metrics(elsewhere.metrics) == []
