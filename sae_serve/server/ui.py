"""The feature explorer and playground: static files at /ui, and two JSON routes they read.

The page (``ui_static/``: plain HTML, CSS and JS, nothing fetched from elsewhere) is public, like
/health: vLLM's key check guards only /v1. Every call the page makes goes to /v1 or /metrics with
the key the user typed, so the data stays behind the same auth as the API.

- GET /v1/features/{sae}?q=&tag=&limit= : catalog search by label, tag, description or index.
- GET /v1/features/{sae}/{feature}/examples : calibration's top examples, examples by activation
  interval and promoted tokens (``examples.json.gz`` beside the SAE), when the SAE ships them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from sae_serve.config import config_from_env
from sae_serve.errors import SpecError
from sae_serve.sae.features import FeatureCatalog
from sae_serve.server.service import SteeringService

STATIC = Path(__file__).parent / "ui_static"
EXAMPLES_FILE = "examples.json.gz"


class FeatureSummary(BaseModel):
    """One row of a catalog search."""

    feature: int
    label: str | None
    tags: tuple[str, ...]
    max_activation: float | None
    density: float | None
    description: str | None


class FeatureList(BaseModel):
    object: str = "list"
    sae: str
    total: int
    """Matches before ``limit``."""
    tags: list[str]
    """Every tag of the SAE's catalog, for the page's tag filter."""
    data: list[FeatureSummary]


class FeatureExamples(BaseModel):
    """What calibration recorded for one feature; empty lists when the SAE ships no examples."""

    sae: str
    feature: int
    examples: list[dict[str, Any]]
    """Top-activating tokens: ``before``, ``token``, ``after``, ``activation``."""
    quantile_examples: list[dict[str, Any]]
    """One example per activation interval (``interval``: a fraction of max activation)."""
    promoted_tokens: list[str]
    """Tokens the feature's decoder direction pushes up most."""


class ExampleStore:
    """examples.json.gz per SAE, read on first use (megabytes: not at startup, not per request)."""

    def __init__(self) -> None:
        config = config_from_env()
        self.folders = {} if config is None else {e.name: _folder(Path(e.path)) for e in config.saes}
        self.loaded: dict[str, dict[str, list[Any]]] = {}

    def of(self, sae: str) -> dict[str, list[Any]]:
        if sae not in self.loaded:
            folder = self.folders.get(sae)
            self.loaded[sae] = _read_examples(folder / EXAMPLES_FILE) if folder else {}
        return self.loaded[sae]


def _read_examples(path: Path) -> dict[str, list[Any]]:
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def search(catalog: FeatureCatalog, q: str, tag: str | None) -> list[int]:
    """Feature indices matching ``q`` (an index, or a case-insensitive substring of the label, a tag
    or the description) and ``tag``; exact label first, then label, tag and description matches.
    An empty query lists labelled features first, so the explorer opens on the named ones."""
    q = q.strip().lower()
    if q.isascii() and q.isdigit() and int(q) < catalog.d_sae:  # ASCII: int("²") would raise
        return [int(q)] if tag is None or tag in catalog.info(int(q)).tags else []
    ranked: list[tuple[int, int]] = []
    for index, info in catalog.features.items():
        if tag is not None and tag not in info.tags:
            continue
        label = (info.label or "").lower()
        if not q:
            rank = 0 if label else 1
        elif label == q:
            rank = 0
        elif q in label:
            rank = 1
        elif any(q in t.lower() for t in info.tags):
            rank = 2
        elif q in (info.description or "").lower():
            rank = 3
        else:
            continue
        ranked.append((rank, index))
    return [index for _, index in sorted(ranked)]


def _summary(catalog: FeatureCatalog, index: int) -> FeatureSummary:
    info = catalog.info(index)
    return FeatureSummary(feature=index, label=info.label, tags=info.tags, max_activation=info.max_activation,
                          density=info.density, description=info.description)


def _not_found(exc: SpecError) -> JSONResponse:
    return JSONResponse(status_code=404, content={"error": {"message": str(exc), "type": "NotFoundError",
                                                            "param": exc.field, "code": 404}})


def attach_ui(app: FastAPI) -> None:
    """Add the page and its JSON routes to vLLM's app."""

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="sae_serve_ui")

    @app.get("/v1/features/{sae}", response_model=FeatureList)
    async def list_features(sae: str, raw_request: Request, q: str = Query("", max_length=200),
                            tag: str | None = Query(None, max_length=64),
                            limit: int = Query(50, ge=1, le=5000)) -> Response | FeatureList:
        service: SteeringService = raw_request.app.state.sae_serve
        if sae not in service.registry.saes:
            return _not_found(SpecError("sae", f"unknown SAE {sae!r} (loaded: {sorted(service.registry.saes)})"))
        catalog = service.registry.saes[sae].catalog
        found = search(catalog, q, tag)
        tags = sorted({t for info in catalog.features.values() for t in info.tags})
        return FeatureList(sae=sae, total=len(found), tags=tags, data=[_summary(catalog, i) for i in found[:limit]])

    @app.get("/v1/features/{sae}/{feature}/examples", response_model=FeatureExamples)
    async def feature_examples(sae: str, feature: str, raw_request: Request) -> Response | FeatureExamples:
        service: SteeringService = raw_request.app.state.sae_serve
        try:
            index = service.feature(sae, service.path_ref(feature))["feature"]
        except SpecError as exc:
            return _not_found(exc)
        state = raw_request.app.state
        if getattr(state, "sae_serve_examples", None) is None:
            state.sae_serve_examples = ExampleStore()
        extras = state.sae_serve_examples.of(sae)

        def pick(key: str) -> list[Any]:
            rows = extras.get(key, [])
            return rows[index] if index < len(rows) and rows[index] else []

        return FeatureExamples(sae=sae, feature=index, examples=pick("examples"),
                               quantile_examples=pick("quantile_examples"), promoted_tokens=pick("promoted_tokens"))
