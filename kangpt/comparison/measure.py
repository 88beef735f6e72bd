"""Measuring models: bytes saved for backward, training-state bytes, peak memory, interleaved timing.

Shared by ``eval/compare.py`` (``kangpt compare``), ``eval/quality.py`` and ``eval/bench_kan.py``, so
that every table of the project measures the same way:

- **bytes saved for backward**: every tensor autograd keeps, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, parameters excluded;
- **training state**: parameters, gradients and optimizer state, counted from the tensors themselves;
- **peak memory** of a piece of code: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak
  resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) of a process started with
  :data:`MALLOC_ENV`, so that glibc returns freed blocks to the system at once and the figure
  follows what tensors really hold;
- **time**: median over repeats interleaved across the compared models, so drift in machine load
  hits every model alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Environment of a child process whose peak RSS is measured: blocks of 64 KiB and more are mmap'ed
# (returned to the system when freed) and the heap is trimmed at every free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

MiB = 2**20


def autocast(device: torch.device | str, dtype: torch.dtype):
    """``torch.autocast`` to ``dtype`` on ``device`` (disabled for fp32): mixed precision as in training."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); nothing to do on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr())


class SavedTensorBytes:
    """Count the bytes autograd saves for backward inside ``with`` (each storage once).

    ``exclude`` holds tensors not to count (the model's parameters: they exist anyway)::

        with SavedTensorBytes(model.parameters()) as saved:
            loss = model(x).sum()
        saved.bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._excluded:
            self._seen[key] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes of parameters, gradients and optimizer state, counted from the tensors (each storage once).

    Call it after a step whose gradients are still there (before ``zero_grad``).
    """
    seen: set = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and _storage_key(t) not in seen:
                seen.add(_storage_key(t))
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    parts = {
        "parameters": count(params),
        "gradients": count(p.grad for p in params if p.grad is not None),
        "optimizer": count(
            v for state in (optimizer.state.values() if optimizer else ()) for v in state.values()
        ),
    }
    parts["total"] = sum(parts.values())
    return parts


def adamw_state_bytes_per_parameter(param_dtype: torch.dtype = torch.float32) -> int:
    """Computed bytes per parameter of weights + gradients + AdamW's two moments, all in ``param_dtype``
    (16 in fp32). AdamW's per-tensor ``step`` counters (4 bytes each) come on top."""
    return 4 * torch.empty((), dtype=param_dtype).element_size()


# ----------------------------------------------------------------------------------------------
# Peak memory


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``; unlike ``ru_maxrss`` not inherited across exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory of the code inside ``with`` on ``device``.

    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (bytes held by
    tensors, everything allocated counts, including what existed before). On CPU: this process's peak
    RSS (run it in a process started with :data:`MALLOC_ENV`). ``before`` is what was held on entry
    (allocated bytes, or RSS), ``peak`` the absolute peak, ``growth`` their difference.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.before = self.peak = 0

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.before = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes()

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


def run_fresh_process(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    peak_rss: bool = False,
    log: Path | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> str:
    """Run ``python ARGS...`` in a fresh process and return its stdout: the one way every benchmark
    starts a child (a training run, a model measured alone, a step of the GPU check).

    ``env`` adds environment variables; with ``peak_rss`` the child starts with :data:`MALLOC_ENV`
    (for a child whose peak RSS is measured); with ``log`` its stdout and stderr go to that file as
    they come (a run that is killed leaves its log) and ``""`` is returned. Raises ``RuntimeError``
    naming the command, with the end of its stderr (or of the log), if it fails.
    """
    env = {**os.environ, **(MALLOC_ENV if peak_rss else {}), **(env or {})}
    command = [sys.executable, *args]
    if log is None:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        output, errors = done.stdout, done.stderr
    else:
        with open(log, "w") as out:
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout
            )
        output, errors = "", Path(log).read_text(errors="replace")
    if done.returncode != 0:
        tail = "\n".join(errors.strip().splitlines()[-15:])
        what = f"`python {' '.join(map(str, args))}`"
        raise RuntimeError(f"{what} failed (exit code {done.returncode}):\n{tail}")
    return output


# ----------------------------------------------------------------------------------------------
# Time


def interleaved_median_times(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device | str,
    warmup: int = 1,
) -> dict[str, float]:
    """Median wall time (seconds) of each callable, repeats interleaved across them.

    Every callable first runs ``warmup`` times untimed; then each round runs each callable once, so
    a change in machine load during the measurement shifts every entry alike.
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


__all__ = [
    "DTYPES",
    "MALLOC_ENV",
    "MiB",
    "PeakMemory",
    "SavedTensorBytes",
    "adamw_state_bytes_per_parameter",
    "autocast",
    "interleaved_median_times",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
    "run_fresh_process",
    "sync",
    "training_state_bytes",
]
