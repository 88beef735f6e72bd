"""train.py end to end on a tiny config: the model folder, resume after SIGINT or from a damaged checkpoint,
bad input (refused up front with one line, nothing written). Several processes: test_distributed.py.

Every run trains the same tiny KAN-GPT-2 on 40 standard-library files; the BPE is trained once and
shared through a temporary KANGPT_CACHE.
"""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from training_runs import FILE_SIZE_LIMIT, NO_DROPOUT, ROOT, RUN_TIMEOUT, TINY, losses, overrides, run_train
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from kangpt import KANGPT2LMHeadModel, commands
from kangpt.data import BlockStream
from kangpt.io.manifest import MANIFEST, folder_problem
from kangpt.kan import KANLinear
from kangpt.training.corpus import StreamPositions, load_corpus, train_batches
from kangpt.training.evaluation import evaluate
from kangpt.training.loop import kan_penalty
from kangpt.training.optimizer import build_optimizer
from kangpt.training.report import sample, write_model_card
from kangpt.training.run_config import load_config, model_config
from kangpt.training.saving import NO_MATPLOTLIB


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with size, mtime and (files) sha256: equal snapshots, nothing touched."""
    def entry(path: Path):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        return path.stat().st_size, path.stat().st_mtime_ns, digest
    return {path: entry(path) for path in sorted(folder.rglob("*"))}



def main(argv: list[str]) -> int:
    """``python train.py ARGV`` (without its default config), in this process."""
    return commands.main(["train", *argv])

# Run as root, a child would write into folders whose modes forbid it (CAP_DAC_OVERRIDE); dropping that
# capability (and CAP_DAC_READ_SEARCH) from the bounding set before exec makes modes bind it, while the
# interpreter, the venv and the test's files stay readable to it (same uid).
DROP_FILE_PERMISSION_OVERRIDE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(f"cannot drop capability {capability}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.fixture(scope="module")
def bound_by_file_modes() -> tuple[str, ...]:
    """The Python command of a child that file modes bind, root or not (skips where that cannot be had)."""
    if os.geteuid() != 0:
        return (sys.executable,)
    launcher = (sys.executable, "-c", DROP_FILE_PERMISSION_OVERRIDE)
    status = "open('/proc/self/status').read().split('CapEff:')[1].split()[0]"
    probe = subprocess.run([*launcher, "-c", f"import sys; sys.exit(int({status}, 16) & 6)"],  # bits 1, 2
                           capture_output=True, text=True)
    if probe.returncode != 0:
        why = probe.stderr.strip() or f"exit {probe.returncode}"
        pytest.skip(f"cannot run a root child that file modes bind: {why}")
    return launcher


@pytest.fixture(scope="module")
def finished_run(env, tiny_config, tmp_path_factory):
    """An uninterrupted tiny run (dropout on): the loadable-model test and the resume reference."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    result = run_train(env, [str(tiny_config), *overrides(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_a_short_run_writes_a_model_that_transformers_loads_and_generates_from(finished_run):
    out, result = finished_run
    assert "final validation loss" in result.stdout and "unigram baseline" in result.stdout
    folder = out / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder
    )  # the test session imported kangpt, which registers it
    assert type(model).__name__ == "KANGPT2LMHeadModel" and model.config.n_layer == 2
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    card = (folder / "README.md").read_text()
    assert "| total |" in card and "validation loss" in card and "unigram baseline" in card
    assert (folder / "loss.png").stat().st_size > 0
    assert sorted(losses(out)) == list(range(1, 9)) and sorted(losses(out, "val_loss")) == [4, 8]
    assert list(losses(out, "test_loss")) == [8] and "| test loss (nats/token) |" in card
    assert yaml.safe_load((out / "run.yaml").read_text())["train"]["out_dir"] == str(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))
    for checkpoint in (out / "checkpoints").iterdir():  # the manifest lists every other file
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
        assert sorted(listed) == sorted(p.name for p in checkpoint.iterdir() if p.name != MANIFEST)
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(listed)
        assert folder_problem(checkpoint) is None


@pytest.mark.slow
def test_the_model_folder_generates_and_truncates_within_the_context(finished_run, env):
    folder, n_positions = finished_run[0] / "model", TINY["data"]["block_size"]  # n_positions follows it
    saved = json.loads((folder / "generation_config.json").read_text())
    assert "max_length" not in saved and "max_new_tokens" not in saved  # the model stops at its context
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.use_cache is True
    assert (generation.do_sample, generation.temperature, generation.top_k) == (True, 0.8, 50)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == n_positions
    long_text = (ROOT / "kangpt" / "training" / "loop.py").read_text()
    assert len(tokenizer(long_text, truncation=True).input_ids) == n_positions
    cached = AutoTokenizer.from_pretrained(next((Path(env["KANGPT_CACHE"]) / "tokenizers").iterdir()))
    assert cached.model_max_length > 1e20  # the BPE cache is left as it was
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer("def ", return_tensors="pt")
    torch.manual_seed(0)
    assert model.generate(**inputs).shape[1] <= n_positions
    # Without an end-of-text token to stop at, generation asked for more runs exactly to the context,
    # not past it: by the caller, or by the pipeline's own default (256 new tokens).
    eos = [tokenizer.eos_token_id]
    endless = model.generate(**inputs, max_new_tokens=3 * n_positions, suppress_tokens=eos)
    assert endless.shape == (1, n_positions)
    generator = pipeline("text-generation", model=str(folder))
    generated = generator("def ", suppress_tokens=eos, return_tensors=True)
    assert len(generated[0]["generated_token_ids"]) == n_positions
    # The end-of-training sample fits too: a prompt longer than the context keeps its last tokens, and
    # the new tokens are capped to the room left (generate refuses a prompt that fills the context).
    assert sample(folder, "def " * n_positions, max_new_tokens=8).startswith(" def def")
    assert sample(folder, "def ", max_new_tokens=n_positions - 1).startswith("def")


@pytest.mark.slow
def test_published_files_are_as_readable_as_the_umask_allows(finished_run):
    out = finished_run[0]
    umask = os.umask(0o022)  # what the child ran with: it inherited the test process's umask
    os.umask(umask)
    for folder in [out / "model", *(out / "checkpoints").iterdir()]:
        for path in [folder, *folder.rglob("*")]:
            expected = (0o777 if path.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(path.stat().st_mode) == expected, path  # safetensors writes 0600


INTERRUPT_AT_STEP_5 = """
import os, signal, sys
import kangpt.training.loop as training

log_metrics = training.log_metrics

def log_then_interrupt(accelerator, run, record):
    log_metrics(accelerator, run, record)
    if record["step"] == 5 and "loss" in record:
        os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C were pressed during step 5

training.log_metrics = log_then_interrupt
from kangpt.commands import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


# Ctrl-C as a terminal sends it: to the whole process group, the stream's DataLoader worker included.
INTERRUPT_GROUP_AT_STEP_5 = INTERRUPT_AT_STEP_5.replace(
    "os.kill(os.getpid(), signal.SIGINT)", "os.killpg(0, signal.SIGINT)").replace(
    "import kangpt.training.loop as training", "os.setpgrp()  # a group of its own, not pytest's\n"
    "import kangpt.training.loop as training")


@pytest.mark.slow
def test_a_streamed_run_stopped_by_ctrl_c_resumes_its_stream_where_it_stopped(env, tiny_config, tmp_path):
    streamed = {"data.streaming": True}
    reference = tmp_path / "straight"
    straight = run_train(env, [str(tiny_config), *overrides(reference, **streamed)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "resumed"
    args = ["-c", INTERRUPT_GROUP_AT_STEP_5, str(tiny_config), *overrides(out, **streamed)]
    interrupted = run_train(env, args, launcher=(sys.executable,))
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "stopped by SIGINT at step 5" in interrupted.stdout
    resumed = run_train(env, [str(tiny_config), *overrides(out, **streamed, **{"train.resume": "auto"})])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The stream went on from its position: the batches of steps 6-8 are the uninterrupted run's.
    assert losses(out) == losses(reference) and losses(out, "val_loss") == losses(reference, "val_loss")


@pytest.mark.slow
def test_interrupted_and_resumed_run_has_the_losses_of_an_uninterrupted_one(
    env, tiny_config, finished_run, tmp_path
):
    reference, _ = finished_run
    out = tmp_path / "resumed"
    interrupted = run_train(
        env, ["-c", INTERRUPT_AT_STEP_5, str(tiny_config), *overrides(out)], launcher=(sys.executable,)
    )
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "stopped by SIGINT at step 5" in interrupted.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert not (out / "model").exists()
    # A half-written checkpoint (as a crash during saving would leave) is never taken as the latest.
    (out / "checkpoints" / ".tmp-step-000007").mkdir()
    (out / "checkpoints" / ".tmp-step-000007" / "model.safetensors").write_bytes(b"garbage")

    refused = run_train(env, [str(tiny_config), *overrides(out)])
    assert refused.returncode == 1 and "already holds this run" in refused.stderr

    resumed = run_train(env, [str(tiny_config), *overrides(out, **{"train.resume": "auto"})])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-000005 at step 5" in resumed.stdout
    # Dropout masks, data order and optimizer state all continue exactly.
    assert losses(out) == losses(reference)
    assert losses(out, "val_loss") == losses(reference, "val_loss")
    assert losses(out, "lr") == losses(reference, "lr")


@pytest.fixture(scope="module")
def corpus_and_model(env, tiny_config):
    """In-process: the tiny corpus, an Accelerator and an untrained model (no dropout)."""
    config = load_config(tiny_config, overrides("unused", **NO_DROPOUT))
    accelerator = Accelerator(cpu=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KANGPT_CACHE", env["KANGPT_CACHE"])
        corpus = load_corpus(config.data, config.train, accelerator)
    torch.manual_seed(0)
    model = KANGPT2LMHeadModel(model_config(config, vocab_size=len(corpus.tokenizer))).eval()
    return config, accelerator, corpus, model


def test_function_coefficients_get_their_own_learning_rate_and_no_decay():
    config = load_config(None, ["--train.kan_function_lr_scale=30", "--model.kan_sharing=group",
                                "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2"])
    model = KANGPT2LMHeadModel(model_config(config, vocab_size=64))
    optimizer = build_optimizer(model, config.train)
    functions = [p for n, p in model.named_parameters() if n.endswith("basis.coefficients")]
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(functions) == 2 and all(groups[id(p)]["lr_scale"] == 30 for p in functions)
    assert all(groups[id(p)]["weight_decay"] == 0 for p in functions)
    decayed = build_optimizer(model, load_config(None, ["--train.kan_function_weight_decay=0.01"]).train)
    groups = {id(p): g for g in decayed.param_groups for p in g["params"]}
    assert all(groups[id(p)]["weight_decay"] == 0.01 for p in functions)
    kan_weight = model.transformer.h[0].mlp.layers[0].weight
    assert groups[id(kan_weight)]["lr_scale"] == 1 and groups[id(kan_weight)]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_kan_penalty_is_the_weighted_sum_of_every_layers_regulariser():
    config = load_config(None, ["--model.n_layer=2", "--model.n_embd=32", "--model.n_head=2"])
    model = KANGPT2LMHeadModel(model_config(config, vocab_size=64))
    layers = [m for m in model.modules() if isinstance(m, KANLinear)]
    assert len(layers) == 4
    expected = 0.5 * sum(layer.regularization_loss() for layer in layers)
    torch.testing.assert_close(kan_penalty(model, 0.5), expected)
    assert kan_penalty(model, 0.0) is None
    mlp = load_config(None, ["--model.ffn_type=mlp", "--model.n_layer=1", "--model.n_embd=32",
                             "--model.n_head=2"])
    assert kan_penalty(KANGPT2LMHeadModel(model_config(mlp, vocab_size=64)), 0.5) is None


@pytest.mark.slow
def test_a_grid_schedule_refines_the_grids_and_resumes_with_the_same_losses(env, tiny_config, tmp_path):
    schedule = {"train.kan_grid_schedule": [[3, 8], [6, 11]], "train.kan_grid_update_steps": [2, 5],
                "model.kan_sharing": "group", **NO_DROPOUT}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_train(env, [str(tiny_config), *overrides(straight, **schedule)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: KAN grids refined to 8 intervals" in result.stdout
    saved = json.loads((straight / "model" / "config.json").read_text())
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    ranges = [[r["kan_grid_low"], r["kan_grid_high"]] for r in records if "kan_grid_low" in r]
    assert saved["kan_grid_size"] == 11 and len(ranges) == 2 and saved["kan_grid_range"] == ranges[-1]
    model = AutoModelForCausalLM.from_pretrained(straight / "model")  # built with the final grid
    assert model.transformer.h[0].mlp.layers[0].basis.coefficients.shape == (8, 2 + 11 + 3)
    shutil.copytree(straight, resumed)
    run_yaml = (straight / "run.yaml").read_text()
    (resumed / "run.yaml").write_text(run_yaml.replace(str(straight), str(resumed)))
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-000008")  # resume from step 4: grid 8, refined to 11 at 6
    again = run_train(env, [str(tiny_config), *overrides(resumed, **schedule, **{"train.resume": "auto"})])
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(resumed, "val_loss") == pytest.approx(losses(straight, "val_loss"), rel=1e-6)


def test_targets_are_the_inputs_shifted_by_one(corpus_and_model):
    config, accelerator, corpus, model = corpus_and_model
    input_ids = next(train_batches(corpus.train, config.train, accelerator, skip=0))
    assert input_ids.shape == (config.train.batch_size, config.data.block_size)
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=input_ids)
    logits = output.logits
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    assert output.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    unshifted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids.reshape(-1))
    assert abs(unshifted.item() - by_hand.item()) > 1e-3


def test_evaluation_is_the_model_loss_over_the_fixed_validation_blocks(corpus_and_model):
    config, accelerator, corpus, model = corpus_and_model
    assert len(corpus.val) == config.train.eval_blocks
    val_loader = accelerator.prepare(torch.utils.data.DataLoader(corpus.val, batch_size=5))
    blocks = corpus.val[:]["input_ids"]
    with torch.no_grad():
        expected = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in blocks]).mean()
    loss = evaluate(model, val_loader, gather=accelerator.gather_for_metrics)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < corpus.baseline < torch.log(torch.tensor(512.0)).item()


def test_the_final_test_loss_is_the_trained_model_on_the_held_out_test_blocks(finished_run, corpus_and_model):
    out, _ = finished_run
    config, accelerator, corpus, _ = corpus_and_model
    assert corpus.test is not None and len(corpus.test) > 0
    held_out = corpus.val[:]["input_ids"].tolist() + corpus.test[:]["input_ids"].tolist()
    val_and_test = [tuple(b) for b in held_out]
    assert not set(val_and_test) & {tuple(b) for b in corpus.train[:]["input_ids"].tolist()}
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    loader = accelerator.prepare(torch.utils.data.DataLoader(corpus.test, batch_size=8))
    loss = evaluate(model, loader, gather=accelerator.gather_for_metrics)
    assert losses(out, "test_loss")[8] == pytest.approx(loss, rel=1e-5)


def test_streaming_reads_the_same_tokens_in_corpus_order(corpus_and_model, env):
    config, accelerator, corpus, _ = corpus_and_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KANGPT_CACHE", env["KANGPT_CACHE"])
        streamed = load_corpus(dataclasses.replace(config.data, streaming=True), config.train, accelerator)
    assert isinstance(streamed.train, BlockStream) and streamed.store is None
    assert torch.equal(streamed.val[:]["input_ids"], corpus.val[:]["input_ids"])
    assert streamed.baseline == corpus.baseline
    assert torch.equal(streamed.test[:]["input_ids"], corpus.test[: config.train.eval_blocks]["input_ids"])
    in_order = corpus.train[: 4 * config.train.batch_size]["input_ids"]
    positions = StreamPositions(accelerator)
    stream = train_batches(streamed.train, config.train, accelerator, 0, positions)
    assert torch.equal(torch.cat(list(itertools.islice(stream, 4))), in_order)
    # The position after them: the tokens read but not yet trained on are the store's next ones.
    left, read = np.frombuffer(positions.mine["tokens"], np.uint16), in_order.numel()
    assert positions.mine["epoch"] == 0 and len(left) > 0
    assert (left == corpus.store.tokens("train")[read:read + len(left)]).all()


def test_resumed_batches_continue_where_the_first_run_stopped(corpus_and_model):
    config, accelerator, corpus, _ = corpus_and_model
    straight = train_batches(corpus.train, config.train, accelerator, skip=0)
    first_ten = [next(straight) for _ in range(10)]
    resumed = train_batches(corpus.train, config.train, accelerator, skip=6)
    assert all(torch.equal(next(resumed), batch) for batch in first_ten[6:])
    assert not torch.equal(first_ten[0], first_ten[1])


# A corpus file train.py refuses: (name, bytes, the error line's expected start after "error: corpus/").
BROKEN_CORPUS_FILES = {
    "binary file": ("b.txt", b"x = 1\n" * 20 + b"\x00\xff\xfe binary",
                    "b.txt is not UTF-8 text (byte 0xff at"),
    "latin-1 file": ("b.txt", "café = 1\n".encode("latin-1"),
                     "b.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
    "malformed jsonl": ("b.jsonl", b'{"text": "a = 1"}\n{"text": oops}\n',
                        "b.jsonl line 2 is not valid JSON"),
}
BAD_INPUT = ["missing data", "empty data", *BROKEN_CORPUS_FILES, "block size", "sample tokens",
             "different run"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line_and_touches_nothing(case, tiny_config, finished_run, tmp_path, capsys,
                                                         monkeypatch):
    out = tmp_path / "out"
    args = [str(tiny_config)]
    if case in BROKEN_CORPUS_FILES:
        name, content, expected = BROKEN_CORPUS_FILES[case]
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / f"a{Path(name).suffix}").write_text("def f():\n    return 1\n" if name.endswith(".txt")
                                                     else '{"text": "def f(): pass"}\n')
        (corpus / name).write_bytes(content)
        monkeypatch.chdir(tmp_path)
        args += ["--data.dataset=corpus"]
        expected = "corpus/" + expected
    elif case == "missing data":
        args += ["--data.dataset=" + str(tmp_path / "nowhere" / "*.txt")]
        expected = "matches no files"
    elif case == "empty data":
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "empty.txt").write_text("  \n")
        args += ["--data.dataset=" + str(tmp_path / "corpus")]
        expected = "no non-empty documents"
    elif case == "block size":  # two knobs that must agree: n_positions follows block_size
        args += ["--data.block_size=128", "--model.n_positions=64"]
        expected = "model.n_positions=64 differs from data.block_size=128"
    elif case == "sample tokens":  # the sample after training must fit the context with its prompt
        args += ["--train.sample_tokens=32"]
        expected = "train.sample_tokens must be < model.n_positions=32, got 32"
    else:
        out = finished_run[0]
        args += ["--model.n_layer=3", "--train.resume=auto"]
        expected = "holds a different run (model.n_layer: 2 -> 3)"
    existed, before = out.exists(), {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(args + [f"--train.out_dir={out}"]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and expected in last_line
    assert out.exists() == existed  # nothing written, nothing overwritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_train_py_exits_non_zero_with_one_line_on_a_malformed_config(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n seed: 1\n")
    result = run_train(env, [str(bad), f"--train.out_dir={tmp_path / 'out'}"])
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines() == [
        f"error: malformed YAML in {str(bad)!r} at line 3, column 2: "
        "expected <block end>, but found '<block mapping start>'"
    ]


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_out_dir_that_is_a_file_is_refused_up_front(where, tiny_config, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker if where == "file" else blocker / "run"
    before = snapshot(tmp_path)
    assert main([str(tiny_config), f"--train.out_dir={out}"]) == 1
    expected = (f"out_dir {str(out)!r} is a file, not a folder; choose another path" if where == "file" else
                f"out_dir {str(out)!r} cannot be created: {str(blocker)!r} is a file, not a folder")
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {expected}"] and captured.out == ""
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["existing folder", "folder to create"])
def test_an_out_dir_that_cannot_be_written_is_refused_up_front(
    where, env, tiny_config, tmp_path, bound_by_file_modes
):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked if where == "existing folder" else locked / "run"
    locked.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        result = run_train(env, [str(tiny_config), *overrides(out)],
                           launcher=(*bound_by_file_modes, str(ROOT / "train.py")))
        after = snapshot(tmp_path)
    finally:
        locked.chmod(0o755)
    refusal = "is not writable" if out == locked else f"cannot be created: {str(locked)!r} is not writable"
    expected = f"out_dir {str(out)!r} {refusal}; choose another folder"
    assert result.returncode == 1 and result.stderr.splitlines() == [f"error: {expected}"]
    assert result.stdout == ""  # refused before the config is printed or any data is loaded
    assert after == before


LOCK_CHECKPOINTS_AFTER_THE_FIRST = """
import os, sys
import kangpt.training.loop as training

save_checkpoint = training.save_checkpoint

def save_then_lock(accelerator, run, step, keep):
    save_checkpoint(accelerator, run, step, keep)
    os.chmod(run.checkpoints, 0o555)  # as if the disk had stopped taking writes after the first checkpoint

training.save_checkpoint = save_then_lock
from kangpt.commands import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_a_write_that_fails_later_is_one_error_line_and_keeps_the_complete_checkpoint(
    env, tiny_config, tmp_path, bound_by_file_modes
):
    out = tmp_path / "run"
    args = [str(tiny_config), *overrides(out, **{"train.max_steps": 2, "train.save_interval": 1})]
    try:
        result = run_train(env, ["-c", LOCK_CHECKPOINTS_AFTER_THE_FIRST, *args], launcher=bound_by_file_modes)
    finally:
        if (out / "checkpoints").exists():
            (out / "checkpoints").chmod(0o755)
    half_written = out / "checkpoints" / ".tmp-step-000002"
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == f"error: cannot write {str(half_written)!r}: Permission denied"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert folder_problem(out / "checkpoints" / "step-000001") is None and not (out / "model").exists()


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a finished run folder that a test may damage."""
    shutil.copytree(run, to)
    return to


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_resume_skips_a_damaged_checkpoint_and_refuses_it_by_name(
    damage, env, tiny_config, finished_run, tmp_path, capsys
):
    reference, _ = finished_run
    out = copy_run(reference, tmp_path / "run")
    newest = out / "checkpoints" / "step-000008"
    broken = newest / damage
    if damage == "random_states_0.pkl":  # accelerate would resume without it, with other dropout masks
        broken.unlink()
        problem = f"{damage} is missing"
    else:
        size = broken.stat().st_size
        broken.write_bytes(broken.read_bytes()[: size // 2])  # as a copy or a full disk cut short leaves it
        problem = f"{damage} has {size // 2} bytes, its manifest says {size}"

    before = snapshot(out)
    assert main([str(tiny_config), *overrides(out, **{"train.resume": str(newest)})]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"error: train.resume: checkpoint {str(newest)!r} cannot be resumed: {problem}"
    ]
    assert captured.out == "" and snapshot(out) == before

    resumed = run_train(env, [str(tiny_config), *overrides(out, **{"train.resume": "auto"})])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipped damaged checkpoint {str(newest)!r}: {problem}" in resumed.stdout.splitlines()
    assert "step-000004 at step 4" in resumed.stdout
    assert losses(out) == losses(reference)  # steps 5-8 again, exactly as the uninterrupted run
    assert losses(out, "val_loss") == losses(reference, "val_loss")
    assert folder_problem(newest) is None  # the damaged checkpoint was replaced by a complete one


@pytest.mark.parametrize("case", ["checkpoints deleted", "checkpoints damaged", "damaged, no model"])
def test_resume_auto_never_starts_over_on_a_finished_model_or_damaged_checkpoints(
    case, tiny_config, finished_run, tmp_path, capsys
):
    out = copy_run(finished_run[0], tmp_path / "run")
    where = f"out_dir {str(out)!r}"
    if case == "checkpoints deleted":
        shutil.rmtree(out / "checkpoints")
        expected = (f"{where} holds a finished model but no checkpoint to resume; "
                    "replace it with --train.overwrite=true")
    else:
        for step in (4, 8):
            (out / "checkpoints" / f"step-{step:06d}" / "optimizer.bin").write_bytes(b"")
        listed = json.loads((out / "checkpoints" / "step-000008" / MANIFEST).read_text())["files"]
        size = listed["optimizer.bin"]["size"]
        damage = f"(step-000008: optimizer.bin has 0 bytes, its manifest says {size})"
        if case == "checkpoints damaged":
            expected = (f"{where} holds a finished model but no complete checkpoint to resume {damage}; "
                        "replace it with --train.overwrite=true")
        else:
            shutil.rmtree(out / "model")
            expected = (f"{where} holds no complete checkpoint to resume {damage}; "
                        "replace the run with --train.overwrite=true")
    before = snapshot(out)
    assert main([str(tiny_config), *overrides(out, **{"train.resume": "auto"})]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {expected}"] and captured.out == ""
    assert snapshot(out) == before


@pytest.mark.slow
def test_resume_auto_of_a_run_that_died_before_its_first_checkpoint_says_it_starts_over(
    env, tiny_config, finished_run, tmp_path
):
    reference, _ = finished_run
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference / "run.yaml", out / "run.yaml")
    shutil.copy(reference / "metrics.jsonl", out / "metrics.jsonl")  # steps the dead run logged
    args = [str(tiny_config), *overrides(out, **{"train.resume": "auto", "train.max_steps": 1})]
    result = run_train(env, args)
    assert result.returncode == 0, result.stderr[-3000:]
    said = f"no checkpoint to resume in out_dir {str(out)!r}: starting from step 0"
    assert said in result.stdout.splitlines()
    assert losses(out) == {1: losses(reference)[1]}  # step 1 again; the dead run's records are gone


@pytest.mark.parametrize("source", ["train.mixed_precision", "accelerate's config", "bf16"])
def test_fp16_on_cpu_is_refused_before_anything_is_written(source, env, tiny_config, tmp_path):
    out = tmp_path / "run"
    cpu_env = {**env, "ACCELERATE_USE_CPU": "1"}
    # A dataset that does not exist: a run that gets past the precision check stops at loading it.
    values = {"data.dataset": str(tmp_path / "nowhere" / "*.txt")}
    if source == "accelerate's config":
        cpu_env["ACCELERATE_MIXED_PRECISION"] = "fp16"  # as `accelerate launch --mixed_precision fp16` sets
    else:
        values["train.mixed_precision"] = "bf16" if source == "bf16" else "fp16"
    result = run_train(cpu_env, [str(tiny_config), *overrides(out, **values)])
    assert result.returncode == 1 and not out.exists()
    last_line = result.stderr.splitlines()[-1]
    if source == "bf16":  # accelerate autocasts to bfloat16 on CPU: kept
        assert last_line.startswith("error: ") and "matches no files" in last_line
    else:
        name = source if source == "train.mixed_precision" else "mixed precision (accelerate's config)"
        assert last_line == (f"error: {name} 'fp16' needs a GPU: on CPU accelerate ignores it and trains in "
                             "float32; use 'bf16' or 'no'")
        assert result.stdout == ""


WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # importing it now fails as when it is not installed
import kangpt.training.loop as training
from kangpt.commands import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_without_matplotlib_the_run_says_why_there_is_no_loss_plot(env, tiny_config, tmp_path):
    out = tmp_path / "run"
    args = [str(tiny_config), *overrides(out, **{"train.max_steps": 1})]
    result = run_train(env, ["-c", WITHOUT_MATPLOTLIB, *args], launcher=(sys.executable,))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == NO_MATPLOTLIB
    assert NO_MATPLOTLIB == "loss.png not written: matplotlib is not installed (pip install 'kangpt[plot]')"
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "loss.png").exists()
    assert "loss.png" not in (out / "model" / "README.md").read_text()


PAUSE_AFTER_STEP_2 = """
import os, sys, time
from pathlib import Path
import kangpt.training.loop as training

log_metrics = training.log_metrics

def log_then_pause(accelerator, run, record):
    log_metrics(accelerator, run, record)
    if record["step"] == 2 and "loss" in record:  # holds the folder until the test says go (or 200 s)
        Path(os.environ["PAUSED"]).touch()
        for _ in range(2000):
            if Path(os.environ["GO"]).exists():
                break
            time.sleep(0.1)

training.log_metrics = log_then_pause
from kangpt.commands import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 200) -> None:
    for _ in range(int(seconds * 10)):
        if path.exists() or process.poll() is not None:
            break
        time.sleep(0.1)
    assert path.exists(), process.communicate()[1][-3000:] if process.poll() is not None else "timed out"


@pytest.mark.slow
def test_a_second_process_in_a_training_run_folder_is_refused_naming_the_holder(env, tiny_config, tmp_path):
    out, paused, go = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    args = [str(tiny_config), *overrides(out, **{"train.save_interval": 1})]
    first = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_STEP_2, *args], cwd=ROOT, text=True,
                             env={**env, "PAUSED": str(paused), "GO": str(go)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(paused, first)
        before = snapshot(out)
        # What the refusal of a plain second start advises: resume it. Not while it trains.
        second = run_train(env, [*args, "--train.resume=auto"])
        assert second.returncode == 1
        assert re.fullmatch(
            rf"error: out_dir '{re.escape(str(out))}' is in use by another run \(pid {first.pid} on "
            rf"{re.escape(socket.gethostname())}, since [-0-9: ]+\); wait for it to end or choose another "
            "folder",
            second.stderr.splitlines()[-1])
        assert snapshot(out) == before
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=RUN_TIMEOUT)
    assert first.returncode == 0, stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, 9))  # one run's records, in order


@pytest.mark.slow
def test_the_lock_of_a_killed_run_goes_with_it(env, tiny_config, tmp_path):
    out, paused = tmp_path / "run", tmp_path / "paused"
    args = [str(tiny_config), *overrides(out, **{"train.save_interval": 1})]
    first = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_STEP_2, *args], cwd=ROOT, text=True,
                             env={**env, "PAUSED": str(paused), "GO": str(tmp_path / "never")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(paused, first)
    first.kill()  # SIGKILL: nothing of the run's own runs, the kernel releases its lock
    first.communicate()
    resumed = run_train(env, [*args, "--train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and (out / "model").is_dir()


@pytest.mark.slow
def test_a_resume_on_a_changed_corpus_is_refused_naming_the_change(env, tiny_config, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-h]*.py"))[:12]
    for source in sources:
        shutil.copy(source, corpus / f"{source.stem}.txt")
    out = tmp_path / "run"
    args = [str(tiny_config), *overrides(out, **{"data.dataset": str(corpus), "data.test_fraction": 0.0,
                                                 "train.max_steps": 2, "train.sample_prompt": None})]
    assert run_train(env, args).returncode == 0
    recorded = json.loads((out / "trained_on.json").read_text())
    assert recorded["corpus"]["dataset"] == {p.name: p.stat().st_size for p in corpus.iterdir()}
    first = sorted(corpus.iterdir())[0]
    first.write_text(first.read_text() + "\nx = 1\n")
    (corpus / "zz_new.txt").write_text("def added():\n    return 1\n" * 50)
    before = snapshot(out)
    refused = run_train(env, [*args, "--train.max_steps=4", "--train.resume=auto"])
    assert refused.returncode == 1
    size = first.stat().st_size
    assert re.fullmatch(re.escape(
        f"error: out_dir {str(out)!r} cannot be resumed on other data than it started with: data.dataset: "
        f"added zz_new.txt; data.dataset: resized {first.name} {size - 7} -> {size} bytes; the tokenizer "
        "(sha256 ") + r"[0-9a-f]{12} -> [0-9a-f]{12}" + re.escape("); restore them, or start a new run "
        "(another out_dir or --train.overwrite=true)"), refused.stderr.splitlines()[-1])
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_diverging_run_stops_at_its_first_non_finite_loss_and_publishes_nothing(env, tiny_config, tmp_path):
    out = tmp_path / "run"
    result = run_train(env, [str(tiny_config), *overrides(out, **{
        "train.learning_rate": 1e4, "train.warmup_steps": 1, "train.save_interval": 1})])
    assert result.returncode == 1
    records = losses(out)
    step = max(records) + 1  # the step whose loss was not finite: nothing of it was recorded
    assert all(math.isfinite(loss) for loss in records.values())
    latest = out / "checkpoints" / f"step-{step - 1:06d}"
    assert result.stderr.splitlines()[-1] == (
        f"error: the training loss is not finite at step {step}: training diverged; lower "
        f"train.learning_rate (or raise train.warmup_steps); stopped before saving, the last checkpoint, "
        f"{str(latest)!r}, is kept")
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == latest.name
    assert folder_problem(latest) is None and not (out / "model").exists()


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_on_the_disk_is_one_error_line(env, tiny_config, tmp_path):
    out = tmp_path / "run"
    # The weights (176 kB) fit, the optimizer state (twice that) does not.
    limited = {**env, "FILE_SIZE_LIMIT": str(250_000)}
    result = run_train(limited, [str(ROOT / "train.py"), str(tiny_config), *overrides(out)],
                       launcher=(sys.executable, "-c", FILE_SIZE_LIMIT))
    assert result.returncode == 1
    half_written = out / "checkpoints" / ".tmp-step-000004"
    assert re.fullmatch(
        rf"error: cannot write {re.escape(repr(str(half_written)))}: torch.save stopped short "
        r"\(\[enforce fail at inline_container.cc:\d+\] . unexpected pos \d+ vs \d+\); [\d,.]+ MiB free on "
        "its disk",
        result.stderr.splitlines()[-1])
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not (out / "model").exists()


def test_the_model_card_names_no_folder_of_this_machine(tmp_path):
    corpus = tmp_path / "my-corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text")
    config = load_config(None, [f"--data.dataset={corpus}", "--data.validation_dataset=wikitext",
                                f"--train.out_dir={tmp_path / 'run'}", "--model.n_layer=1",
                                "--model.n_embd=32", "--model.n_head=2"])
    model = KANGPT2LMHeadModel(model_config(config, vocab_size=64))
    metrics = {"step": 1, "tokens": 2, "val_loss": 3.0, "val_ppl": 20.0, "unigram_baseline": 4.0}
    write_model_card(tmp_path, model, config, metrics, has_plot=False)
    card = (tmp_path / "README.md").read_text()
    assert str(tmp_path) not in card
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "text-generation" and metadata["datasets"] == ["wikitext"]
    assert "Trained on `my-corpus` (a local corpus)" in card
    settings = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert settings["data"]["dataset"] == "my-corpus" and "out_dir" not in settings["train"]
    assert 'from_pretrained(model_dir)' in card
