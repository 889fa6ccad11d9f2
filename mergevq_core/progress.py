"""The one way a long job reports what it is doing. The core never prints: it calls a `Progress`, and a front end
(the CLI's progress bar) decides what a person sees. The default does nothing.

A job calls `start(stage, total, done, **info)` when a stage begins (`info` says what runs: checkpoint, device,
sizes), `advance(n, **fields)` as it goes (`fields`: a rate, the latest loss terms), `note(text)` for a line worth
reading, and `log(row)` for each metrics row it writes (training: a log interval, or an evaluation with an `eval`
key).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Progress", "SILENT"]


class Progress:
    """Subclass and override what you need; every method may be called on rank 0 only."""

    def start(self, stage: str, total: int, done: int = 0, **info: Any) -> None:
        """A stage of `total` units begins, `done` of them already finished (a resumed job)."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """`n` more units are finished; `fields` carry the figures of the moment (e.g. `rate`, loss terms)."""

    def note(self, message: str) -> None:
        """One line for a person to read."""

    def log(self, row: dict[str, Any]) -> None:
        """A metrics row the job also wrote to its log."""


SILENT = Progress()
