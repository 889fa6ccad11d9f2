"""What every stage-2 generator shares: the GPT backbone, label handling, the registry by name, and the one
interface a sampling pipeline, the trainer and the benchmarks use without asking which generator they hold.

The interface: `check_k` / `check_steps` resolve and validate the user's K and step count, `sample` decodes a
batch of labels into merged tokens (`Sampled`), `seq_len(k)` is the number of image tokens it decodes per image,
`summarize_stats` turns the per-batch decoding statistics into result keys, `needs_source_recovery` says whether
the tokenizer must predict `assign`, `reference_k` is the K its samples are compared at, and
`train_sequence_len` / `targets_count` describe teacher forcing, and `prefix_angles` is the rotation of the
position-free prefix tokens (`prefix_rope`: identity, or LlamaGen's zero rows). `default_cfg_schedule` is the
guidance schedule a sampler uses unless told otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.gpt import GPT, GPTConfig
from ..nn.rope import identity_rope
from .noise import SampleNoise
from .sampling import Pick

__all__ = ["GENERATORS", "PREFIX_ROPES", "Generator", "Sampled", "build_generator", "first_occurrence", "register"]

GENERATORS: dict[str, type["Generator"]] = {}
PREFIX_ROPES = ("identity", "zero")


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
    """A GPT plus a sequence layout. Subclasses implement `training_logits`, `sample`, `seq_len`,
    `train_sequence_len` and `targets_count`.

    `conditions_on_k`: the model is told K (MergeAR's Merge Instruction token, RandAR's slot grid); without it
    (LlamaGen) K is only reported. `needs_source_recovery`: `sample` returns no `assign`, so the tokenizer's source
    recovery model must predict it (RandAR). `default_cfg_schedule`: `constant` (LlamaGen) or `linear` (RandAR,
    as the paper samples it).

    `prefix_rope`: the rotation of the prefix tokens (class, MergeAR's M), which have no grid position: `identity`
    (cos 1, sin 0), or `zero` (cos = sin = 0, LlamaGen's freqs_cis rows for its class slot, which zero the prefix
    tokens' q and k, so every query gives them logit 0 and their own queries attend uniformly)."""

    name: ClassVar[str] = ""
    conditions_on_k: ClassVar[bool] = True
    needs_source_recovery: ClassVar[bool] = False
    default_cfg_schedule: ClassVar[str] = "constant"

    def __init__(self, gpt_cfg: GPTConfig, prefix_rope: str = "identity") -> None:
        super().__init__()
        if prefix_rope not in PREFIX_ROPES:
            raise ValueError(f"prefix_rope must be one of {', '.join(PREFIX_ROPES)}, got {prefix_rope!r}")
        self.prefix_rope = prefix_rope
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
        return {"prefix_rope": self.prefix_rope}

    def prefix_angles(self, n: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin (n, D/2) of n prefix tokens: ones and zeros (`identity`), or zeros and zeros (`zero`)."""
        cos, sin = identity_rope(self.cfg.head_dim, n, device=device)  # type: ignore[arg-type]
        return (cos.zero_() if self.prefix_rope == "zero" else cos), sin

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

    # ---------------------------------------------------------------- the sampling interface
    def default_k(self) -> int:
        """K when the user gives none."""
        return self.n_tokens

    def check_k(self, k: int | None) -> int:
        """The user's K (None: `default_k`), validated: a perfect square up to N when the model is told K, as it
        decodes on a √K×√K grid; anything otherwise (it is only reported)."""
        k = k if k is not None else self.default_k()
        if self.conditions_on_k and (k < 1 or math.isqrt(k) ** 2 != k or k > self.n_tokens):
            raise ConfigError(f"--tokens {k}: K must be a perfect square up to N={self.n_tokens}")
        return k

    def check_steps(self, steps: int | None, k: int) -> int | None:
        """The user's step count for K tokens, resolved; raster decoding always takes one step per token, so it
        ignores `steps` (returned as given)."""
        return steps

    def seq_len(self, k: int) -> int:
        """Image tokens decoded per image at K (what tokens/s counts)."""
        raise NotImplementedError

    def reference_k(self, k: int, tokenizer_keep: int) -> int:
        """The K its samples are compared at (class-consistency ceilings): K itself, or the tokenizer's own K when
        the model is not told K (its N ids carry no K of their own)."""
        return k if self.conditions_on_k else tokenizer_keep

    def sample(self, labels: Tensor, k: int, pick: Pick, guided: bool = False, *, steps: int | None = None,
               noise: SampleNoise | None = None, dtype: torch.dtype | None = None) -> Sampled:
        """Merged tokens for labels (B,) at K = k (from `check_k`). `pick(t, i, logits)` chooses sub-token i of
        target t (see `SamplingSettings.picker`), `guided` doubles the rows for CFG, `steps` and `noise` (the
        per-sample noise of the decoding order; None: seed 0 and samples 0..B-1) matter to RandAR only, `dtype` is
        the KV cache's. `stats["forward_passes"]` is always set."""
        raise NotImplementedError

    def summarize_stats(self, per_batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The per-batch `Sampled.stats` of one sampling job -> the keys it adds to the job's result."""
        return {"forward_passes_per_batch": sum(s["forward_passes"] for s in per_batch) / max(1, len(per_batch))}

    # ---------------------------------------------------------------- teacher forcing
    @property
    def train_sequence_len(self) -> int:
        """Length L of the teacher-forced input sequence at K = N (prefix tokens included)."""
        raise NotImplementedError

    def targets_count(self, batch: dict[str, Tensor]) -> int:
        """Image tokens predicted in a collated training batch (what training tokens/s counts)."""
        raise NotImplementedError

    @staticmethod
    def expand(batch: dict[str, Tensor]) -> Tensor:
        """Merged ids (B, Kmax) and assign (B, N) -> the raster id grid (B, N): each position carries its group's id."""
        return batch["ids"].gather(1, batch["assign"])
