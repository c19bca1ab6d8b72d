"""Labels that hold up: each label checked on held-out positive and negative texts.

A label is a promise to users who steer and alert by it. For each labelled feature, a check file
holds texts written for the purpose (never the texts a contrastive search used): ones the label
says the feature should fire on, and near misses it should not. A text counts as detected when
the feature exceeds the firing threshold the metrics use (a fraction of its max activation) on
any of its tokens; precision and recall over those texts go into ``features.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sae_serve.errors import SaeFormatError
from sae_serve.sae.model import SparseAutoencoder
from sae_serve.train.activations import layer_activations

if TYPE_CHECKING:
    from sae_serve.sae.features import FeatureCatalog

CHECKS_FILE = "label_checks.json"
FIRING_FRACTION = 0.25  # the default of config metrics.firing_fraction_of_max


@dataclass(frozen=True)
class LabelCheck:
    label: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class LabelScore:
    precision: float
    recall: float
    texts: int


def read_checks(path: Path) -> list[LabelCheck]:
    try:
        labels = json.loads(path.read_text())["labels"]
        checks = [LabelCheck(name, tuple(c["positive"]), tuple(c["negative"])) for name, c in labels.items()]
    except FileNotFoundError:
        raise SaeFormatError(path, "file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SaeFormatError(path, f"expected {{\"labels\": {{LABEL: {{\"positive\": [...], \"negative\": [...]}}}}}} "
                             f"({type(exc).__name__}: {exc})") from None
    for check in checks:
        for kind in ("positive", "negative"):
            texts = getattr(check, kind)
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise SaeFormatError(path, f"labels.{check.label}.{kind}: expected a non-empty list of texts")
    return checks


@torch.no_grad()
def peak_activation(sae: SparseAutoencoder, model: nn.Module, tokenizer: object, text: str, feature: int) -> float:
    """The feature's largest activation over the text's tokens (the first, an attention sink, skipped)."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    acts = layer_activations(model, ids, sae.site_layer)[0, 1:]
    if not len(acts):
        return 0.0
    column = sae.encode(acts)[:, feature] if sae.cfg.architecture == "topk" else sae.encode_subset(
        acts, torch.tensor([feature]))  # (a TopK feature depends on every other)
    return float(column.max())


def score_label(sae: SparseAutoencoder, model: nn.Module, tokenizer: object, feature: int, threshold: float,
                positive: Sequence[str], negative: Sequence[str]) -> LabelScore:
    hits = [peak_activation(sae, model, tokenizer, t, feature) > threshold for t in (*positive, *negative)]
    true_pos, false_pos = sum(hits[: len(positive)]), sum(hits[len(positive):])
    return LabelScore(true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0,
                      true_pos / len(positive), len(positive) + len(negative))


def validated_catalog(catalog: FeatureCatalog, sae: SparseAutoencoder, model: nn.Module, tokenizer: object,
                      checks: Sequence[LabelCheck], source: Path) -> FeatureCatalog:
    """``catalog`` with each checked label's precision and recall recorded."""
    from sae_serve.sae.features import FeatureCatalog

    features = dict(catalog.features)
    for check in checks:
        index = catalog.resolve(check.label, f"{source.name}: labels.{check.label}")
        info = catalog.info(index)
        if info.max_activation is None:
            raise SaeFormatError(source, f"label {check.label!r}: feature {index} has no max activation (calibrate)")
        score = score_label(sae, model, tokenizer, index, FIRING_FRACTION * info.max_activation,
                            check.positive, check.negative)
        features[index] = info.model_copy(update={"precision": round(score.precision, 3),
                                                  "recall": round(score.recall, 3), "checked_texts": score.texts})
    return FeatureCatalog(d_sae=catalog.d_sae, features=features, watchlist=catalog.watchlist)
