"""What every command shares: the consoles it prints to, its progress bars, and how it reports
a failure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


def progress_bar(on: Console = console, *, transient: bool = False) -> Progress:
    """A progress display whose bars read: what, bar, done/total, time so far."""
    return Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=on, transient=transient)


def track(items: Iterable[T], description: str, *, on: Console = console,
          transient: bool = False) -> Iterator[T]:
    """``items``, with a bar of its own shown while they are consumed (a library loop's
    ``track`` hook; the bar is gone before the next one starts)."""
    items = list(items)
    with progress_bar(on, transient=transient) as bar:
        yield from bar.track(items, total=len(items), description=description)


def fail(exc: BaseException, code: int = 2) -> NoReturn:
    """Print ``exc`` as one ``error:`` line on stderr and exit with ``code`` (2: bad input,
    1: the run itself failed), without a traceback: the message says what to fix."""
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code)
