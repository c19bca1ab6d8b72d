"""Reading and writing SAE files.

Our native format is SAELens' folder layout (``cfg.json`` + ``sae_weights.safetensors``), so SAEs
trained here load in SAELens and SAELens SAEs load here. Every source goes through one converter
table (``converters.py``): each converter turns a file into our ``SaeConfig`` and tensors under
SAELens names, and ``build_sae`` checks them all the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_serve.errors import SaeFormatError
from sae_serve.sae.converters import SAELENS_CFG, SAELENS_WEIGHTS, detect
from sae_serve.sae.model import SaeConfig, SparseAutoencoder, build_sae


def load_sae(
    path: str | os.PathLike[str],
    *,
    hook_layer: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SparseAutoencoder:
    """Load an SAE from a SAELens, sparsify or dictionary_learning folder, or a Gemma Scope params.npz.

    ``hook_layer`` overrides (or supplies, for formats that lack it) the layer the SAE reads.
    """
    converter, source = detect(Path(path))
    try:
        config, tensors = converter(source, hook_layer)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError, ZeroDivisionError) as exc:
        # A field or tensor of the wrong kind that no check named: still an error naming the file.
        raise SaeFormatError(source, f"unexpected content ({type(exc).__name__}: {exc})") from None
    sae = build_sae(config, {k: v.to(torch.float32) for k, v in tensors.items()}, str(source))
    return sae.to(device=device, dtype=dtype)


def saelens_config(cfg: SaeConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The cfg.json we write: SAELens' fields plus our hook_layer/hook_point."""
    out: dict[str, Any] = {
        "architecture": "standard" if cfg.architecture == "relu" else cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name": cfg.hook_name,
        "hook_layer": cfg.hook_layer,
        "hook_point": cfg.hook_point,
        "model_name": cfg.model_name,
        "metadata": {"hook_name": cfg.hook_name, "model_name": cfg.model_name},
    }
    if cfg.k is not None:
        out["k"] = cfg.k
    return out


def save_sae(sae: SparseAutoencoder, folder: str | os.PathLike[str]) -> Path:
    """Write ``sae`` as a SAELens folder. Other files in the folder (features.json) are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu() for name, t in sae.tensors().items()}
    # Write beside the target and rename, so a reader never sees half a file.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_file(tensors, os.path.join(tmp, SAELENS_WEIGHTS))
        Path(tmp, SAELENS_CFG).write_text(json.dumps(saelens_config(sae.cfg, sae.dtype), indent=2))
        for name in (SAELENS_WEIGHTS, SAELENS_CFG):
            os.replace(os.path.join(tmp, name), folder / name)
    return folder

