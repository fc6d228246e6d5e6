"""Progress on stderr for the commands that take long (`build`, `eval`, `bench`).

A bar shows items done / total, elapsed time and an estimate of the time left. It is drawn
only where someone watches: stderr is a terminal, CI is not set, and the command does not
write JSON. CSCOMPILE_PROGRESS=1 forces it on anywhere (so tests can capture it),
CSCOMPILE_PROGRESS=0 turns it off.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console

FORCE_ENV = "CSCOMPILE_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def forced() -> bool | None:
    """True / False when $CSCOMPILE_PROGRESS says so, None when it leaves the choice to us."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    return True if value in _ON else False if value in _OFF else None


def enabled(json_output: bool = False) -> bool:
    """Whether progress is drawn: forced by $CSCOMPILE_PROGRESS, else only on an interactive
    stderr outside CI and not alongside JSON output."""
    force = forced()
    if force is not None:
        return force
    if json_output or os.environ.get("CI", "").strip().lower() in _ON:
        return False
    return sys.stderr.isatty()


def console() -> Console:
    if forced() and not sys.stderr.isatty():  # a file or pipe: drawn anyway, without colours
        return Console(stderr=True, force_terminal=True, color_system=None)
    return Console(stderr=True)


def _noop(n: int = 1, description: str | None = None) -> None:
    pass


@contextmanager
def bar(description: str, total: int, unit: str = "rows", show: bool = True):
    """A progress bar over `total` items; yields `advance(n=1, description=None)`.

    Nothing is drawn when `show` is False (the caller asked for quiet) or `enabled()` says no.
    The bar disappears when done on a terminal; forced into a file, its last state stays.
    """
    if not (show and enabled()):
        yield _noop
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(unit), TimeElapsedColumn(), TextColumn("left"),
                  TimeRemainingColumn(), console=console(), transient=sys.stderr.isatty(),
                  refresh_per_second=2) as progress:  # seconds resolution; little CPU (bench)
        task = progress.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            progress.update(task, advance=n,
                            **({"description": description} if description else {}))

        yield advance


@contextmanager
def status(text: str, show: bool = True):
    """A spinner with `text` for a step whose size is unknown (loading a model)."""
    if not (show and enabled()):
        yield
        return
    with console().status(text):
        yield
