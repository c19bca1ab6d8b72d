"""Calibrate features: max activation (the unit of clamp strength), density, top-activating
contexts with the token that fired, promoted tokens, and contrastive search.

Max activation is taken over all calibration tokens, as in Scaling Monosemanticity ("clamped to
10x its maximum activation"). Contrastive search ranks features by how much more they fire on
positive than on negative texts: how a deployment finds its safety features to watch.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sae_serve.sae.model import SparseAutoencoder
from sae_serve.train.activations import layer_activations

if TYPE_CHECKING:
    from sae_serve.sae.features import FeatureCatalog


@dataclass
class FeatureStats:
    """Running per-feature statistics; rows index the flattened calibration tokens."""

    max_activation: np.ndarray  # (F,)
    density: np.ndarray  # (F,) fraction of tokens active
    top_values: np.ndarray  # (k, F) descending
    top_rows: np.ndarray  # (k, F) token rows of those values


@torch.no_grad()
def feature_stats(sae: SparseAutoencoder, chunks: Iterable[torch.Tensor], top: int = 24) -> FeatureStats:
    """Stream (tokens, d_in) activation chunks once; keep each feature's ``top`` examples."""
    best_v = best_i = fired = None
    seen = 0
    for x in chunks:
        a = sae.encode(x)
        if best_v is None:
            best_v = torch.full((top, sae.d_sae), -1.0, device=a.device)
            best_i = torch.zeros((top, sae.d_sae), dtype=torch.long, device=a.device)
            fired = torch.zeros(sae.d_sae, dtype=torch.float64, device=a.device)
        fired += (a > 0).double().sum(0)
        v, i = a.topk(min(top, len(a)), dim=0)
        cat_v, cat_i = torch.cat([best_v, v]), torch.cat([best_i, i + seen])
        keep = cat_v.topk(top, dim=0).indices
        best_v, best_i = cat_v.gather(0, keep), cat_i.gather(0, keep)
        seen += len(a)
    if best_v is None or seen == 0:
        raise ValueError("no calibration tokens")
    return FeatureStats(best_v[0].clamp(min=0).cpu().numpy(), (fired / seen).cpu().numpy(),
                        best_v.cpu().numpy(), best_i.cpu().numpy())


def context_chunks(model: nn.Module, contexts: np.ndarray, layer: int, batch: int = 8) -> Iterable[torch.Tensor]:
    """Activations of ``contexts`` (n, ctx_len), position 0 skipped, one batch at a time."""
    for b in range(0, len(contexts), batch):
        acts = layer_activations(model, torch.from_numpy(contexts[b : b + batch]).long(), layer)[:, 1:]
        yield acts.reshape(-1, acts.shape[-1])


def _example(contexts: np.ndarray, tokenizer: object, row: int, value: float, window: int) -> dict:
    """The token at flattened ``row`` (position 0 of each context skipped) with its context."""
    ctx, pos = divmod(int(row), contexts.shape[1] - 1)
    ids = contexts[ctx]
    pos += 1
    return {"activation": round(float(value), 3), "before": tokenizer.decode(ids[max(0, pos - window) : pos]),
            "token": tokenizer.decode(ids[pos : pos + 1]),
            "after": tokenizer.decode(ids[pos + 1 : pos + 1 + window // 3])}


def examples(stats: FeatureStats, contexts: np.ndarray, tokenizer: object, per_feature: int = 8,
             window: int = 12) -> list[list[dict]]:
    """Per feature, its strongest contexts: text before the token, the token, text after."""
    return [[_example(contexts, tokenizer, row, value, window)
             for value, row in zip(stats.top_values[:per_feature, f], stats.top_rows[:per_feature, f], strict=True)
             if value > 0]
            for f in range(stats.top_values.shape[1])]


@torch.no_grad()
def quantile_samples(sae: SparseAutoencoder, chunks: Iterable[torch.Tensor], max_activation: np.ndarray,
                     bins: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(bins, F) values and rows: per feature, one uniformly drawn example whose activation lies in
    [b, b + 1) / bins x its max activation (row -1 where the interval is empty). Each candidate
    gets a random priority and the highest survives across chunks: a uniform draw in one pass."""
    gen = torch.Generator().manual_seed(seed)
    peak = torch.from_numpy(np.asarray(max_activation, dtype=np.float32)).clamp(min=1e-12)
    best_key = torch.full((bins, sae.d_sae), -1.0)
    best_row = torch.full((bins, sae.d_sae), -1, dtype=torch.long)
    best_val = torch.zeros((bins, sae.d_sae))
    columns, seen = torch.arange(sae.d_sae), 0
    for x in chunks:
        a = sae.encode(x).float().cpu()
        interval = (a / peak * bins).floor().clamp(max=bins - 1)
        keys = torch.rand(a.shape, generator=gen)
        for b in range(bins):
            value, row = torch.where((a > 0) & (interval == b), keys, -1.0).max(0)
            better = value > best_key[b]
            best_key[b] = torch.where(better, value, best_key[b])
            best_row[b] = torch.where(better, row + seen, best_row[b])
            best_val[b] = torch.where(better, a[row, columns], best_val[b])
        seen += len(a)
    return best_val.numpy(), best_row.numpy()


def quantile_examples(values: np.ndarray, rows: np.ndarray, contexts: np.ndarray, tokenizer: object,
                      window: int = 12) -> list[list[dict]]:
    """Per feature, one example per activation interval, weakest first (from ``quantile_samples``)."""
    bins = len(values)
    return [[{"interval": f"[{b / bins:.1f}, {(b + 1) / bins:.1f}) x max",
              **_example(contexts, tokenizer, rows[b, f], values[b, f], window)}
             for b in range(bins) if rows[b, f] >= 0]
            for f in range(values.shape[1])]


@torch.no_grad()
def promoted_tokens(sae: SparseAutoencoder, unembed: torch.Tensor, tokenizer: object, n: int = 8) -> list[list[str]]:
    """Per feature, the tokens its decoder direction pushes up most (W_U @ W_dec[i])."""
    logits = sae.W_dec.float() @ unembed.float().T  # (F, vocab)
    top = logits.topk(n, dim=1).indices.tolist()
    return [[tokenizer.decode([t]) for t in row] for row in top]


@torch.no_grad()
def contrastive_scores(sae: SparseAutoencoder, model: nn.Module, tokenizer: object,
                       positive: Sequence[str], negative: Sequence[str]) -> torch.Tensor:
    """(d_sae,) mean activation on positive texts minus on negative texts, in units of each
    feature's own largest activation seen here (so rare, strong features are not drowned)."""
    def mean_and_max(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(sae.d_sae, dtype=torch.float64)
        peak = torch.zeros(sae.d_sae)
        count = 0
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            a = sae.encode(layer_activations(model, ids, sae.site_layer)[0, 1:])
            total += a.double().sum(0)
            peak = torch.maximum(peak, a.max(0).values)
            count += len(a)
        return total / max(count, 1), peak

    pos_mean, pos_peak = mean_and_max(positive)
    neg_mean, neg_peak = mean_and_max(negative)
    scale = torch.maximum(pos_peak, neg_peak).clamp(min=1e-6).double()
    return ((pos_mean - neg_mean) / scale).float()


def calibrated_catalog(catalog: FeatureCatalog, stats: FeatureStats) -> FeatureCatalog:
    """``catalog`` with max activation and density replaced; labels, tags and watchlist kept. Label
    check figures go: their firing threshold moved with the max (rerun ``features validate``)."""
    from sae_serve.sae.features import FeatureCatalog, FeatureInfo  # pydantic stays off bare GPU hosts

    features = {}
    for f in range(catalog.d_sae):
        old = catalog.info(f)
        peak = float(stats.max_activation[f])
        features[f] = FeatureInfo(label=old.label, tags=old.tags, description=old.description,
                                  max_activation=peak if peak > 0 else None, density=float(stats.density[f]))
    return FeatureCatalog(d_sae=catalog.d_sae, features=features, watchlist=catalog.watchlist)


def write_examples(folder: Path, feature_examples: list[list[dict]], promoted: list[list[str]],
                   by_quantile: list[list[dict]]) -> Path:
    path = folder / "examples.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"examples": feature_examples, "promoted_tokens": promoted, "quantile_examples": by_quantile}, f)
    return path
