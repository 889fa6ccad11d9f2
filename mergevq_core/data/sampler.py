"""A distributed, exactly resumable index sampler."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import DataError


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation (generator seeded with seed + epoch) split across ranks as `perm[rank::world_size]`.

    The epoch is truncated (drop_last) or padded by wrapping so it divides by world_size; with drop_last each
    rank also drops its last partial batch. `batch_size` is the per-rank batch.

    Position: `set_position(epoch, batches_done)` (or `set_epoch(epoch)`) chooses where the next iteration
    starts; the training loop calls `advance()` after each consumed batch, so `state()` is exact even when a
    DataLoader prefetches ahead. `advance` rolls over into the next epoch at its end. An iterator started
    earlier keeps its own snapshot of the position.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n < 1:
            raise DataError("the dataset is empty: nothing to sample")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if self.drop_last:
            self.total = (self.n // self.world_size) * self.world_size
        else:
            self.total = -(-self.n // self.world_size) * self.world_size
        self.per_rank = self.total // self.world_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.n} images give no full batch of {self.batch_size} on each of {self.world_size} rank(s): "
                "lower the batch size or add images"
            )
        self.epoch = 0
        self.batches_done = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a full epoch."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Indices this rank yields in a full epoch."""
        return self.batches_per_epoch * self.batch_size if self.drop_last else self.per_rank

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index sequence for `epoch`."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + int(epoch))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        if self.total <= self.n:
            perm = perm[: self.total]
        else:  # pad by wrapping around (possibly several times for tiny datasets)
            reps = -(-self.total // self.n)
            perm = perm.repeat(reps)[: self.total]
        return perm[self.rank :: self.world_size][: self.samples_per_epoch].tolist()

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Start the next iteration after `batches_done` batches of `epoch` (0 ≤ batches_done ≤ per epoch)."""
        if epoch < 0 or not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"position ({epoch}, {batches_done}) is outside 0..{self.batches_per_epoch} batches")
        self.epoch, self.batches_done = int(epoch), int(batches_done)
        if self.batches_done == self.batches_per_epoch:
            self.epoch, self.batches_done = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def advance(self, batches: int = 1) -> None:
        """Record `batches` consumed batches, rolling over epochs."""
        if batches < 0:
            raise ValueError("cannot advance by a negative number of batches")
        done = self.batches_done + int(batches)
        self.epoch += done // self.batches_per_epoch
        self.batches_done = done % self.batches_per_epoch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state(self, state: dict[str, int]) -> None:
        self.set_position(int(state["epoch"]), int(state["batches_done"]))

    def __iter__(self) -> Iterator[int]:
        # the position is read now, at iter() time, not lazily at the first next()
        return iter(self.epoch_indices(self.epoch)[self.batches_done * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.samples_per_epoch - self.batches_done * self.batch_size)
