"""What every stage-2 generator shares: the GPT backbone, label handling and the registry by name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..models.gpt import GPT, GPTConfig

__all__ = ["GENERATORS", "Generator", "Sampled", "build_generator", "first_occurrence", "register"]

GENERATORS: dict[str, type["Generator"]] = {}


def register(cls: type["Generator"]) -> type["Generator"]:
    GENERATORS[cls.name] = cls
    return cls


def build_generator(name: str, gpt_cfg: GPTConfig, **options: Any) -> "Generator":
    """A generator by registered name (`llamagen`, `mergear`, `randar`) around a fresh GPT."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; choose one of {', '.join(GENERATORS)}")
    return GENERATORS[name](gpt_cfg, **options)


def first_occurrence(groups: Tensor) -> Tensor:
    """(B, N) ids or group indices -> (B, N) bool: True where the value appears for the first time in raster
    order (a representative). A stable sort per row keeps equal values in raster order, so the first of each run
    of equal values is the earliest position: O(N log N), no (N, N) comparison."""
    vals, idx = groups.sort(dim=1, stable=True)
    starts = torch.ones_like(vals, dtype=torch.bool)
    starts[:, 1:] = vals[:, 1:] != vals[:, :-1]
    return torch.zeros_like(starts).scatter_(1, idx, starts)


@dataclass
class Sampled:
    """Decoded images' tokens: ids (B, K̂max) merged ids padded with -1, k (B,), assign (B, N) (None when the
    source recovery model must predict it), and decoding statistics."""

    ids: Tensor
    k: Tensor
    assign: Tensor | None
    stats: dict[str, Any] = field(default_factory=dict)


class Generator(nn.Module):
    """A GPT plus a sequence layout. Subclasses implement `training_logits` and `generate`."""

    name: ClassVar[str] = ""

    def __init__(self, gpt_cfg: GPTConfig) -> None:
        super().__init__()
        self.gpt = GPT(gpt_cfg)
        self.grid = math.isqrt(gpt_cfg.max_len)
        if self.grid**2 != gpt_cfg.max_len:
            raise ValueError(f"max_len must be a square number of grid tokens, got {gpt_cfg.max_len}")

    @property
    def cfg(self) -> GPTConfig:
        return self.gpt.cfg

    @property
    def n_tokens(self) -> int:
        return self.cfg.max_len

    def options(self) -> dict[str, Any]:
        """Constructor options besides the GPT config (saved in checkpoints)."""
        return {}

    def labels_for(self, labels: Tensor) -> Tensor:
        """Unknown labels (-1) become the null class."""
        return torch.where(labels < 0, torch.full_like(labels, self.gpt.null_class), labels)

    def training_logits(self, batch: dict[str, Tensor], generator: torch.Generator | None = None):
        """Teacher forcing on a collated token batch -> (logits, targets (B, L), -100 = ignore)."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None,
             label_smoothing: float = 0.0) -> Tensor:
        logits, targets = self.training_logits(batch, generator)
        return self.gpt.loss(logits, targets, label_smoothing)

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None,
                label_smoothing: float = 0.0) -> Tensor:
        """The training loss (what DDP wraps)."""
        return self.loss(batch, generator, label_smoothing)

    def generate(self, labels: Tensor, **kw: Any) -> Sampled:
        raise NotImplementedError

    @staticmethod
    def expand(batch: dict[str, Tensor]) -> Tensor:
        """Merged ids (B, Kmax) and assign (B, N) -> the raster id grid (B, N): each position carries its group's id."""
        return batch["ids"].gather(1, batch["assign"])
