"""Feature labels from elsewhere: Neuronpedia explanation exports into a ``FeatureCatalog``.

Neuronpedia publishes explanations as JSON lines (``batch-N.jsonl.gz``; formerly a JSON array from
its export API), one object per explanation with ``modelId``, ``layer`` (the SAE's id there, e.g.
``6-res-jb``), ``index`` (a string) and ``description``; an index may have several. SAELens names
the same SAE ``<modelId>/<layer>`` (its ``neuronpedia_id``). Each feature gets the best-scored
description, and a label made from it (short, unique within the SAE) so that requests can steer
by it. Labels already in the catalog stay unless told otherwise; tags are never touched (a
policy may grant steering by tag).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any

from sae_serve.errors import SaeFormatError
from sae_serve.sae.features import FeatureCatalog, FeatureInfo

MAX_LABEL_WORDS = 6


def read_explanations(path: Path) -> list[dict[str, Any]]:
    """Rows of a Neuronpedia export: a JSON array, or JSON lines, either of them gzipped."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode()
    except FileNotFoundError:
        raise SaeFormatError(path, "file not found") from None
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise SaeFormatError(path, f"not a readable export ({exc})") from None
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise SaeFormatError(path, f"not JSON or JSON lines ({exc})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise SaeFormatError(path, "expected explanation objects")
    return rows


def label_from(description: str) -> str:
    """``references to the French language`` -> ``references-to-the-french-language``."""
    words = re.findall(r"[a-z0-9]+", description.lower())[:MAX_LABEL_WORDS]
    return "-".join(words)[:64]


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=lambda r: r.get("scoreV1") if isinstance(r.get("scoreV1"), int | float) else float("-inf"))


def import_labels(catalog: FeatureCatalog, rows: list[dict[str, Any]], source: Path,
                  neuronpedia_id: str | None = None, overwrite: bool = False) -> tuple[FeatureCatalog, int]:
    """The catalog with the export's descriptions and labels; also how many features got one."""
    ids = {f"{r.get('modelId')}/{r.get('layer')}" for r in rows}
    if neuronpedia_id is None and len(ids) > 1:
        raise SaeFormatError(source, f"the export holds several SAEs ({sorted(ids)[:4]}): name one with "
                             "--neuronpedia-id MODEL/SAE")
    wanted = neuronpedia_id or next(iter(ids), "")
    by_index: dict[int, list[dict[str, Any]]] = {}
    for n, row in enumerate(rows):
        if f"{row.get('modelId')}/{row.get('layer')}" != wanted or not isinstance(row.get("description"), str):
            continue
        index = row.get("index")
        if not re.fullmatch(r"[0-9]+", str(index)) or isinstance(index, bool | float):
            raise SaeFormatError(source, f"row {n}: field index must be a feature index, got {index!r}")
        index = int(index)
        if not 0 <= index < catalog.d_sae:
            raise SaeFormatError(source, f"row {n}: index {index} is outside 0..{catalog.d_sae - 1} "
                                 f"(is {wanted!r} this SAE?)")
        by_index.setdefault(index, []).append(row)
    features = dict(catalog.features)
    taken = {info.label: i for i, info in features.items() if info.label}
    for index in sorted(by_index):
        description = _best(by_index[index])["description"].strip()
        info = features.get(index, FeatureInfo())
        update: dict[str, Any] = {"description": description}
        if overwrite or info.label is None:
            label = base = label_from(description)
            suffix = 0
            while label and taken.get(label, index) != index:  # unique: -index, then -index-2, ...
                suffix += 1
                label = f"{base}-{index}" + (f"-{suffix}" if suffix > 1 else "")
            if label:
                taken.pop(info.label or "", None)
                taken[label] = index
                update["label"] = label
        features[index] = info.model_copy(update=update)
    return FeatureCatalog(d_sae=catalog.d_sae, features=features, watchlist=catalog.watchlist), len(by_index)
