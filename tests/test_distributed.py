"""Training on several processes as launched: DDP (torchrun), FSDP2 and DeepSpeed ZeRO-2 and ZeRO-3
(``accelerate launch`` with the shipped ``configs/accelerate/*.yaml``), and the launch guards.

Every multi-process run trains the global batch of one process (``single_run``) and must match it.
accelerate forms FSDP and DeepSpeed on GPUs only; ``tests/launched_train.py`` switches its state to
them on CPU (gloo), after which ``prepare``, ``save_state``, ``load_state`` and ``get_state_dict`` are
accelerate's own. Each rank computes on one thread.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from training_runs import NO_DROPOUT, ROOT, RUN_TIMEOUT, TINY, free_port, losses, overrides, run_train
from transformers import AutoModelForCausalLM, AutoTokenizer

from kangpt.io.manifest import MANIFEST, folder_problem
from kangpt.training.optimizer import learning_rate
from kangpt.training.run_config import build_config

pytestmark = pytest.mark.slow

DRIVER = ROOT / "tests" / "launched_train.py"
# Two processes: 2 x 2 micro-batches of 2 sequences per step, the 8 sequences of the single run.
PER_PROCESS = {"train.batch_size": 2, "train.gradient_accumulation_steps": 2}
# Each run takes seconds; one still running a minute before the timeout is stuck and says where.
STUCK_AFTER = RUN_TIMEOUT - 60


@pytest.fixture(scope="module")
def single_run(env, tiny_config, tmp_path_factory) -> Path:
    """One process, 8 sequences per step, no dropout: what every multi-process run must reproduce.

    Trained once per test session: under pytest-xdist in the folder that every worker's temporary
    folder lies in, under a file lock."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if "PYTEST_XDIST_WORKER" in os.environ else shared
    out = shared / "single-run"
    with FileLock(shared / "single-run.lock"):
        if not (out / "model").is_dir():
            result = run_train(env, [str(tiny_config), *overrides(out, **NO_DROPOUT)])
            assert result.returncode == 0, result.stderr[-3000:]
    return out


def launched_env(env, dump_dir: Path, **extra) -> dict:
    """A launched run's environment: processes on CPU (gloo), the driver's dumps into ``dump_dir``."""
    return {**env, "ACCELERATE_USE_CPU": "1", "DUMP_DIR": str(dump_dir), "STUCK_AFTER": str(STUCK_AFTER),
            **extra}


def torchrun(script: Path = DRIVER) -> tuple:
    port = f"--master-port={free_port()}"
    return (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", port, str(script))


def accelerate_launch(config: str, script: Path = DRIVER) -> tuple:
    """``accelerate launch`` with a shipped config as it is, at two processes in full precision (the
    single run's; bf16 autocast runs on CPU too, and would not match it)."""
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(free_port()), str(script))


def stuck_stacks_or_end(stderr: str) -> str:
    """A failed run's stderr from the first stack dump of a stuck rank on, or its end if none was stuck."""
    start = stderr.find("Timeout (")  # faulthandler's heading
    return stderr[start:start + 12000] if start >= 0 else stderr[-3000:]


def checkpoint_files(checkpoint: Path) -> set[str]:
    return {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}


def assert_trains_as_one_process(records: dict, single_run: Path, rel=1e-4):
    """The learning rates and training and validation losses of ``records`` (``{key: {step: value}}``)
    are the single run's."""
    assert records["lr"] == losses(single_run, "lr")
    assert records["loss"] == pytest.approx(losses(single_run), rel=rel)
    assert records["val_loss"] == pytest.approx(losses(single_run, "val_loss"), rel=rel)


def assert_saves_the_model_of_one_process(out: Path, single_run: Path, atol=1e-4):
    """``model/`` holds what the single run's holds (its remote code too) and weights close to its own."""
    folder, reference = out / "model", single_run / "model"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())
    auto_map = [json.loads((f / "config.json").read_text())["auto_map"] for f in (folder, reference)]
    assert auto_map[0] == auto_map[1]
    model = AutoModelForCausalLM.from_pretrained(folder)
    expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    weights = model.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.allclose(weights[k], expected[k], atol=atol) for k in expected)
    total = sum(p.numel() for p in model.parameters())
    assert f"| total | {total:,} |" in (folder / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)


EVENTS = ("saved", "loaded")
RESUME_AT = 4


def train_then_resume(env, args: list[str], out: Path, launcher) -> dict:
    """Launch a run to its end, then again from its checkpoint at step RESUME_AT (a second launch, as a
    user resumes); return the first run's metrics records ``{key: {step: value}}``."""
    for resume in (None, out / "checkpoints" / f"step-{RESUME_AT:06d}"):
        resuming = [f"--train.resume={resume}"] if resume else []
        result = run_train(env, [*args, *resuming], launcher=launcher())
        assert result.returncode == 0, stuck_stacks_or_end(result.stderr)
        assert "2 process(es)" in result.stdout
        if resume is None:
            first = {key: losses(out, key) for key in ("lr", "loss", "val_loss")}
    assert f"resumed from {resume} at step {RESUME_AT}" in result.stdout
    return first


def assert_resumed_exactly(out: Path, dump: Path, first: dict):
    """Resumed from its checkpoint at step RESUME_AT, the run computed the same logits and losses again."""
    for rank in (0, 1):
        saved, loaded = (torch.load(dump / f"logits-{event}-{RESUME_AT}-rank{rank}.pt") for event in EVENTS)
        assert torch.equal(loaded, saved)
    assert losses(out) == first["loss"] and losses(out, "val_loss") == first["val_loss"]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(
    env, tiny_config, single_run, tmp_path
):
    out = tmp_path / "ddp"
    ddp = run_train(launched_env(env, tmp_path, DUMP_RANK_WEIGHTS="1"),
                    [str(tiny_config), *overrides(out, **NO_DROPOUT, **PER_PROCESS)], launcher=torchrun())
    assert ddp.returncode == 0, stuck_stacks_or_end(ddp.stderr)
    assert "2 process(es)" in ddp.stdout
    for checkpoint in (out / "checkpoints").iterdir():  # the main process lists the files of both
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(listed)
        assert folder_problem(checkpoint) is None
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    cfg = build_config(TINY).train
    expected_lr = [learning_rate(step, cfg) for step in range(8)]  # the schedule of 8 steps, not 16
    assert [losses(single_run, "lr")[s] for s in range(1, 9)] == pytest.approx(expected_lr)
    assert_trains_as_one_process({key: losses(out, key) for key in ("lr", "loss", "val_loss")}, single_run)
    single_weights = AutoModelForCausalLM.from_pretrained(single_run / "model").state_dict()
    assert all(torch.allclose(rank0[k], single_weights[k], atol=1e-4) for k in single_weights)


def test_a_streamed_ddp_run_resumes_each_process_where_its_stream_stopped(env, tiny_config, tmp_path):
    out = tmp_path / "streamed"
    args = [str(tiny_config), *overrides(out, **NO_DROPOUT, **PER_PROCESS, **{"data.streaming": True})]
    first = train_then_resume(launched_env(env, tmp_path), args, out, torchrun)
    assert_resumed_exactly(out, tmp_path, first)
    checkpoint = out / "checkpoints" / f"step-{RESUME_AT:06d}"
    positions = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)["positions"]
    assert len(positions) == 2 and positions[0]["documents"] != positions[1]["documents"]
    alone = run_train(env, [*args, f"--train.resume={checkpoint}"])  # one process where two trained
    assert alone.returncode == 1
    assert alone.stderr.splitlines()[-1] == (
        "error: the checkpoint holds the stream positions of 2 process(es); resume it with 2, not 1")


@pytest.mark.parametrize("caches, builders", [("own", 2), ("shared", 1)])
def test_two_machines_build_a_token_store_each_or_share_one(caches, builders, env, tiny_config, single_run,
                                                            tmp_path):
    """Two machines, simulated by two launchers of one process each (torchrun --nnodes 2): with caches of
    their own each builds its store; with one shared folder one builds it and the other waits for it."""
    out, port = tmp_path / "two-nodes", free_port()
    args = [str(tiny_config), *overrides(out, **NO_DROPOUT, **PER_PROCESS)]
    launches = []
    for node in range(2):  # output to files: a launcher blocked on a full pipe would stall the other
        cache = tmp_path / (f"cache-{node}" if caches == "own" else "cache")
        node_env = {**launched_env(env, tmp_path), "KANGPT_CACHE": str(cache)}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                    "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", str(DRIVER)]
        stdout, stderr = (open(tmp_path / f"node-{node}.{kind}", "w") for kind in ("out", "err"))
        with stdout, stderr:
            launches.append(subprocess.Popen([*launcher, *args], env=node_env, cwd=ROOT, stdout=stdout,
                                             stderr=stderr))
    codes = [launch.wait(timeout=RUN_TIMEOUT) for launch in launches]
    stdout, stderr = ("".join((tmp_path / f"node-{node}.{kind}").read_text() for node in range(2))
                      for kind in ("out", "err"))
    assert codes == [0, 0], stuck_stacks_or_end(stderr)
    said = [line for line in stdout.splitlines() if "tokenized the corpus into" in line]
    assert len(said) == builders, said
    assert_trains_as_one_process({key: losses(out, key) for key in ("lr", "loss", "val_loss")}, single_run)


def test_fsdp2_trains_as_one_process_and_resumes_from_its_shards(env, tiny_config, single_run, tmp_path):
    out = tmp_path / "fsdp"
    args = [str(tiny_config), *overrides(out, **NO_DROPOUT, **PER_PROCESS)]
    first = train_then_resume(launched_env(env, tmp_path), args, out, lambda: accelerate_launch("fsdp.yaml"))
    for checkpoint in (out / "checkpoints").iterdir():  # sharded (torch.distributed.checkpoint), no full copy
        files = checkpoint_files(checkpoint)
        assert {f"{part}/__{rank}_0.distcp" for part in ("pytorch_model_fsdp_0", "optimizer_0")
                for rank in (0, 1)} <= files
        assert not [f for f in files if f.endswith((".safetensors", ".bin"))]
        assert folder_problem(checkpoint) is None
    assert_trains_as_one_process(first, single_run)
    assert_resumed_exactly(out, tmp_path, first)
    assert_saves_the_model_of_one_process(out, single_run)


# ZeRO's reduce-scatter sums gradients in another order than one process: last-digit differences.
ZERO_TOLERANCE = 1e-4


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_as_one_process_and_resumes(stage, env, tiny_config, single_run, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'kangpt[deepspeed]')")
    out = tmp_path / f"zero{stage}"
    args = [str(tiny_config), *overrides(out, **NO_DROPOUT, **PER_PROCESS)]
    first = train_then_resume(launched_env(env, tmp_path, DS_ACCELERATOR="cpu"), args, out,
                              lambda: accelerate_launch(f"deepspeed-zero{stage}.yaml"))
    for checkpoint in (out / "checkpoints").iterdir():  # every rank's partition of the optimizer state
        files = checkpoint_files(checkpoint)
        shards = {f"pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}
        if stage == 3:  # and of the weights
            shards |= {f"pytorch_model/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)}
        assert shards <= files
        assert folder_problem(checkpoint) is None
    assert_trains_as_one_process(first, single_run, rel=ZERO_TOLERANCE)
    assert_resumed_exactly(out, tmp_path, first)
    assert_saves_the_model_of_one_process(out, single_run)


ONLY_ON_GPUS = "accelerate runs FSDP and DeepSpeed on GPUs only"
ON_CPU = (f"{ONLY_ON_GPUS}; on CPU train data parallel: "
          "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train.py ...")


def refusals(stderr: str) -> list[str]:
    """The ``error:`` lines of a run's stderr; fails on a traceback through kangpt's code."""
    assert "/kangpt/" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs this launch forms FSDP for real")
def test_an_fsdp_launch_whose_processes_form_no_group_is_refused_before_out_dir(env, tiny_config, tmp_path):
    # The config as shipped, on a machine without GPUs: the two processes form no group, each alone.
    out = tmp_path / "run"
    env = {key: value for key, value in env.items() if key != "ACCELERATE_USE_CPU"}
    result = run_train(env, [str(tiny_config), *overrides(out)],
                       launcher=accelerate_launch("fsdp.yaml", script=ROOT / "train.py"))
    assert result.returncode != 0
    expected = ("error: the launcher started 2 processes but accelerate formed a group of 1: each would "
                "train alone into the same out_dir; likely cause: FSDP asked for on a machine without GPUs "
                f"({ONLY_ON_GPUS})")
    assert refusals(result.stderr) == [expected, expected]  # one line from each process
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs this launch forms FSDP for real")
def test_fsdp_asked_of_processes_on_cpu_is_refused_not_run_as_ddp(env, tiny_config, tmp_path):
    out = tmp_path / "run"
    result = run_train({**env, "ACCELERATE_USE_CPU": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                       [str(tiny_config), *overrides(out)], launcher=torchrun(ROOT / "train.py"))
    assert result.returncode != 0
    expected = ("error: the environment asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate runs data "
                f"parallel (MULTI_CPU) on cpu; {ON_CPU}")
    assert refusals(result.stderr) == [expected, expected]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs DeepSpeed may form")
def test_deepspeed_asked_of_a_lone_process_on_cpu_is_refused(env, tiny_config, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'kangpt[deepspeed]')")
    out = tmp_path / "run"
    result = run_train({**env, "ACCELERATE_USE_DEEPSPEED": "true"}, [str(tiny_config), *overrides(out)])
    assert result.returncode == 1
    assert refusals(result.stderr) == [
        "error: the environment asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but accelerate runs "
        f"DeepSpeed on cpu without a process group (no launcher started it); {ON_CPU}"
    ]
    assert not out.exists()


def test_the_readme_command_for_cpu_trains_on_two_processes(env, tiny_config, tmp_path):
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("ACCELERATE_USE_CPU=1 torchrun"))
    variable, launcher, *args = shlex.split(line)
    assert launcher == "torchrun" and args[:3] == ["--nproc_per_node", "2", "train.py"]
    # As written, on the tiny config, on a free port, into a temporary folder.
    command = [str(Path(sys.executable).parent / "torchrun"), f"--master-port={free_port()}", *args,
               str(tiny_config), *overrides(tmp_path / "run")]
    result = run_train({**env, **dict([variable.split("=")])}, command, launcher=())
    assert result.returncode == 0, stuck_stacks_or_end(result.stderr)
    assert "2 process(es)" in result.stdout and "512 tokens per step" in result.stdout  # 2 x 8 x 32
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
