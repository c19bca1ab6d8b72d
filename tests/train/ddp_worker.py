"""Run by ``torchrun`` in tests/train/test_distributed.py: trains one small SAE per architecture on
the shared batches, each process on its slice, and the first process saves the weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sae_serve.train.distributed import Ranks
from sae_serve.train.trainer import StepStats, TrainConfig, Trainer

ARCHITECTURES = ("relu", "topk", "batchtopk")
D_IN, BATCH, STEPS = 24, 64, 12


def batches() -> list[torch.Tensor]:
    """The same data, in the same order, in every process."""
    gen = torch.Generator().manual_seed(7)
    basis = torch.randn(40, D_IN, generator=gen)
    codes = torch.relu(torch.randn(BATCH * STEPS, 40, generator=gen) - 1.0)
    return list((codes @ basis + 0.05 * torch.randn(BATCH * STEPS, D_IN, generator=gen)).split(BATCH))


def train(architecture: str, ranks: Ranks) -> tuple[Trainer, StepStats]:
    # dead_after_tokens small enough that AuxK runs (its normaliser is reduced across processes too)
    cfg = TrainConfig(architecture, d_sae=48, k=4, total_tokens=BATCH * STEPS, batch_size=BATCH, lr=3e-3,
                      dead_after_tokens=3 * BATCH)
    trainer = Trainer(cfg, D_IN, ranks=ranks)
    for batch in batches():
        stats = trainer.train_step(batch)
    return trainer, stats


def main(out: Path) -> None:
    ranks = Ranks.from_env()
    got = {}
    for architecture in ARCHITECTURES:
        trainer, stats = train(architecture, ranks)
        got |= {f"{architecture}.{name}": t.detach().clone() for name, t in trainer.sae.state_dict().items()}
        got[f"{architecture}.stats"] = torch.tensor([stats.loss, stats.fvu, stats.l0, stats.dead_fraction])
    if ranks.main:
        torch.save(got, out)
    ranks.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
