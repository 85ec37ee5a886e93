"""Progress for long work: a rich bar on an interactive terminal, a few plain lines on stderr otherwise (CI logs)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: int | None = None, enabled: bool = True):
    """Yields update(done, total=None). Renders to stderr so stdout stays clean for tables and --json."""
    if not enabled:
        yield lambda done, total=None: None
        return
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), transient=True, console=_console()) as bar:
            task = bar.add_task(description, total=total)

            def update(done, new_total=None):
                bar.update(task, completed=done, total=new_total if new_total is not None else bar.tasks[0].total)

            yield update
        return
    state = {"next": 0.25, "t0": time.perf_counter()}

    def update(done, new_total=None):
        tot = new_total or total
        if tot and done / tot >= state["next"]:
            print(f"  {description}: {done}/{tot} ({time.perf_counter() - state['t0']:.0f} s)", file=sys.stderr, flush=True)
            while state["next"] <= done / tot:
                state["next"] += 0.25

    yield update


def _console():
    from rich.console import Console

    return Console(stderr=True)
