"""The one training loop, for every kind of training (`task.TrainTask`: the tokenizer, the generators).

Runs as one process or under torchrun (DDP). Every random choice comes from seeded generators whose state is
checkpointed, and the data order is a pure function of (seed, epoch, position), so `--resume` continues the
exact run: on CPU the metrics after a resume equal those of an uninterrupted run. Signal handling and time-based
checkpoint cadences belong here, not in tasks.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .. import checkpoint as ck
from ..config import config_to_dict
from ..dist import DistInfo, all_reduce_mean
from ..errors import CheckpointError, ConfigError, DataError, MergeVQError
from ..precision import train_autocast
from ..progress import SILENT, Progress
from .optim import lr_at, set_lr
from .preempt import StopSignals, TrainingInterrupted
from .task import EvalHook, MicroStep, RunSummary, TrainTask

__all__ = ["BatchStream", "TrainingDiverged", "TrainingInterrupted", "fit", "gather_per_rank", "this_rank"]


class TrainingDiverged(MergeVQError):
    """A loss or gradient became NaN/inf; nothing was saved after the last good checkpoint."""


class BatchStream:
    """Endless micro-batches over epochs with an exact, checkpointable position."""

    def __init__(self, dataset, micro_batch: int, seed: int, num_workers: int, dist: DistInfo,
                 collate_fn: Callable | None = None, what: str = "training images") -> None:
        from ..data import ResumableSampler

        self.dataset = dataset
        self.sampler = ResumableSampler(len(dataset), micro_batch, seed=seed, rank=dist.rank,
                                        world_size=dist.world_size, shuffle=True, drop_last=True)
        if self.sampler.batches_per_epoch < 1:
            raise DataError(f"{len(dataset)} {what} are fewer than one batch of {micro_batch} per process")
        self.kwargs = dict(batch_size=micro_batch, num_workers=num_workers, drop_last=True, collate_fn=collate_fn,
                           pin_memory=dist.device.type == "cuda", persistent_workers=False)
        self.epoch, self.done, self.seed, self.rank = 0, 0, seed, dist.rank
        self._it = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.done}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.done = int(state["epoch"]), int(state["batches_done"])
        self._it = None

    def next(self) -> dict[str, Tensor]:
        while True:
            if self._it is None:
                if self.done >= self.sampler.batches_per_epoch:  # resumed at an epoch's end: open the next epoch
                    self.epoch, self.done = self.epoch + 1, 0  # rather than an empty iterator
                self.sampler.set_position(self.epoch, self.done)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)
                # its own generator: creating an iterator (its workers' base seed) never draws from the global torch
                # RNG, which the model's own randomness (drop path, dropout) uses and checkpoints restore; so a run
                # resumed mid-epoch, which creates its iterator at another step, draws the same masks
                from ..data.rng import make_generator

                g = make_generator(self.seed, self.epoch, self.rank)
                self._it = iter(DataLoader(self.dataset, sampler=self.sampler, generator=g, **self.kwargs))
            try:
                batch = next(self._it)
                self.done += 1
                return batch
            except StopIteration:
                self.epoch, self.done, self._it = self.epoch + 1, 0, None


def gather_per_rank(value: Any, dist: DistInfo) -> Any:
    """Every rank's `value` as a list under DDP (a collective: call it on every rank), else `value` itself."""
    if not dist.enabled:
        return value
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, value)
    return out


def this_rank(saved: Any, dist: DistInfo) -> Any:
    """This rank's entry of a value `gather_per_rank` saved: a run with another process count gets rank 0's."""
    if isinstance(saved, list):
        return saved[dist.rank] if len(saved) == dist.world_size else saved[0]
    return saved


def checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run starts from; refuses to resume nothing, and to start over an existing run."""
    ckpt = ck.latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume and ckpt is None:
        raise CheckpointError(f"nothing to resume: {run_dir} holds no checkpoint")
    if not resume and ckpt is not None:
        raise ConfigError(f"{run_dir} already holds a run (step {ck.read_meta(ckpt)['step']}): pass --resume to continue it, or --out for a new folder")
    return ckpt


# what a resumed run may change: how long it trains, how often it logs, evaluates and checkpoints, and its workers
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.ckpt_every",
                     "train.ckpt_minutes", "train.keep_checkpoints", "data.num_workers", "data.workers")


COMMANDS_FILE = "commands.txt"


def record_command(run_dir: Path, step: int) -> None:
    """Append the command line that started (step 0) or resumed this run to its commands.txt, the record
    `mergevq export` writes into a model card."""
    import shlex
    import sys

    argv = sys.argv[1:]
    if sys.argv and Path(sys.argv[0]).name not in ("mergevq", "__main__.py"):  # called from Python: no command line
        return
    line = f"{'start' if step == 0 else f'resume at step {step}'}: mergevq {shlex.join(argv)}\n"
    with open(Path(run_dir) / COMMANDS_FILE, "a") as f:
        f.write(line)


def refuse_changed_config(run_dir: Path, new: dict) -> None:
    """`--resume` continues the run in `run_dir` as it was configured (its config.json): any other recipe value
    that differs is an error naming the first one (so that another run's folder cannot be continued by mistake)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old), flat(json.loads(json.dumps(new)))
    for key in sorted(set(a) | set(b)):
        if key not in RESUMABLE_CHANGES and key != "version" and a.get(key) != b.get(key):
            raise ConfigError(f"--resume: {run_dir} was trained with {key}={json.dumps(a.get(key))}, this recipe gives "
                              f"{json.dumps(b.get(key))}: resume with the run's own recipe and --set values, or use a "
                              f"new --out")


class MetricsLog:
    """metrics.jsonl (rank 0): on resume, the rows the interrupted run logged after its checkpoint are dropped."""

    def __init__(self, run_dir: Path, resumed_at: int | None, enabled: bool) -> None:
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled
        self.rows: list[dict[str, Any]] = []
        if not enabled:
            return
        if resumed_at is not None and self.path.exists():
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resumed_at]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def final_losses(self) -> dict[str, float]:
        return next((dict(r["loss"]) for r in reversed(self.rows) if "loss" in r), {})


def fit(task: TrainTask, *, resume: bool = False, progress: Progress = SILENT,
        eval_hooks: list[EvalHook] | None = None) -> Any:
    """Train `task` in its run folder to `train.max_steps` (else `train.epochs`), continuing its latest
    checkpoint with `resume`. Progress calls and evaluation happen on rank 0 only. Returns `task.result(...)`.
    SIGTERM / SIGINT / SIGUSR1 stop it after the current step with a checkpoint (`TrainingInterrupted`); resuming
    a finished run changes nothing and returns its result."""
    with StopSignals(task.dist, task.cfg.train.ckpt_minutes) as stop:
        return _Loop(task, resume, progress, task.eval_hooks() if eval_hooks is None else eval_hooks, stop).run()


class _Loop:
    def __init__(self, task: TrainTask, resume: bool, progress: Progress, eval_hooks: list[EvalHook],
                 stop: StopSignals) -> None:
        self.task, self.progress, self.eval_hooks, self.stop = task, progress, eval_hooks, stop
        cfg, dist = task.cfg, task.dist
        tc = self.tc = cfg.train
        self.dist, self.run_dir = dist, task.run_dir
        self.ckpt = checkpoint_to_resume(self.run_dir, resume)
        meta = None
        if self.ckpt is not None:
            meta = ck.read_meta(self.ckpt, expect_kind=task.kind, expect_generator=task.generator, hint=": use another --out")
            refuse_changed_config(self.run_dir, config_to_dict(cfg))
        self.autocast = train_autocast(tc.precision, dist.device)  # fp16 off CUDA: a ConfigError before any work
        task.preflight()
        per_step = tc.micro_batch * dist.world_size
        if tc.batch_size % per_step:
            raise ConfigError(f"train.batch_size={tc.batch_size} is not a multiple of micro_batch × processes = {per_step}")
        self.accum = tc.batch_size // per_step
        data = task.train_data(per_step)
        self.stream = BatchStream(data.dataset, tc.micro_batch, tc.seed, cfg.data.num_workers, dist, data.collate, data.what)
        self.total = tc.max_steps or tc.epochs * max(1, self.stream.sampler.batches_per_epoch // self.accum)

        torch.manual_seed(tc.seed)
        task.build(meta)
        cuda = dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=cuda and tc.precision == "fp16")
        self.acc: dict[str, float] = {}
        self.acc_n, self.step, self.wall_before, self.count = 0, 0, 0.0, 0
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self.count_before = self.count
        self.ddp: list[torch.nn.Module] = []
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = task.distribute(partial(DDP, device_ids=[dist.device.index] if cuda else None))
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
            record_command(self.run_dir, self.step)
        self.log = MetricsLog(self.run_dir, self.step if self.ckpt is not None else None, dist.is_main)
        if dist.is_main:
            task.prepare_eval()
        self.grad_clip = tc.grad_clip if tc.grad_clip > 0 else math.inf

    def _restore(self, ckpt: Path) -> None:
        """Everything the next step depends on."""
        st = ck.read_train_state(ckpt)
        self.task.restore(ckpt, st)
        self.scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(this_rank(st["torch_rng"], self.dist))
        self.stream.load_state(this_rank(st["data"], self.dist))
        self.acc, self.acc_n = dict(st["log_acc"]), int(st["log_n"])
        self.step, self.wall_before, self.count = int(st["step"]), float(st["wall_s"]), int(st[self.task.count_key])

    # ------------------------------------------------------------------ cadence

    def run(self) -> Any:
        task, dist, tc = self.task, self.dist, self.tc
        if dist.is_main:
            info = {"run_dir": str(self.run_dir), "total_steps": self.total, "start_step": self.step,
                    "device": str(dist.device), "world_size": dist.world_size, "accum": self.accum,
                    "batch_size": tc.batch_size, **task.start_info(), "resumed": self.ckpt is not None}
            self.progress.start("train", self.total, self.step, **info)
        resumed_from = self.step if self.ckpt is not None else None
        if dist.is_main and self.ckpt is None and task.eval_at_start:
            self._evaluate(0)
        self.t0 = time.perf_counter()
        t_log, count_log = self.t0, self.count
        self.last_path = self.ckpt
        finished = self.ckpt is not None and self.step >= self.total  # resumed at the end: nothing to do
        self.stop.saved()
        task.model.train()
        while self.step < self.total:
            lr = lr_at(self.step, tc, self.total)
            terms, info = self._optimizer_step(lr)
            self.step += 1
            for name, v in terms.items():
                self.acc[name] = self.acc.get(name, 0.0) + v
            self.acc_n += 1
            if dist.is_main:
                self.progress.advance(1, step=self.step, **terms, lr=lr, **info)
            last = self.step == self.total
            if self.step % tc.log_every == 0 or last:
                now = time.perf_counter()
                row = {"step": self.step, "epoch": self.stream.epoch, "lr": lr, **info,
                       "loss": {n: v / self.acc_n for n, v in self.acc.items()},
                       task.rate_key: (self.count - count_log) / max(now - t_log, 1e-9),
                       "elapsed_s": self.wall_before + now - self.t0}
                self.acc, self.acc_n, t_log, count_log = {}, 0, now, self.count
                if dist.is_main:
                    self.log.append(row)
                    self.progress.log(row)
            if dist.is_main and (self.step % tc.eval_every == 0 or last):
                self._evaluate(self.step)
            saved = self.step % tc.ckpt_every == 0 or last
            if saved:
                self.last_path = self._save()
            if last:
                break
            stop, due = self.stop.poll()  # every rank: any rank's signal, rank 0's checkpoint clock
            if (stop or due) and not saved:
                self.last_path = self._save()
            if stop:
                raise TrainingInterrupted(
                    f"interrupted by {self.stop.name()} at step {self.step}: checkpoint "
                    f"{self.run_dir / ck.CKPT_DIR / f'step_{self.step:07d}'}; continue with the same command and "
                    f"--resume (--out {self.run_dir})")

        wall = time.perf_counter() - self.t0
        if dist.is_main and not finished and task.last_eval_step != self.step:
            self._evaluate(self.step)
        return task.result(RunSummary(
            run_dir=self.run_dir, steps=self.step, wall_s=wall,
            rate=(self.count - self.count_before) / wall if wall > 0 else 0.0, checkpoint=self.last_path,
            resumed_from=resumed_from, final_losses=self.log.final_losses(),
        ))

    # ------------------------------------------------------------------ one optimizer step

    def _optimizer_step(self, lr: float) -> tuple[dict[str, float], dict[str, Any]]:
        """Accumulate `accum` micro-batches, check, clip and step. Returns (mean loss terms + grad_norm, step info)."""
        task, dist = self.task, self.dist
        info = task.begin_step(self.step)
        for opt in task.optimizers():
            set_lr(opt, lr)
        ctx = MicroStep(step=self.step, accum=self.accum, info=info, autocast=self.autocast, scaler=self.scaler,
                        grad_clip=self.grad_clip)
        terms: dict[str, float] = {}
        for micro in range(self.accum):
            batch = self.stream.next()
            self.count += task.units(batch) * dist.world_size
            with self._no_sync(micro == self.accum - 1):
                out = task.micro_step(batch, ctx)
            for name, v in out.items():
                terms[name] = terms.get(name, 0.0) + float(v.detach() if isinstance(v, Tensor) else v) / self.accum
        self.scaler.unscale_(task.optimizer)
        gnorm = float(torch.nn.utils.clip_grad_norm_(task.model.parameters(), self.grad_clip))
        self._check_finite(terms, gnorm)
        self.scaler.step(task.optimizer)
        task.after_step(ctx)
        self.scaler.update()
        task.optimizer.zero_grad(set_to_none=True)
        terms["grad_norm"] = gnorm
        return terms, info

    def _no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """No gradient all-reduce on accumulation micro-batches (DDP only)."""
        stack = contextlib.ExitStack()
        if not sync:
            for module in self.ddp:
                stack.enter_context(module.no_sync())
        return stack

    def _check_finite(self, terms: dict[str, float], gnorm: float) -> None:
        """Stop every rank when any rank's loss or gradient is NaN/inf (fp16 skips such steps by itself)."""
        bad = torch.tensor([0.0 if math.isfinite(terms[self.task.loss_key]) and math.isfinite(gnorm) else 1.0])
        if float(all_reduce_mean(bad.to(self.dist.device))) > 0 and not self.scaler.is_enabled():
            where = f"; the last good checkpoint is {self.last_path}" if self.last_path else "; no checkpoint was written yet"
            key = self.task.loss_key
            if len(terms) == 1:
                what = f"loss {terms[key]:.4g}, gradient norm {gnorm:.4g}"
            else:
                listed = ", ".join(f"{n}={v:.3g}" for n, v in terms.items())
                what = f"{key} loss {terms[key]:.4g}, gradient norm {gnorm:.4g} (terms: {listed})"
            raise TrainingDiverged(f"training diverged at step {self.step}: {what}{where}")

    # ------------------------------------------------------------------ evaluation and checkpoints

    def _evaluate(self, at: int) -> None:
        row = {"step": at, "eval": self.task.evaluate(at, self.autocast)}
        self.log.append(row)
        for hook in self.eval_hooks:
            hook(self.run_dir, self.log.rows)
        self.progress.log(row)

    def _save(self) -> Path:
        """A checkpoint of this step (every rank takes part in gathering the per-rank state); rank 0 writes it."""
        task, dist = self.task, self.dist
        state = {
            "step": self.step, "scaler": self.scaler.state_dict(),
            "torch_rng": gather_per_rank(torch.get_rng_state(), dist),  # each rank's own (drop path, dropout)
            "data": gather_per_rank(self.stream.state(), dist), "log_acc": self.acc, "log_n": self.acc_n,
            "wall_s": self.wall_before + (time.perf_counter() - self.t0), task.count_key: self.count,
            **task.state(partial(gather_per_rank, dist=dist)),
        }
        tensors = task.tensors()
        if not dist.is_main:
            return self.run_dir
        meta = {"kind": task.kind, **task.meta(), "config": config_to_dict(task.cfg), "world_size": dist.world_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = ck.save_checkpoint(self.run_dir, self.step, tensors, state, meta, keep_last=self.tc.keep_checkpoints)
        self.stop.saved()
        return path
