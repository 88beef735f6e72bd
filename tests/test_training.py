"""train.py end to end on a tiny config: the model folder, resume after SIGINT, two-process DDP, bad input.

Every run trains the same tiny KAN-GPT-2 on 40 standard-library files; the BPE is trained once and
shared through a temporary KANGPT_CACHE.
"""

import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from datasets import IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from kangpt import KANGPT2LMHeadModel
from kangpt.config import build_config, load_config, model_config
from kangpt.training import evaluate, learning_rate, load_corpus, main, train_batches

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
              "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
    "data": {"dataset": "stdlib", "max_documents": 40, "val_fraction": 0.1, "vocab_size": 512,
             "block_size": 32},
    "train": {"max_steps": 8, "batch_size": 8, "learning_rate": 3e-3, "min_learning_rate": 3e-4,
              "warmup_steps": 2, "eval_interval": 4, "eval_blocks": 48, "log_interval": 1, "save_interval": 4,
              "trackers": [], "sample_prompt": "def ", "sample_tokens": 8},
}
NO_DROPOUT = {"model.resid_pdrop": 0.0, "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the runs: offline, one thread each, a shared temporary tokenizer cache."""
    cache = tmp_path_factory.mktemp("kangpt-cache")
    return {**os.environ, "KANGPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def overrides(out_dir, **values) -> list[str]:
    values = {"train.out_dir": str(out_dir), **values}
    return [
        f"--{key}={json.dumps(value) if not isinstance(value, str) else value}"
        for key, value in values.items()
    ]


def run_train(env, args, launcher=(sys.executable, str(ROOT / "train.py"))) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def losses(out_dir: Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of one metric in a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    assert yaml.safe_load((out / "run.yaml").read_text())["train"]["out_dir"] == str(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


INTERRUPT_AT_STEP_5 = """
import os, signal, sys
import kangpt.training as training

log_metrics = training.log_metrics

def log_then_interrupt(accelerator, run, record):
    log_metrics(accelerator, run, record)
    if record["step"] == 5 and "loss" in record:
        os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C were pressed during step 5

training.log_metrics = log_then_interrupt
sys.exit(training.main(sys.argv[1:]))
"""


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


DUMP_WEIGHTS_OF_EVERY_RANK = """
import os, sys
import torch
import kangpt.training as training

save_model = training.save_model

def save_and_dump(accelerator, model, *args):
    weights = accelerator.unwrap_model(model).state_dict()
    torch.save(weights, os.path.join(os.environ["DUMP_DIR"], f"rank{accelerator.process_index}.pt"))
    save_model(accelerator, model, *args)

training.save_model = save_and_dump
sys.exit(training.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(env, tiny_config, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # One process: 8 sequences per step. Two processes: 2 x 2 micro-batches of 2 each (accumulation too).
    single = run_train(env, [str(tiny_config), *overrides(one, **NO_DROPOUT)])
    assert single.returncode == 0, single.stderr[-3000:]
    script = tmp_path / "ddp_driver.py"
    script.write_text(DUMP_WEIGHTS_OF_EVERY_RANK)
    ddp_env = {**env, "ACCELERATE_USE_CPU": "1", "DUMP_DIR": str(tmp_path)}
    per_process = {"train.batch_size": 2, "train.gradient_accumulation_steps": 2}
    ddp_args = [str(tiny_config), *overrides(two, **NO_DROPOUT, **per_process)]
    torchrun = (
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"
    )
    ddp = run_train(ddp_env, ddp_args, launcher=(*torchrun, str(script)))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert losses(two, "lr") == losses(one, "lr")
    cfg = build_config(TINY).train
    expected_lr = [learning_rate(step, cfg) for step in range(8)]  # the schedule of 8 steps, not 16
    assert [losses(one, "lr")[s] for s in range(1, 9)] == pytest.approx(expected_lr)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert losses(two, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-4)
    single_weights = AutoModelForCausalLM.from_pretrained(one / "model").state_dict()
    assert all(torch.allclose(rank0[k], single_weights[k], atol=1e-4) for k in single_weights)


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
    val_loader = accelerator.prepare(
        torch.utils.data.DataLoader(corpus.val.with_format("torch"), batch_size=5)
    )
    blocks = corpus.val.with_format("torch")["input_ids"]
    with torch.no_grad():
        expected = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in blocks]).mean()
    assert evaluate(model, val_loader, accelerator) == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < corpus.baseline < torch.log(torch.tensor(512.0)).item()


def test_streaming_reads_the_same_tokens_in_corpus_order(corpus_and_model, env):
    config, accelerator, corpus, _ = corpus_and_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KANGPT_CACHE", env["KANGPT_CACHE"])
        streamed = load_corpus(dataclasses.replace(config.data, streaming=True), config.train, accelerator)
    assert isinstance(streamed.train, IterableDataset)
    assert streamed.val["input_ids"] == corpus.val["input_ids"] and streamed.baseline == corpus.baseline
    batch_size = config.train.batch_size
    in_order = corpus.train.with_format("torch")["input_ids"][: 4 * batch_size]
    batches = list(itertools.islice(train_batches(streamed.train, config.train, accelerator, skip=1), 3))
    assert torch.equal(torch.cat(batches), in_order[batch_size:])


def test_resumed_batches_continue_where_the_first_run_stopped(corpus_and_model):
    config, accelerator, corpus, _ = corpus_and_model
    straight = train_batches(corpus.train, config.train, accelerator, skip=0)
    first_ten = [next(straight) for _ in range(10)]
    resumed = train_batches(corpus.train, config.train, accelerator, skip=6)
    assert all(torch.equal(next(resumed), batch) for batch in first_ten[6:])
    assert not torch.equal(first_ten[0], first_ten[1])


@pytest.mark.parametrize("case", ["missing data", "empty data", "block size", "different run"])
def test_bad_input_is_one_error_line_and_touches_nothing(case, tiny_config, finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(tiny_config)]
    if case == "missing data":
        args += ["--data.dataset=" + str(tmp_path / "nowhere" / "*.txt")]
        expected = "matches no files"
    elif case == "empty data":
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "empty.txt").write_text("  \n")
        args += ["--data.dataset=" + str(tmp_path / "corpus")]
        expected = "no non-empty documents"
    elif case == "block size":
        args += ["--data.block_size=128"]
        expected = "data.block_size must be <= model.n_positions=64, got 128"
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
