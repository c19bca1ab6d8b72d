"""The feature catalog that lives beside an SAE's weights as ``features.json``.

Per feature: an optional human label, tags (e.g. ``safety``), the calibrated max activation that
sets clamp units ("clamped to 10x its maximum", Scaling Monosemanticity) and density. The
watchlist names the features the server monitors in Prometheus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from sae_serve.errors import SaeFormatError, SpecError, first_field_error

CATALOG_FILE = "features.json"


class FeatureInfo(BaseModel):
    """What is known about one feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str | None = None
    """Short human-readable name, unique within the SAE (e.g. ``french``)."""
    tags: tuple[str, ...] = ()
    """Free-form groups, e.g. ``safety``; policies and watchlists can name them."""
    max_activation: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Largest activation seen in calibration: the unit of ``multiple_of_max``."""
    density: float | None = Field(default=None, ge=0, le=1)
    """Fraction of calibration tokens on which the feature fired."""
    description: str | None = None
    """Longer free text (how the label was found)."""
    precision: float | None = Field(default=None, ge=0, le=1)
    """Of the held-out texts the feature fires on, the fraction the label says it should."""
    recall: float | None = Field(default=None, ge=0, le=1)
    """Of the held-out texts the label says it should fire on, the fraction it fires on."""
    checked_texts: int | None = Field(default=None, ge=1)
    """How many held-out texts (positive and negative) those two figures come from."""


class FeatureCatalog(BaseModel):
    """Sparse per-feature metadata for one SAE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_sae: int = Field(gt=0)
    """Number of features of the SAE this catalog describes."""
    features: dict[int, FeatureInfo] = {}
    """Metadata by feature index; features without an entry have none."""
    watchlist: tuple[int, ...] = ()
    """Features whose activations are exported as metrics."""
    _by_label: dict[str, int] = PrivateAttr(default_factory=dict)

    @field_validator("features")
    @classmethod
    def _unique_labels(cls, features: dict[int, FeatureInfo]) -> dict[int, FeatureInfo]:
        seen: dict[str, int] = {}
        for index, info in features.items():
            if info.label is not None and seen.setdefault(info.label, index) != index:
                raise ValueError(f"label {info.label!r} is used by features {seen[info.label]} and {index}")
        return features

    def model_post_init(self, context: object) -> None:
        bad = [i for i in (*self.features, *self.watchlist) if not 0 <= i < self.d_sae]
        if bad:
            raise ValueError(f"feature indices {bad} are outside 0..{self.d_sae - 1}")
        self._by_label = {info.label: index for index, info in self.features.items() if info.label is not None}

    # --- lookups -------------------------------------------------------------------------------
    def info(self, index: int) -> FeatureInfo:
        return self.features.get(index, FeatureInfo())

    def label_of(self, index: int) -> str | None:
        return self.info(index).label

    def resolve(self, ref: int | str, field: str) -> int:
        """A feature index from an index or a label; ``field`` names the request field in errors."""
        if isinstance(ref, str):
            if ref not in self._by_label:
                raise SpecError(field, f"no feature is labelled {ref!r}")
            return self._by_label[ref]
        if not 0 <= ref < self.d_sae:
            raise SpecError(field, f"feature index {ref} is outside 0..{self.d_sae - 1}")
        return ref

    def with_tag(self, tag: str) -> list[int]:
        return sorted(i for i, info in self.features.items() if tag in info.tags)

    # --- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | os.PathLike[str], d_sae: int) -> FeatureCatalog:
        """Read ``folder/features.json``; an SAE without one gets an empty catalog."""
        path = Path(folder) / CATALOG_FILE
        if not path.exists():
            return cls(d_sae=d_sae)
        try:
            catalog = cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SaeFormatError(path, f"not valid JSON ({exc})") from None
        except ValidationError as exc:
            raise SaeFormatError(path, first_field_error(exc)) from None
        if catalog.d_sae != d_sae:
            raise SaeFormatError(path, f"d_sae is {catalog.d_sae} but the SAE has {d_sae} features")
        return catalog

    def save(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / CATALOG_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=1, exclude_defaults=True) + "\n")
        os.replace(tmp, path)
        return path

