"""Calibration statistics against brute force; scaling fits; corpus building blocks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_serve.sae.features import FeatureCatalog, FeatureInfo
from sae_serve.train.calibrate import calibrated_catalog, contrastive_scores, feature_stats
from sae_serve.train.corpus import Source, _documents, build_corpus, is_held_out, read_corpus
from sae_serve.train.scaling import SweepRun, fit_power_law, fit_sweep, training_flops
from tests.conftest import make_sae


def test_feature_stats_match_brute_force() -> None:
    sae = make_sae("relu", 16, 32, seed=2)
    x = torch.randn(300, 16) * 2
    stats = feature_stats(sae, x.split(64), top=5)
    acts = sae.encode(x)
    np.testing.assert_allclose(stats.max_activation, acts.max(0).values.clamp(min=0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.density, (acts > 0).float().mean(0).numpy(), rtol=1e-6)
    top = acts.topk(5, dim=0)
    np.testing.assert_allclose(stats.top_values, top.values.numpy(), rtol=1e-6)
    assert (acts[stats.top_rows[0], np.arange(32)].numpy() == stats.top_values[0]).all()


def test_calibrated_catalog_keeps_curation() -> None:
    sae = make_sae("relu", 16, 4, seed=2)
    stats = feature_stats(sae, [torch.randn(50, 16)])
    old = FeatureCatalog(d_sae=4, features={1: FeatureInfo(label="x", tags=("safety",), max_activation=9.0)},
                         watchlist=(1,))
    new = calibrated_catalog(old, stats)
    assert new.info(1).label == "x" and new.info(1).tags == ("safety",) and new.watchlist == (1,)
    assert new.info(1).max_activation == pytest.approx(float(stats.max_activation[1]))


def test_contrastive_scores_rank_a_planted_direction(tiny_llama) -> None:
    model, tok = tiny_llama
    sae = make_sae("relu", 64, 16, seed=1, hook_layer=1)
    score = contrastive_scores(sae, model, tok, ["alpha beta gamma"], ["alpha beta gamma"])
    assert torch.allclose(score, torch.zeros(16))  # the same texts: nothing stands out
    score = contrastive_scores(sae, model, tok, ["the cat sat on the mat"], ["def f(x): return x"])
    assert score.shape == (16,) and score.abs().max() > 0


def test_power_law_fits() -> None:
    x = np.array([1e10, 1e11, 1e12, 1e13])
    law = fit_power_law(x, 3.0 * x**-0.2)
    assert (law.coefficient, law.exponent) == (pytest.approx(3.0), pytest.approx(-0.2))
    runs = [SweepRun(f, t, 2.0 * training_flops(8, f, t) ** -0.1, 10) for f in (64, 128) for t in (1000, 4000)]
    fit = fit_sweep(runs, 8)
    assert fit.loss.exponent == pytest.approx(-0.1, abs=1e-6)
    width, tokens = fit.recommend(training_flops(8, 128, 4000))
    assert width > 0 and tokens > 0
    with pytest.raises(ValueError, match="two positive points"):
        fit_power_law([1.0], [1.0])


def test_documents_dedup_and_split(tmp_path: Path) -> None:
    text = "\n\n".join(f"paragraph {i} " + "x" * 300 for i in range(100))
    docs = list(_documents(text, max_chars=3000))
    assert len(docs) > 5 and all(len(d) <= 3400 for d in docs)
    texts = [f"document number {i} " + "words " * 60 for i in range(300)] + ["document number 1 " + "words " * 60]
    source = Source("local-test", "local", "test", "CC0", lambda _: iter(texts))
    path = build_corpus(tmp_path / "c", (source,))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 300  # the repeated document is gone
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest[0]["documents"] == 300 and manifest[0]["licence"] == "CC0"
    held = list(read_corpus(path, "heldout"))
    assert 0 < len(held) < 20 and all(is_held_out(t) for _, t in held)
    assert len(list(read_corpus(path, "train"))) == 300 - len(held)


def test_quantile_samples_fall_in_their_intervals() -> None:
    from sae_serve.train.calibrate import quantile_samples

    sae = make_sae("relu", 16, 32, seed=2)
    x = torch.randn(2000, 16) * 2
    acts = sae.encode(x)
    peak = acts.max(0).values.numpy()
    values, rows = quantile_samples(sae, x.split(300), peak, bins=4)
    for b in range(4):
        for f in range(32):
            if rows[b, f] < 0:  # no activation in this interval at all
                in_bin = (acts[:, f] > 0) & ((acts[:, f] / peak[f] * 4).floor().clamp(max=3) == b)
                assert not in_bin.any()
                continue
            assert values[b, f] == acts[rows[b, f], f].item()
            assert b / 4 <= values[b, f] / peak[f] <= (b + 1) / 4 + 1e-6
    assert (rows[3] >= 0).all() or (acts.max(0).values > 0).sum() < 32
