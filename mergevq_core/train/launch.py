"""Starting a training run: the recipe and its overrides, the process group, the run folder and, on resume, the
config the run was trained with; then `loop.fit` with the task of that kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..progress import SILENT, Progress
from .task import TrainTask

__all__ = ["launch", "launch_configured", "launch_finetune", "task_class"]

PATH_SETTINGS = ("data.tokens", "train.init")
RESUME_MAY_CHANGE = ("train.max_steps", "data.num_workers")  # a resumed fine-tuning run may change these  # settings given as paths (normalised like `Path` prints them)


def task_class(kind: str) -> type[TrainTask]:
    """The task that trains recipes of `kind`."""
    from .ar_task import ARTask
    from .tokenizer_task import TokenizerTask

    tasks: dict[str, type[TrainTask]] = {"tokenizer": TokenizerTask, "ar": ARTask}
    return tasks[kind]


def launch(
    kind: str, recipe: str | Path, overrides: Sequence[str] = (), settings: dict[str, Any] | None = None, *,
    out: str | Path | None = None, resume: bool = False, device: str | None = None, progress: Progress = SILENT,
) -> Any:
    """Train a recipe of `kind` (`tokenizer` or `ar`). `settings` are `--set` overrides from keyword options
    (None: not given), applied after `overrides`. The run folder is `out`, else `runs/<stem>-<time>`; with
    `resume` and no `out`, the newest run of that stem. On resume the run's saved config is used, with the
    overrides applied on top. Under torchrun every process calls this; returns the task's result."""
    from ..config import apply_overrides, config_from_dict, load_recipe, upgrade_config
    from ..dist import cleanup, finished, init_distributed
    from ..runs import resume_config, run_folder
    from .loop import fit

    task_cls = task_class(kind)
    extra = list(overrides)
    for key, value in (settings or {}).items():
        if value is not None:
            extra.append(f"{key}={Path(value) if key in PATH_SETTINGS else value}")
    cfg = load_recipe(recipe, extra, expect=kind)  # validates the recipe even on resume
    dist = init_distributed(device)
    try:
        run_dir = run_folder(kind, task_cls.run_stem(Path(recipe).stem, cfg), out, resume, dist)
        saved = resume_config(run_dir, kind) if resume else None
        if saved is not None:  # upgraded first, so an override on resume wins over an older version's values
            cfg = config_from_dict(apply_overrides(upgrade_config(saved, kind), extra), kind=kind)
        result = fit(task_cls(cfg, run_dir, dist), resume=resume, progress=progress)
        finished()
        return result
    finally:
        cleanup()


def launch_finetune(make_config: Any, stem: str, *, out: str | Path | None = None, resume: bool = False,
                    device: str | None = None, progress: Progress = SILENT) -> Any:
    """Fine-tune with the config `make_config(world_size)` builds (`finetune_task.finetune_config`); see
    `launch_configured`."""
    from .finetune_task import FinetuneTask

    return launch_configured(FinetuneTask, make_config, stem, out=out, resume=resume, device=device, progress=progress)


def launch_configured(task_cls: type[TrainTask], make_config: Any, stem: str, *, out: str | Path | None = None,
                      resume: bool = False, device: str | None = None, progress: Progress = SILENT) -> Any:
    """Train `task_cls` with the config `make_config(world_size)` builds from command options rather than a recipe
    (the fine-tuning protocol, source recovery tuning). The run folder is `out`, else `runs/<stem>-<time>`; with
    `resume` and no `out`, the newest run of that stem. A resumed run must be given the same settings it was
    started with (only `RESUME_MAY_CHANGE` may differ)."""
    from ..config import config_to_dict
    from ..dist import cleanup, finished, init_distributed
    from ..errors import ConfigError
    from ..runs import resume_config, run_folder
    from .loop import fit

    kind = task_cls.kind
    dist = init_distributed(device)
    try:
        cfg = make_config(dist.world_size)
        run_dir = run_folder(kind, stem, out, resume, dist)
        saved = resume_config(run_dir, kind) if resume else None
        if saved is not None:
            changed = _differences(saved, config_to_dict(cfg))
            changed = [c for c in changed if c not in RESUME_MAY_CHANGE]
            if changed:
                raise ConfigError(f"--resume: {run_dir} was started with other settings ({', '.join(changed[:4])}); "
                                  "give the same options, or a new --out")
        result = fit(task_cls(cfg, run_dir, dist), resume=resume, progress=progress)
        finished()
        return result
    finally:
        cleanup()


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))]
    return [] if a == b else [where]
