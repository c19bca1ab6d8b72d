"""``sae-serve train`` as a list of steps: texts -> contexts -> harvest -> train -> export.

Every step that takes long is resumable: the corpus and harvested shards are cached by content,
and training checkpoints to the output folder and continues from the last checkpoint. Under
``torchrun`` the first process harvests and writes (checkpoints, the SAE) while every process
trains on its slice of each batch (``distributed.py``); the folders must be shared by all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae_serve import envs
from sae_serve.architectures import decoder_layers
from sae_serve.errors import SaeServeError
from sae_serve.sae.formats import save_sae
from sae_serve.sae.model import SparseAutoencoder
from sae_serve.train.activations import ActivationStore, ContextActivations, harvest, tokenize_contexts
from sae_serve.train.corpus import SOURCES, build_corpus, read_corpus
from sae_serve.train.distributed import ONE_PROCESS, Ranks
from sae_serve.train.scaling import plot_history
from sae_serve.train.trainer import StepStats, TrainConfig, Trainer

logger = logging.getLogger(__name__)
SMALL_TIER = ("gutenberg", "sotu")


@dataclass(frozen=True)
class HarvestJob:
    """Which activations to harvest (``sae-serve harvest``, and the first step of train)."""

    layer: int
    """Decoder layer whose output (resid_post) is harvested."""
    tokens: int
    """Distinct tokens to harvest."""
    ctx_len: int = 256
    """Tokens per context."""
    corpus: str = "default"
    """Packaged corpus tier: default or small."""
    corpus_file: Path | None = None
    """A text file (documents separated by blank lines) instead of the packaged corpus."""


@dataclass(frozen=True)
class TrainJob:
    """One ``sae-serve train`` invocation."""

    out: Path
    """Folder for the SAE (SAELens layout), checkpoint, history and loss curve."""
    train: TrainConfig
    """The optimisation; ``train.total_tokens`` may exceed ``harvest.tokens`` (several passes)."""
    harvest: HarvestJob
    """The activations it learns from."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""


def corpus_texts(corpus: str = "default", corpus_file: Path | None = None, split: str = "train") -> Iterator[str]:
    """Documents of a packaged corpus tier's split, or of a text file (split by blank lines)."""
    if corpus_file is not None:
        if not corpus_file.is_file():
            raise SaeServeError(f"{corpus_file}: no such corpus file")
        docs = [d for d in corpus_file.read_text().split("\n\n") if d.strip()]
        if not docs:
            raise SaeServeError(f"{corpus_file}: the corpus is empty")
        yield from docs
        return
    sources = SOURCES if corpus == "default" else tuple(s for s in SOURCES if s.name in SMALL_TIER)
    path = build_corpus(envs.cache_dir() / "corpus" / corpus, sources)
    yield from (text for _, text in read_corpus(path, split))


def harvested(job: HarvestJob, source: nn.Module | ContextActivations | None, tokenizer: object, model_name: str,
              batch_contexts: int = 8) -> ActivationStore:
    """The job's activations, harvested from ``source`` (a transformers model or another engine's
    ``ContextActivations``; None: they must be there already) into a cache folder named by model,
    layer and contexts: whichever engine harvested them, training finds them there."""
    contexts = tokenize_contexts(corpus_texts(job.corpus, job.corpus_file), tokenizer, job.ctx_len, job.tokens)
    digest = hashlib.sha1(contexts.tobytes()).hexdigest()[:12]
    folder = envs.cache_dir() / "activations" / f"{model_name}-L{job.layer}-{digest}"
    logger.info("harvesting %d contexts into %s (resumes where it stopped)", len(contexts), folder)
    return harvest(source, contexts, job.layer, folder, batch_contexts=batch_contexts)


def train_with_checkpoints(job: TrainJob, store: ActivationStore, on_log: Callable[[StepStats], None],
                           ranks: Ranks = ONE_PROCESS) -> Trainer:
    device = ranks.device()
    trainer = Trainer(job.train, store.meta()["d_in"], device, ranks)
    checkpoint = job.out / "checkpoint.pt"
    if checkpoint.exists():
        trainer.load_checkpoint(checkpoint)
        logger.info("resumed from %s at step %d of %d", checkpoint, trainer.step, job.train.steps)
    ranks.same(trainer.step, "the step to resume from")
    batches = store.batches(job.train.batch_size, job.train.seed + trainer.step, device)
    while trainer.step < job.train.steps:
        trainer.fit(batches, log_every=10, until=trainer.step + job.checkpoint_every, on_log=on_log)
        if ranks.main:
            trainer.save_checkpoint(checkpoint)
    return trainer


def export(job: TrainJob, trainer: Trainer, store: ActivationStore, model_name: str) -> SparseAutoencoder:
    sae = trainer.export(store.meta()["scale"], job.harvest.layer, model_name)
    save_sae(sae, job.out)
    history = trainer.history
    (job.out / "training.json").write_text(json.dumps(
        {"config": asdict(job.train), "layer": job.harvest.layer, "tokens": job.harvest.tokens,
         "scale": store.meta()["scale"], "history": [asdict(h) for h in history]}, indent=1, default=str))
    if history:
        plot_history([h.step for h in history], {k: [getattr(h, k) for h in history]
                                                 for k in ("loss", "fvu", "l0", "dead_fraction")},
                     job.out / "loss_curve.png")
    return sae


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise SaeServeError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")


def run_training(job: TrainJob, model: nn.Module | None, tokenizer: object, model_name: str,
                 on_log: Callable[[StepStats], None] = lambda s: None,
                 ranks: Ranks = ONE_PROCESS) -> SparseAutoencoder | None:
    """The SAE (None on every process but the first, which harvests with ``model`` and writes;
    the others need no model: they read the shards it wrote)."""
    if ranks.main:
        check_layer(job.harvest.layer, len(decoder_layers(model)))
    job.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(job.train.seed)
    np.random.seed(job.train.seed)
    store = harvested(job.harvest, model, tokenizer, model_name) if ranks.main else None
    ranks.barrier()  # the others find every shard written
    store = store or harvested(job.harvest, model, tokenizer, model_name)
    trainer = train_with_checkpoints(job, store, on_log, ranks)
    return export(job, trainer, store, model_name) if ranks.main else None
