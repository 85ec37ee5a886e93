"""Readable tables on stdout, or one JSON object as the last line of stdout with --json."""

from __future__ import annotations

import json
import math


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_num(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}g}" if abs(x) < 1e6 else f"{x:,.0f}"
    return str(x)


def print_table(title: str | None, columns: list[str], rows: list[list], caption: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, caption=caption, header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, overflow="fold", no_wrap=(i == 0))  # the first column names the row: keep it whole
    for r in rows:
        t.add_row(*[c if isinstance(c, str) else fmt_num(c) for c in r])
    console = Console()
    if not console.is_terminal:  # piped output (logs, CI) has no width: use a wide page rather than 80 columns
        console = Console(width=160)
    console.print(t)


def emit_json(obj) -> None:
    print(to_json(obj))


def to_json(obj) -> str:
    """Strict JSON text: NaN and infinities (which JSON has no words for) become null."""
    return json.dumps(json_safe(obj), default=str, allow_nan=False)


def json_safe(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
