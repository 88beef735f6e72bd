"""The run folder on its own: checkpoint manifests, which checkpoint a run resumes, file modes, write errors.

Checkpoints here are small folders of made-up files with a manifest; tests/test_training.py damages
real ones and resumes from them.
"""

import errno
import os
import stat
from pathlib import Path

import pytest

from kangpt.io.folders import atomic_folder, publish
from kangpt.io.manifest import MANIFEST, folder_problem, write_manifest
from kangpt.training.run_config import ConfigError, build_config
from kangpt.training.run_dir import RunDir, writing


def make_checkpoint(folder: Path) -> Path:
    """A checkpoint-like folder: two files, one in a subfolder (as FSDP shards are), and its manifest."""
    (folder / "shards").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "shards" / "random_states_0.pkl").write_bytes(b"rng")
    write_manifest(folder)
    return folder


def make_run(path: Path, steps=(5, 10)) -> RunDir:
    """A run folder holding run.yaml of a default config and complete checkpoints at ``steps``."""
    run = RunDir(path)
    run.start(build_config({"train": {"out_dir": str(path)}}), resumed_at=None)
    for step in steps:
        make_checkpoint(run.checkpoint(step))
    return run


def plan(run: RunDir, **train):
    return run.plan(build_config({"train": {"out_dir": str(run.path), **train}}))


def test_a_manifest_lists_every_file_and_finds_each_kind_of_damage(tmp_path):
    folder = make_checkpoint(tmp_path / "step-000005")
    assert folder_problem(folder) is None
    weights = folder / "model.safetensors"
    weights.write_bytes(b"weights" * 50)  # truncated
    assert folder_problem(folder) == "model.safetensors has 350 bytes, its manifest says 700"
    weights.write_bytes(b"Weights" + b"weights" * 99)  # same size, other bytes
    assert folder_problem(folder) == "model.safetensors differs from its manifest (sha256)"
    weights.write_bytes(b"weights" * 100)
    (folder / "shards" / "random_states_0.pkl").unlink()
    assert folder_problem(folder) == "shards/random_states_0.pkl is missing"
    (folder / MANIFEST).write_text("{not json")
    assert folder_problem(folder) == "its manifest.json is unreadable"
    (folder / MANIFEST).unlink()
    assert folder_problem(folder) == "it has no manifest.json, so it was never completed"


def test_resume_auto_takes_the_newest_checkpoint_that_verifies_and_says_what_it_skipped(tmp_path):
    run = make_run(tmp_path / "run")
    assert plan(run, resume="auto") == run.checkpoint(10) and run.notes == []
    (run.checkpoint(10) / "model.safetensors").write_bytes(b"")
    assert plan(run, resume="auto") == run.checkpoint(5)
    assert run.notes == [f"skipped damaged checkpoint {str(run.checkpoint(10))!r}: "
                         "model.safetensors has 0 bytes, its manifest says 700"]
    (run.checkpoint(5) / MANIFEST).unlink()
    with pytest.raises(ConfigError) as err:
        plan(run, resume="auto")
    assert str(err.value) == (
        f"out_dir {str(run.path)!r} holds no complete checkpoint to resume (step-000010: model.safetensors "
        "has 0 bytes, its manifest says 700); replace the run with --train.overwrite=true"
    )


def test_an_explicit_checkpoint_that_does_not_verify_is_refused_by_file(tmp_path):
    run = make_run(tmp_path / "run")
    assert plan(run, resume=str(run.checkpoint(5))) == run.checkpoint(5)
    (run.checkpoint(5) / "shards" / "random_states_0.pkl").unlink()
    with pytest.raises(ConfigError) as err:
        plan(run, resume=str(run.checkpoint(5)))
    assert str(err.value) == (
        f"train.resume: checkpoint {str(run.checkpoint(5))!r} cannot be resumed: "
        "shards/random_states_0.pkl is missing"
    )


def test_resume_auto_starts_from_step_0_only_where_nothing_is_lost(tmp_path):
    fresh = RunDir(tmp_path / "new")
    assert plan(fresh, resume="auto") is None
    assert fresh.notes == [f"no checkpoint to resume in out_dir {str(fresh.path)!r}: starting from step 0"]
    died_early = make_run(tmp_path / "died", steps=())  # run.yaml, but no checkpoint yet
    assert plan(died_early, resume="auto") is None
    assert died_early.notes == [
        f"no checkpoint to resume in out_dir {str(died_early.path)!r}: starting from step 0"
    ]
    finished = make_run(tmp_path / "finished", steps=())
    finished.model.mkdir()
    with pytest.raises(ConfigError) as err:
        plan(finished, resume="auto")
    assert str(err.value) == (
        f"out_dir {str(finished.path)!r} holds a finished model but no checkpoint to resume; "
        "replace it with --train.overwrite=true"
    )
    assert plan(finished, overwrite=True) is None  # replacing it is still possible, when asked for


def test_publish_gives_files_and_folders_the_modes_the_umask_allows(tmp_path):
    tmp = tmp_path / ".tmp-model"
    (tmp / "sub").mkdir(parents=True)
    for name, mode in (("model.safetensors", 0o600), ("config.json", 0o644), ("sub/x.bin", 0o666)):
        (tmp / name).write_text(name)
        (tmp / name).chmod(mode)
    tmp.chmod(0o700)
    umask = os.umask(0o027)
    try:
        publish(tmp, tmp_path / "model")
    finally:
        os.umask(umask)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "model", *(tmp_path / "model").rglob("*")]}
    assert modes == {"model": 0o750, "model/sub": 0o750, "model/model.safetensors": 0o640,
                     "model/config.json": 0o640, "model/sub/x.bin": 0o640}
    assert not tmp.exists()


def test_an_atomic_folder_replaces_the_old_one_whole_or_leaves_it_as_it_was(tmp_path):
    path = tmp_path / "out" / "report"
    with atomic_folder(path) as tmp:
        (tmp / "a.json").write_text("old")
    with pytest.raises(RuntimeError, match="stopped"), atomic_folder(path) as tmp:
        (tmp / "a.json").write_text("half")
        raise RuntimeError("stopped")
    assert {p.name: p.read_text() for p in path.iterdir()} == {"a.json": "old"}
    (tmp_path / "out" / ".tmp-report").mkdir()  # left by a writer that died
    (tmp_path / "out" / ".tmp-report" / "stale").write_text("x")
    with atomic_folder(path) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "b.json").write_text("new")
    assert {p.name: p.read_text() for p in path.iterdir()} == {"b.json": "new"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report"]


def test_shared_atomic_folders_of_one_path_each_write_their_own_and_readers_always_find_it(tmp_path):
    path = tmp_path / "cache" / "entry"
    with atomic_folder(path, shared=True) as first:
        with atomic_folder(path, shared=True) as second:  # another process, at the same time
            assert first != second
            for name in ("config.json", "tokenizer.json"):
                (second / name).write_text("second")
        for name in ("config.json", "tokenizer.json"):
            (first / name).write_text("first")
        inode = path.stat().st_ino  # the second writer's entry, which readers may be loading
    assert path.stat().st_ino == inode  # never moved away: its files were replaced one by one
    contents = {p.name: p.read_text() for p in path.iterdir()}
    assert contents == {"config.json": "first", "tokenizer.json": "first"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry"]


def test_an_os_error_while_writing_becomes_one_line_naming_the_file(tmp_path):
    shard = tmp_path / "checkpoints" / "x.bin"
    with pytest.raises(ConfigError) as err, writing(tmp_path / "checkpoints"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(shard))
    assert str(err.value) == f"cannot write {str(shard)!r}: No space left on device"
    with pytest.raises(ConfigError) as err, writing(tmp_path / "metrics.jsonl"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # a failed write() names no file
    assert str(err.value) == f"cannot write {str(tmp_path / 'metrics.jsonl')!r}: Input/output error"
