"""KAN-GPT-2 against GPT-2 side by side: parameters, memory and speed measured (``models``, each
model in a fresh process: ``measure``), memory estimated without allocating (``estimate``), and the
tables and charts (``report``)."""

from .models import run_comparison

__all__ = ["run_comparison"]
