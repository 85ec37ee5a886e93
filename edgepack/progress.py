"""Progress for long work: a rich bar on an interactive terminal, a few plain lines on stderr otherwise (CI logs)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

PLAIN_EVERY_S = 15.0  # without a terminal: the longest silence between progress lines


@contextmanager
def progress(description: str, total: int | None = None, enabled: bool = True):
    """Yields update(done, total=None). Renders to stderr so stdout stays clean for tables and --json."""
    if not enabled or not is_rank_zero():
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
    t0 = time.perf_counter()
    state = {"next": 0.25, "last": t0}
    print(f"  {description}: started" + (f" (0/{total})" if total else ""), file=sys.stderr, flush=True)

    def update(done, new_total=None):
        tot = new_total or total
        now = time.perf_counter()
        # a line at every quarter, and at least every PLAIN_EVERY_S seconds, so a slow step never looks hung
        if tot and (done / tot >= state["next"] or now - state["last"] >= PLAIN_EVERY_S):
            print(f"  {description}: {done}/{tot} ({now - t0:.0f} s)", file=sys.stderr, flush=True)
            state["last"] = now
            while state["next"] <= done / tot:
                state["next"] += 0.25

    yield update


def is_rank_zero() -> bool:
    """False in the other processes of a torchrun / accelerate launch (RANK > 0): only rank 0 shows progress."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def _console():
    from rich.console import Console

    return Console(stderr=True)
