"""What the end-to-end training tests share: the tiny run config, its overrides, running ``train.py``
(or a launcher) and reading a run's metrics."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2,
              "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
    "data": {"dataset": "stdlib", "max_documents": 40, "val_fraction": 0.1, "test_fraction": 0.1,
             "vocab_size": 512, "block_size": 32},
    "train": {"max_steps": 8, "batch_size": 8, "learning_rate": 3e-3, "min_learning_rate": 3e-4,
              "warmup_steps": 2, "eval_interval": 4, "eval_blocks": 48, "log_interval": 1, "save_interval": 4,
              "trackers": [], "sample_prompt": "def ", "sample_tokens": 8},
}
NO_DROPOUT = {"model.resid_pdrop": 0.0, "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0}
RUN_TIMEOUT = 300  # seconds; a tiny run takes a few
# Runs a Python command under a file-size limit (EFBIG), which stops a write as a full disk (ENOSPC) does.
FILE_SIZE_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
limit = int(os.environ["FILE_SIZE_LIMIT"])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def overrides(out_dir, **values) -> list[str]:
    values = {"train.out_dir": str(out_dir), **values}
    return [
        f"--{key}={json.dumps(value) if not isinstance(value, str) else value}"
        for key, value in values.items()
    ]


def run_train(env, args, launcher=(sys.executable, str(ROOT / "train.py"))) -> subprocess.CompletedProcess:
    """Run ``train.py`` (or ``launcher``) on ``args``; past RUN_TIMEOUT, fail with the end of its output."""
    try:
        return subprocess.run(
            [*launcher, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired as err:  # its output is bytes (or None), even with text=True
        ends = [out.decode(errors="replace")[-4000:] if out else "" for out in (err.stdout, err.stderr)]
        pytest.fail(f"still running after {RUN_TIMEOUT} s: {err.cmd}\n--- stdout (end)\n{ends[0]}"
                    f"\n--- stderr (end)\n{ends[1]}")


def losses(out_dir: Path, key: str = "loss", metrics: str = "metrics.jsonl") -> dict[int, float]:
    """``{step: value}`` of one metric in a run's metrics.jsonl (or another file of such records)."""
    records = [json.loads(line) for line in (Path(out_dir) / metrics).read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
