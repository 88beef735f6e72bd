"""The run folder (``train.out_dir``): how a run starts in it, and how its files are written atomically.

::

    out_dir/
      run.yaml                 the resolved run config; a later run must match it to resume
      metrics.jsonl            one JSON record per logged or evaluated step
      trained_on.json          the tokenizer's sha256 and the local corpus files with their sizes
      logs/                    tracker logs (tensorboard, ...)
      checkpoints/step-000500  accelerate ``save_state`` folders, written as .tmp-* and renamed when whole;
                               manifest.json, written last, lists the size and sha256 of every file
      model/                   the final model (``from_pretrained`` loads it), also written and renamed
      .lock                    locked (an OS lock) by the process training here; names it (pid, host)

Only names matching ``step-<digits>`` count as checkpoints, so a half-written one is never the latest,
and one resumes only when every file its manifest lists is there, unchanged. One process at a time
trains in a folder: the lock is the kernel's (``flock``), so it goes with the process, crash or not.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from safetensors import SafetensorError

from ..io.folders import remove, write_text_atomically
from ..io.manifest import folder_problem
from ..messages import first_line
from .run_config import ConfigError, RunConfig

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
TRAINED_ON = "trained_on.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
MODEL = "model"
LOCK = ".lock"
# What a run writes into out_dir; --train.overwrite=true removes these and nothing else.
RUN_ENTRIES = (RUN_FILE, METRICS_FILE, TRAINED_ON, CHECKPOINTS, LOGS, MODEL)
# Keys that may differ between a run and its resumption: they do not change what is computed.
RESUMABLE_TRAIN_KEYS = {"out_dir", "resume", "overwrite", "max_steps", "eval_interval", "log_interval",
                        "save_interval", "keep_checkpoints", "trackers", "sample_prompt", "sample_tokens"}
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint folder (``step-N``) was saved at."""
    return int(_CHECKPOINT_NAME.match(Path(checkpoint).name).group(1))


class RunDir:
    """Paths of a run folder, the start-up decision, checkpoint discovery and atomic writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.metrics = self.path / METRICS_FILE
        self.logs = self.path / LOGS
        self.model = self.path / MODEL
        self.notes: list[str] = []  # what plan() decided that the run should print
        self._lock: int | None = None  # the file descriptor holding the folder's lock

    def plan(self, config: RunConfig) -> Path | None:
        """Decide how ``config`` starts here: return the checkpoint to resume from, or None for a fresh start.

        Reads only. Raises ConfigError when out_dir cannot be written, holds files of something else,
        a different run (unless ``train.overwrite``), a run that was not asked to be resumed, or nothing
        to resume that a fresh start would not destroy. Lines the run should print about the decision
        (a damaged checkpoint skipped, a start from step 0) are left in ``self.notes``.
        """
        train = config.train
        self.notes = []
        if train.resume is not None and train.overwrite:
            raise ConfigError(
                "train.resume and train.overwrite exclude each other: continue a run or replace it"
            )
        self._check_writable()
        saved = self._saved_config()
        if saved is None and any(p.name != LOCK for p in _children(self.path)):
            raise ConfigError(
                f"out_dir {str(self.path)!r} is not empty and holds no kangpt run; choose another folder"
            )
        if saved is not None and not train.overwrite:
            difference = _first_difference(saved, config.to_dict())
            latest = self.latest_checkpoint()
            if difference:
                raise ConfigError(
                    f"out_dir {str(self.path)!r} holds a different run ({difference}); "
                    "choose another folder or replace it with --train.overwrite=true"
                )
            if train.resume is None:
                at = f" (latest checkpoint: {latest.name})" if latest else ""
                raise ConfigError(
                    f"out_dir {str(self.path)!r} already holds this run{at}; continue it with "
                    "--train.resume=auto or replace it with --train.overwrite=true"
                )
        if train.resume is None or train.overwrite:
            return None
        if train.resume == "auto":
            return self._resume_point()
        checkpoint = Path(train.resume)
        if not (checkpoint.is_dir() and _CHECKPOINT_NAME.match(checkpoint.name)):
            raise ConfigError(
                f"train.resume: {train.resume!r} is not a checkpoint folder (checkpoints/step-N)"
            )
        problem = folder_problem(checkpoint)
        if problem:
            raise ConfigError(f"train.resume: checkpoint {train.resume!r} cannot be resumed: {problem}")
        return checkpoint

    def _check_writable(self) -> None:
        """Refuse an out_dir that is a file, lies under one, or cannot be written, before anything is loaded.

        Where the folder exists, the entries a run writes into in place (checkpoints/, logs/, metrics.jsonl)
        must be writable too. ``os.access`` asks the kernel, so read-only file systems are refused as well.
        """
        where = f"out_dir {str(self.path)!r}"
        folder = self.path
        while not os.path.lexists(folder):  # the nearest existing folder, which mkdir creates it in
            folder = folder.parent
        if not folder.is_dir():
            kind = "a file, not a folder" if folder.is_file() else "not a folder"
            if folder == self.path:
                raise ConfigError(f"{where} is {kind}; choose another path")
            raise ConfigError(f"{where} cannot be created: {str(folder)!r} is {kind}")
        inside = [p for p in (self.checkpoints, self.logs, self.metrics) if p.exists()]
        for target in [folder, *(inside if folder == self.path else [])]:
            search = os.X_OK if target.is_dir() else 0
            for mode, able in ((os.R_OK | search, "readable"), (os.W_OK | search, "writable")):
                if os.access(target, mode):
                    continue
                if target == self.path:
                    raise ConfigError(f"{where} is not {able}; choose another folder")
                verb = "cannot be written" if folder == self.path else "cannot be created"
                raise ConfigError(f"{where} {verb}: {str(target)!r} is not {able}; choose another folder")

    def _resume_point(self) -> Path | None:
        """For ``resume=auto``: the newest checkpoint that verifies, or None to start from step 0.

        Damaged checkpoints skipped are noted; starting over is refused where it would replace a finished
        model or checkpoints that are all damaged (--train.overwrite=true says so explicitly).
        """
        skipped = []
        for checkpoint in reversed(self._checkpoints()):
            problem = folder_problem(checkpoint)
            if problem is None:
                self.notes += [f"skipped damaged checkpoint {str(c)!r}: {p}" for c, p in skipped]
                return checkpoint
            skipped.append((checkpoint, problem))
        where = f"out_dir {str(self.path)!r}"
        damage = f" ({skipped[0][0].name}: {skipped[0][1]})" if skipped else ""
        if self.model.is_dir():
            complete = "complete " if skipped else ""
            raise ConfigError(f"{where} holds a finished model but no {complete}checkpoint to resume"
                              f"{damage}; replace it with --train.overwrite=true")
        if skipped:
            raise ConfigError(f"{where} holds no complete checkpoint to resume{damage}; "
                              "replace the run with --train.overwrite=true")
        self.notes.append(f"no checkpoint to resume in {where}: starting from step 0")
        return None

    def lock(self) -> None:
        """Hold the folder's lock until :meth:`unlock` (or this process ends), creating the folder.

        Raises ConfigError naming the process that holds it: two runs in one folder would interleave
        their metrics and checkpoints.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"out_dir {str(self.path)!r} is in use by another run ({holder}); wait for it "
                              "to end or choose another folder") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
        self._lock = fd

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (nothing if none is held)."""
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def start(self, config: RunConfig, resumed_at: int | None, trained_on: dict | None = None) -> None:
        """Write run.yaml, once the run has loaded its data and built its model (main process).

        A fresh start (``resumed_at`` None) first removes what an earlier run wrote here (:meth:`plan`
        made sure that is wanted) and records ``trained_on`` where given (see :meth:`check_trained_on`); a
        resumed run drops the metrics records after step ``resumed_at``, which the checkpoint lacks.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if resumed_at is None:
            for name in RUN_ENTRIES:
                remove(self.path / name)
        else:
            records = [r for r in read_metrics(self.metrics) if r["step"] <= resumed_at]
            write_text_atomically(self.metrics, "".join(json.dumps(r) + "\n" for r in records))
        write_text_atomically(self.path / RUN_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
        if resumed_at is None and trained_on is not None:  # after run.yaml: the folder is a run's first
            write_text_atomically(self.path / TRAINED_ON, json.dumps(trained_on, indent=1) + "\n")

    def check_trained_on(self, now: dict) -> None:
        """Refuse to resume on other data than the run started with: ``now`` (the tokenizer's sha256 and
        the local corpus files, as :meth:`start` records them) must equal the record, naming what changed.

        A changed corpus folder retrains the BPE: the checkpoint's embeddings would meet other tokens.
        A run recorded before the record existed is not checked.
        """
        path = self.path / TRAINED_ON
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        old, new = saved["corpus"], now["corpus"]
        changes = [change for key in sorted(set(old) | set(new))
                   for change in _file_changes(f"data.{key}", old.get(key), new.get(key))]
        if saved["tokenizer_sha256"] != now["tokenizer_sha256"]:
            changes.append(f"the tokenizer (sha256 {saved['tokenizer_sha256'][:12]} -> "
                           f"{now['tokenizer_sha256'][:12]})")
        if changes:
            raise ConfigError(f"out_dir {str(self.path)!r} cannot be resumed on other data than it started "
                              f"with: {'; '.join(changes)}; restore them, or start a new run (another "
                              "out_dir or --train.overwrite=true)")

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint folder with the highest step, or None (whole or not: see ``folder_problem``)."""
        checkpoints = self._checkpoints()
        return checkpoints[-1] if checkpoints else None

    def checkpoint(self, step: int) -> Path:
        """Folder of the checkpoint at ``step``."""
        return self.checkpoints / f"step-{step:06d}"

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the ``keep`` newest checkpoints."""
        for path in self._checkpoints()[:-keep]:
            shutil.rmtree(path)

    def _checkpoints(self) -> list[Path]:
        """Checkpoint folders (``step-N``; never the ``.tmp-`` ones being written), oldest first."""
        found = [(int(m.group(1)), p) for p in _children(self.checkpoints)
                 if (m := _CHECKPOINT_NAME.match(p.name))]
        return [path for _, path in sorted(found)]

    def _saved_config(self) -> dict | None:
        path = self.path / RUN_FILE
        if not path.is_file():
            return None
        try:
            saved = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{str(path)!r} is not valid YAML; remove the folder or choose another"
            ) from err
        return saved if isinstance(saved, dict) else {}


@contextmanager
def writing(what: Path) -> Iterator[None]:
    """Turn a failed write into ``what`` (disk full, permissions changed) into one ConfigError line.

    Python, safetensors and ``torch.save`` each report it their own way: an OSError, a SafetensorError
    holding the OS error, a RuntimeError of torch's file writer holding none. Checkpoints and the model
    folder are renamed into place only when whole, so what is left is complete.
    """
    try:
        yield
    except OSError as err:
        name = err.filename if err.filename is not None else what
        raise ConfigError(f"cannot write {str(name)!r}: {err.strerror or err}") from err
    except SafetensorError as err:
        raise ConfigError(f"cannot write {str(what)!r}: {first_line(err)}") from err
    except RuntimeError as err:
        if "inline_container" not in str(err):  # not torch.save's writer: not a failed write
            raise
        raise ConfigError(f"cannot write {str(what)!r}: torch.save stopped short ({first_line(err)}); "
                          f"{_free_space(what)}") from err


def _free_space(path: Path) -> str:
    """How much room the disk of ``path`` has left, in words."""
    while not path.exists():
        path = path.parent
    return f"{shutil.disk_usage(path).free / 2**20:,.1f} MiB free on its disk"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (an empty list if there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _file_changes(what: str, old: dict | None, new: dict | None, shown: int = 3) -> list[str]:
    """The files added to, removed from or resized in a corpus (``{name: size}``, None: not local)."""
    old, new = old or {}, new or {}
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    resized = [f"{name} {old[name]} -> {new[name]} bytes" for name in sorted(set(old) & set(new))
               if old[name] != new[name]]
    changes = []
    for kind, names in (("added", added), ("removed", removed), ("resized", resized)):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            changes.append(f"{what}: {kind} {', '.join(names[:shown])}{more}")
    return changes


def _first_difference(saved: dict, current: dict) -> str | None:
    """``"section.key: old -> new"`` for the first setting that makes ``current`` a different run."""
    for section in ("model", "data", "train"):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in RESUMABLE_TRAIN_KEYS:
                continue
            if old.get(key) != new.get(key):
                return f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None
