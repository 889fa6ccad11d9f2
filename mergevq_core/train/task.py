"""What one kind of training supplies to the one training loop (`loop.fit`).

The loop owns everything the kinds share: the resume guard, the batch-size check, the data stream and its
position, autocast and the GradScaler, accumulation (with DDP `no_sync`), clipping of the main model's gradients,
the NaN/inf guard, metrics.jsonl and config.json, the log / eval / checkpoint cadence and the common train_state
fields. A `TrainTask` supplies the rest: its data, models and optimisers, one micro-batch step, what follows the
optimizer step, its evaluation, and the extra state, tensors and meta of its checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..dist import DistInfo

__all__ = ["EvalHook", "MicroStep", "RunSummary", "TrainData", "TrainTask"]

EvalHook = Callable[[Path, list[dict[str, Any]]], None]
"""Called on rank 0 after each evaluation row with (run folder, every metrics row so far), e.g. to plot curves."""


@dataclass(frozen=True)
class TrainData:
    """The training set of a task: `dataset[i]` items, collated by `collate` (None: torch's default); `what` names
    the items in the "fewer than one batch" error."""

    dataset: Any
    collate: Callable | None = None
    what: str = "training images"


@dataclass(frozen=True)
class MicroStep:
    """What the loop hands a task during optimizer step `step` (0-based: the steps done before it)."""

    step: int
    accum: int  # micro-batches per optimizer step
    info: dict[str, Any]  # what `begin_step` returned
    autocast: Any  # torch.autocast context of train.precision (disabled for fp32, and for auto off CUDA)
    scaler: torch.amp.GradScaler
    grad_clip: float  # max gradient norm; inf when clipping is off

    def backward(self, loss: Tensor) -> None:
        """Backpropagate one micro-batch's share of the step's loss (float32; scaled for fp16)."""
        self.scaler.scale(loss.float() / self.accum).backward()


@dataclass(frozen=True)
class RunSummary:
    """How the loop's part of a run went, for the task's result."""

    run_dir: Path
    steps: int  # optimizer steps done in all (including those before a resume)
    wall_s: float  # this process's training time, evaluation at the end excluded
    rate: float  # throughput units (`TrainTask.count_key`) per second in this process
    checkpoint: Path | None
    resumed_from: int | None
    final_losses: dict[str, float]  # the last log row's mean loss terms


class TrainTask:
    """One kind of training. `loop.fit` calls, in order:

    `preflight`, `train_data`, `build`, `restore` (when resuming), `distribute` (under DDP), `prepare_eval`
    (rank 0), `start_info`; then for each optimizer step `begin_step`, `units` and `micro_step` per micro-batch,
    and `after_step`; `evaluate` (rank 0) and `state` / `tensors` / `meta` at the cadences; `result` at the end.

    `build` sets `model` (the trainable module, unwrapped, whose gradients the loop clips and checks) and
    `optimizer` (its optimizer, which the loop unscales, steps and zeroes).
    """

    kind: ClassVar[str]  # meta.json `kind` and run-folder kind: "tokenizer" | "ar"
    rate_key: ClassVar[str]  # the throughput field of a log row, e.g. "img_per_s"
    count_key: ClassVar[str]  # the train_state key of the throughput counter, e.g. "images"
    loss_key: ClassVar[str]  # the loss term the NaN guard watches
    eval_at_start: ClassVar[bool] = False  # a fresh run also evaluates the untrained model (step 0)

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: Any, run_dir: Path, dist: DistInfo) -> None:
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist
        self.device = dist.device
        self.cuda = dist.device.type == "cuda"

    @classmethod
    def run_stem(cls, recipe_stem: str, cfg: Any) -> str:
        """The name stem of a new run folder `runs/<stem>-<time>` (and of the runs `--resume` looks for)."""
        return recipe_stem

    @property
    def generator(self) -> str | None:
        """The generator name a checkpoint to resume must hold (None: any)."""
        return None

    # ------------------------------------------------------------------ before the first step

    def preflight(self) -> None:
        """Raise one error naming every missing file or folder, before anything is built."""

    def train_data(self, per_step: int) -> TrainData:
        """Open the training data; `per_step` items are drawn per micro-batch over all processes."""
        raise NotImplementedError

    def build(self, resume_meta: dict[str, Any] | None) -> None:
        """Build models, optimisers and the task's own RNGs (the global torch seed is set just before).
        `resume_meta` is the meta.json of the checkpoint `restore` loads next; None on a fresh start, where initial
        weights (DINOv2, `train.init`) may be loaded."""
        raise NotImplementedError

    def restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        """Load the task's tensors from `ckpt` and its own entries of train_state `state` (the loop restores the
        common ones: step, scaler, torch RNG, data position, log accumulators, wall time, counter)."""
        raise NotImplementedError

    def distribute(self, wrap: Callable[..., nn.Module]) -> list[nn.Module]:
        """Under DDP only: wrap the modules that train with `wrap(module, **ddp_options)`, use the wrappers from now
        on and return them (the loop enters their `no_sync` on all but the last micro-batch of a step)."""
        raise NotImplementedError

    def prepare_eval(self) -> None:
        """Rank 0, after the run folder is written: load what evaluation needs (held-out data)."""

    def start_info(self) -> dict[str, Any]:
        """Task-specific fields of the `progress.start` info (model size, data sizes...)."""
        return {}

    # ------------------------------------------------------------------ one optimizer step

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer that follows the learning-rate schedule."""
        return [self.optimizer]

    def begin_step(self, step: int) -> dict[str, Any]:
        """Draw the per-step settings before its micro-batches (e.g. K); they go into the progress fields and the
        log row."""
        return {}

    def units(self, batch: dict[str, Tensor]) -> int:
        """Throughput units (`count_key`) in one micro-batch of this process."""
        raise NotImplementedError

    def micro_step(self, batch: dict[str, Tensor], ctx: MicroStep) -> dict[str, Tensor | float]:
        """Forward and `ctx.backward` one micro-batch; return its loss terms (including `loss_key`)."""
        raise NotImplementedError

    def after_step(self, ctx: MicroStep) -> None:
        """After the main optimizer stepped, before the scaler updates: other optimizers, EMA..."""

    # ------------------------------------------------------------------ evaluation, checkpoints, result

    @property
    def last_eval_step(self) -> int | None:
        """The step of the newest evaluation on record; the loop evaluates at the end unless it is the last step."""
        raise NotImplementedError

    def evaluate(self, step: int, autocast: Any) -> dict[str, Any]:
        """Rank 0: evaluate at `step`; the result becomes the metrics row `{"step", "eval"}`."""
        raise NotImplementedError

    def eval_hooks(self) -> list[EvalHook]:
        """Hooks run after each evaluation row (the loss curve)."""
        return []

    def state(self, gather: Callable[[Any], Any]) -> dict[str, Any]:
        """The task's entries of train_state. Called on every rank: `gather(value)` is a collective that returns
        every rank's value as a list under DDP (the value itself otherwise)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        """State dicts to save, one `<name>.safetensors` each."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """meta.json fields besides kind, config, world_size and created."""
        return {}

    def result(self, run: RunSummary) -> Any:
        """The task's result dataclass."""
        raise NotImplementedError
