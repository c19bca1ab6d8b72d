"""sae_serve: production feature steering for LLM inference.

The top-level names are imported lazily (PEP 562), so that ``import sae_serve.<sub>`` in every
vLLM worker, or on a bare training machine, pulls in only what that submodule needs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "FeatureCatalog": "sae_serve.sae.features",
    "SaeConfig": "sae_serve.sae.model",
    "SparseAutoencoder": "sae_serve.sae.model",
    "load_sae": "sae_serve.sae.formats",
    "save_sae": "sae_serve.sae.formats",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae_serve' has no attribute {name!r}")
