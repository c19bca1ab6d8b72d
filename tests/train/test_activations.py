"""Harvest: resumable and deterministic; bad input gives clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_serve.errors import SaeServeError
from sae_serve.train.activations import harvest, layer_activations, normalisation_scale, tokenize_contexts
from sae_serve.train.pipeline import corpus_texts


def test_contexts_join_texts_with_eos(tiny_llama) -> None:
    _, tok = tiny_llama
    ctx = tokenize_contexts(["hello world"] * 50, tok, 8, 80)
    assert ctx.shape == (10, 8) and ctx.dtype == np.int32
    assert (ctx == tok.eos_token_id).any()
    with pytest.raises(SaeServeError, match="fewer than ctx_len"):
        tokenize_contexts([], tok, 8, 80)


def test_harvest_resume_produces_identical_shards(tiny_llama, tmp_path: Path) -> None:
    model, _ = tiny_llama
    contexts = np.random.default_rng(0).integers(0, 49152, size=(10, 12)).astype(np.int32)
    first = harvest(model, contexts, 1, tmp_path / "a", batch_contexts=3, shard_contexts=3)
    shards = first.shards()
    assert len(shards) == 4 and np.load(shards[0]).shape == (3 * 11, 64)  # position 0 skipped
    original = [p.read_bytes() for p in shards]
    shards[1].unlink()
    shards[3].unlink()
    again = harvest(model, contexts, 1, tmp_path / "a", batch_contexts=3, shard_contexts=3)
    assert [p.read_bytes() for p in again.shards()] == original
    meta = again.meta()
    assert meta["layer"] == 1 and meta["d_in"] == 64
    batch = next(again.batches(16, seed=0))
    assert batch.shape == (16, 64)


def test_normalisation_scale() -> None:
    x = torch.randn(1000, 8) * 7
    s = normalisation_scale(x)
    assert (s * x).pow(2).sum(-1).mean().item() == pytest.approx(8.0, rel=1e-5)
    with pytest.raises(SaeServeError, match="NaN"):
        normalisation_scale(torch.full((4, 8), float("nan")))


def test_layer_out_of_range(tiny_llama) -> None:
    model, _ = tiny_llama
    with pytest.raises(SaeServeError, match=r"layer 2 is out of range: the model has layers 0..1"):
        layer_activations(model, torch.zeros((1, 4), dtype=torch.long), 2)


def test_nan_activations_are_refused(tiny_llama, tmp_path: Path) -> None:
    model, _ = tiny_llama
    weight = model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(SaeServeError, match="NaN/inf activations"):
            harvest(model, np.zeros((2, 6), dtype=np.int32), 1, tmp_path / "n")
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_empty_corpus_file(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("\n\n   \n")
    with pytest.raises(SaeServeError, match="the corpus is empty"):
        list(corpus_texts(corpus_file=tmp_path / "c.txt"))
