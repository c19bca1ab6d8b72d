"""Data-parallel training across processes (``torchrun``): what the trainer needs of the other ranks.

Every rank reads the same stream of batches (same seed, same order) and trains on its own equal
slice of each (``shard``), so a run on N processes sees the data of a single-process run in the
same order. Gradients are averaged across ranks (``average_gradients``, as DDP does), and every
statistic of a batch that is not a mean over rows (the TopK loss's normaliser, BatchTopK's global
threshold, which features fired) is reduced over all ranks first, so the N-process result equals
the single-process one up to the order of float sums.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sae_serve.errors import SaeServeError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one: ``Ranks()``)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, MASTER_ADDR...); one
        process when it describes none. gloo on CPUs, NCCL on GPUs."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            # The first process harvests while the others wait at a barrier: allow it hours, not minutes.
            timeout = timedelta(hours=12)
            if torch.cuda.is_available():
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
                dist.init_process_group("nccl", timeout=timeout, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        """Writes checkpoints and results; harvests."""
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the batch size must divide evenly)."""
        if self.world == 1:
            return batch
        if batch.shape[0] % self.world:
            raise ValueError(f"batch size {batch.shape[0]} does not divide among {self.world} processes")
        rows = batch.shape[0] // self.world
        return batch[self.rank * rows:(self.rank + 1) * rows]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MIN)

    def row_mean(self, per_row: torch.Tensor) -> torch.Tensor:
        """The mean over every rank's rows of a per-row quantity (a constant: no gradient)."""
        if self.world == 1:
            return per_row.detach().mean()
        return self.sum(per_row.detach().sum()) / (per_row.shape[0] * self.world)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (equal shapes), concatenated in rank order (no gradient)."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def same(self, value: int, what: str) -> None:
        """Raise unless every process has this ``value`` (e.g. the step each resumed from)."""
        if self.world == 1:
            return
        t = torch.tensor([value, -value], device=self.device())
        low, neg_high = self.min(t).tolist()
        if low != -neg_high:
            raise SaeServeError(f"the training processes disagree on {what} ({low} to {-neg_high}): is the output "
                                "folder shared by all of them?")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (every process, once done). The barrier first: a process that
        tears down its gloo connections while a peer still uses them aborts ("terminate called
        without an active exception"), about one run in six on two CPU processes."""
        self.barrier()
        if self.world > 1:
            dist.destroy_process_group()

    def _reduce(self, t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if self.world == 1:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, op)
        return out


ONE_PROCESS = Ranks()
