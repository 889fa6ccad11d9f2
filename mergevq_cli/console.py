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
    if not is_main_process():
        return
    from rich.markup import escape

    # the message may hold brackets (paths, C++ source locations in torch errors): never read them as markup
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, markup=True)
    if hint:
        err.print(f"[dim]{escape(hint)}[/]", soft_wrap=True)


def warning(message: str) -> None:
    """One line on stderr (stdout stays clean for --json)."""
    if not is_main_process():
        return
    from rich.markup import escape

    err.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True, markup=True)


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


def is_main_process() -> bool:
    """Under torchrun only rank 0 talks."""
    import os

    return os.environ.get("RANK", "0") == "0"


class TrainProgress:
    """A rich progress bar for a training loop: step, ETA, throughput and the latest loss terms."""

    def __init__(self, unit: str = "img/s", terms: tuple[str, ...] = ("total", "recon")) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.unit, self.terms = unit, terms
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[info]}"),
            console=out, transient=False, disable=not is_main_process(),
        )
        self.task = None
        self.rate = ""

    def start(self, description: str, total: int, completed: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=completed, rate="", info="")

    def step(self, step: int, terms: dict[str, float]) -> None:
        info = "  ".join(f"{k} {terms[k]:.4f}" for k in self.terms if k in terms)
        if "tokens" in terms:
            info += f"  K {int(terms['tokens'])}"
        self.progress.update(self.task, completed=step, info=info, rate=self.rate)

    def throughput(self, value: float) -> None:
        self.rate = f"{value:,.1f} {self.unit}"

    def note(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)

    def stop(self) -> None:
        self.progress.stop()


class BarProgress:
    """A `mergevq_core.progress.Progress` drawn as a rich bar: one bar per stage, `rate_key` of `advance` fields
    shown as throughput in `unit`, `terms` (loss names) shown after it, notes printed above the bar. Silent with
    `quiet` (--json) and on ranks other than 0."""

    def __init__(self, unit: str = "img/s", terms: tuple[str, ...] = (), quiet: bool = False) -> None:
        self.unit, self.terms, self.quiet = unit, terms, quiet
        self.bar: TrainProgress | None = None

    def start(self, stage: str, total: int, done: int = 0, **info: Any) -> None:
        if self.quiet:
            return
        self.stop()
        self.bar = TrainProgress(self.unit, self.terms)
        self.bar.start(stage, total, done)

    def advance(self, n: int = 1, **fields: Any) -> None:
        bar = self.bar
        if bar is None or bar.task is None:
            return
        if fields.get("rate") is not None:
            bar.throughput(float(fields["rate"]))
        if "step" in fields:
            bar.step(int(fields["step"]), fields)
        else:
            bar.progress.update(bar.task, advance=n, rate=bar.rate)

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.note(message)
        elif is_main_process():
            out.print(message, highlight=False)

    def log(self, row: dict[str, Any]) -> None:
        """Training rows: the throughput of a log interval updates the bar."""
        for key in ("img_per_s", "tok_per_s"):
            if self.bar is not None and key in row:
                self.bar.throughput(float(row[key]))

    def stop(self) -> None:
        if self.bar is not None and self.bar.task is not None:
            self.bar.stop()
        self.bar = None

    def __enter__(self) -> "BarProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class DemoBar:
    """`mergevq demo`'s progress: one bar over all steps, weighted by their expected time, with one overall ETA;
    a line per finished step above it."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.quiet = quiet
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=out,
                                 disable=quiet or not is_main_process())
        self.task = None
        self.base = 0.0
        self.weight = 0.0

    def begin(self, total_s: float, done_s: float) -> None:
        self.progress.start()
        self.task = self.progress.add_task("demo", total=total_s, completed=done_s)
        self.base = done_s

    def step(self, step: Any) -> None:
        self.weight = step.estimate_s
        self.progress.update(self.task, description=step.title, completed=self.base)

    def fraction(self, f: float) -> None:
        self.progress.update(self.task, completed=self.base + f * self.weight)

    def done(self, step: Any, wall_s: float, skipped: bool) -> None:
        if not skipped:
            self.base += step.estimate_s
            self.progress.update(self.task, completed=self.base)
        if not self.quiet:
            self.progress.console.print(f"{'[dim]done before[/]' if skipped else '[green]done[/]'}  {step.title} "
                                        f"({wall_s:.0f} s)", highlight=False)

    def end(self) -> None:
        self.progress.stop()
