"""Preemption-safe stops for the training loop: SIGTERM / SIGINT / SIGUSR1 ask the loop to finish the current
optimizer step, checkpoint it and exit with `EXIT_PREEMPTED`; a second signal while stopping aborts at once.
The same all-reduced flag carries the time-based checkpoint cadence (`train.ckpt_minutes`, rank 0's clock), so
every rank under torchrun stops, or saves, at the same step."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from ..dist import DistInfo
from ..errors import MergeVQError

__all__ = ["EXIT_PREEMPTED", "StopSignals", "TrainingInterrupted"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a clean stop with a checkpoint; run the same command with --resume
SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class TrainingInterrupted(MergeVQError):
    """A signal stopped training after a checkpoint of the step it was in; `--resume` continues it exactly."""

    exit_code = EXIT_PREEMPTED


class StopSignals:
    """Within `with`: the stop signals are recorded instead of killing the process (main thread only; the
    previous handlers come back on exit). `poll` is a collective under DDP: call it on every rank after each step."""

    def __init__(self, dist: DistInfo, ckpt_minutes: float | None) -> None:
        self.dist, self.ckpt_s = dist, None if ckpt_minutes is None else ckpt_minutes * 60
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.last_save = time.monotonic()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: stop waiting for the checkpoint
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum

    def saved(self) -> None:
        """A checkpoint was just written: the time cadence counts from now."""
        self.last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """(stop now, checkpoint now), the same on every rank: any rank's signal, rank 0's checkpoint clock."""
        stop = self.signum is not None
        due = self.dist.is_main and self.ckpt_s is not None and time.monotonic() - self.last_save >= self.ckpt_s
        if not self.dist.enabled:
            return stop, due
        import torch
        import torch.distributed as tdist

        flags = torch.tensor([float(stop), float(due)], device=self.dist.device)
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal to another process"
