"""The run folder (``train.out_dir``): how a run starts in it, and how its files are written atomically.

::

    out_dir/
      run.yaml                 the resolved run config; a later run must match it to resume
      metrics.jsonl            one JSON record per logged or evaluated step
      logs/                    tracker logs (tensorboard, ...)
      checkpoints/step-000500  accelerate ``save_state`` folders, written as .tmp-* and renamed when whole
      model/                   the final model (``from_pretrained`` loads it), also written and renamed

Only names matching ``step-<digits>`` count as checkpoints, so a half-written one is never the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from .config import ConfigError, RunConfig

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
MODEL = "model"
# What a run writes into out_dir; --train.overwrite=true removes these and nothing else.
RUN_ENTRIES = (RUN_FILE, METRICS_FILE, CHECKPOINTS, LOGS, MODEL)
# Keys that may differ between a run and its resumption: they do not change what is computed.
RESUMABLE_TRAIN_KEYS = {"out_dir", "resume", "overwrite", "max_steps", "eval_interval", "log_interval",
                        "save_interval", "keep_checkpoints", "trackers", "sample_prompt", "sample_tokens"}
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


class RunDir:
    """Paths of a run folder, the start-up decision, checkpoint discovery and atomic writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.metrics = self.path / METRICS_FILE
        self.logs = self.path / LOGS
        self.model = self.path / MODEL

    def plan(self, config: RunConfig) -> Path | None:
        """Decide how ``config`` starts here: return the checkpoint to resume from, or None for a fresh start.

        Reads only. Raises ConfigError when the folder holds files of something else, or a different
        run (unless ``train.overwrite``), or a run that was not asked to be resumed.
        """
        train = config.train
        if train.resume is not None and train.overwrite:
            raise ConfigError(
                "train.resume and train.overwrite exclude each other: continue a run or replace it"
            )
        saved = self._saved_config()
        if saved is None and self.path.is_dir() and any(self.path.iterdir()):
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
            return self.latest_checkpoint() if saved is not None else None
        checkpoint = Path(train.resume)
        if not (checkpoint.is_dir() and _CHECKPOINT_NAME.match(checkpoint.name)):
            raise ConfigError(
                f"train.resume: {train.resume!r} is not a checkpoint folder (checkpoints/step-N)"
            )
        return checkpoint

    def start(self, config: RunConfig, resumed_at: int | None) -> None:
        """Write run.yaml, once the run has loaded its data and built its model (main process).

        A fresh start (``resumed_at`` None) first removes what an earlier run wrote here (:meth:`plan`
        made sure that is wanted); a resumed run drops the metrics records after step ``resumed_at``,
        which the checkpoint does not contain.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if resumed_at is None:
            for name in RUN_ENTRIES:
                remove(self.path / name)
        else:
            records = [r for r in read_metrics(self.metrics) if r["step"] <= resumed_at]
            write_text_atomically(self.metrics, "".join(json.dumps(r) + "\n" for r in records))
        write_text_atomically(self.path / RUN_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
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
        """Complete checkpoints (``step-N`` folders), oldest first."""
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


def temporary_name(path: Path) -> Path:
    """The name under which ``path`` is written before it is renamed: ``.tmp-<name>``, never taken for it."""
    return path.with_name(f".tmp-{path.name}")


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an older ``path`` is moved aside, then deleted."""
    old = path.with_name(f".old-{path.name}")
    remove(old)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    remove(old)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = temporary_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (an empty list if there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


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
