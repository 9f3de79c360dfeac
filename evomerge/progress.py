"""Progress in log files: when stdout is not a terminal (nohup, SLURM), long loops print plain
lines at most every ``EVOMERGE_PROGRESS_S`` seconds instead of a live bar. Shared by the run's
report and the zoo builds; imports nothing heavy, so the zoo needs neither optuna nor the store.
"""

from __future__ import annotations

import os

__all__ = ["PROGRESS_ENV", "PROGRESS_S", "hms", "live_display", "progress_interval"]

#: seconds between plain progress lines when stdout is not a terminal (default 30; 0: a line
#: at every step)
PROGRESS_ENV = "EVOMERGE_PROGRESS_S"
PROGRESS_S = 30.0


def progress_interval() -> float:
    """Seconds between plain progress lines (``EVOMERGE_PROGRESS_S``, else 30)."""
    raw = os.environ.get(PROGRESS_ENV, "").strip()
    try:
        return max(float(raw), 0.0) if raw else PROGRESS_S
    except ValueError:
        raise ValueError(f"{PROGRESS_ENV}={raw!r}: expected seconds between progress lines "
                         "(a number, 0 for a line at every step)") from None


def live_display() -> bool:
    """True when stdout shows a live display (a terminal, Jupyter); False for a log file or a
    pipe (nohup, SLURM), where progress is written as plain periodic lines instead."""
    from rich.console import Console

    console = Console()
    return console.is_terminal or console.is_jupyter


def hms(seconds: float) -> str:
    """``HH:MM:SS`` of a duration (hours past 99 widen it)."""
    seconds = round(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
