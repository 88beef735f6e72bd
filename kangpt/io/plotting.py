"""Matplotlib figures for kangpt's charts, without pyplot: drawing never changes the caller's
backend (training inside a notebook keeps its inline plots) and leaves no figure registered."""

from __future__ import annotations

PLOT_HINT = "plotting needs matplotlib: pip install 'kangpt[plot]'"


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches drawn by the Agg canvas.

    Raises ``ModuleNotFoundError`` (with the install hint) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(PLOT_HINT) from err
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig
