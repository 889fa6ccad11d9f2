"""All terminal output goes through here (the only module that imports rich)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True)
    if hint:
        err.print(f"[dim]{hint}[/]", soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(x) for x in row])
    out.print(t)


def kv(title: str, pairs: list[tuple[str, Any]]) -> None:
    t = Table(title=title, title_justify="left", show_header=False, show_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in pairs:
        t.add_row(k, str(v))
    out.print(t)
