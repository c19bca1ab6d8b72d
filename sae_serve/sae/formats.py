"""Reading and writing SAE files.

Our native format is SAELens' folder layout (``cfg.json`` + ``sae_weights.safetensors``), so SAEs
trained here load in SAELens and SAELens SAEs load here. Other sources go through one converter
table: each converter turns a file into our ``SaeConfig`` and tensors under SAELens names, and
``build_sae`` checks them all the same way.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_serve.errors import SaeFormatError
from sae_serve.sae.model import SaeConfig, SparseAutoencoder, build_sae

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"

# SAELens architecture names -> ours. "standard" is the paper's ReLU SAE.
_SAELENS_ARCHITECTURES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre)$")

Converted = tuple[SaeConfig, dict[str, torch.Tensor]]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SaeFormatError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaeFormatError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SaeFormatError(path, "expected a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise SaeFormatError(path, "file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise SaeFormatError(path, f"not a readable safetensors file ({exc})") from None


def _field(cfg: dict[str, Any], name: str, kind: type, source: Path) -> Any:
    value = cfg.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise SaeFormatError(source, f"field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def _make_config(source: Path, **fields: Any) -> SaeConfig:
    try:
        return SaeConfig(**fields)
    except ValueError as exc:
        raise SaeFormatError(source, str(exc)) from None


def _layer_from_path(path: Path, pattern: str) -> int | None:
    match = re.search(pattern, str(path))
    return int(match.group(1)) if match else None


def _require_layer(source: Path, hook_layer: int | None) -> int:
    if hook_layer is None:
        raise SaeFormatError(source, "hook_layer is not recorded here: pass hook_layer explicitly")
    return hook_layer


# --- converters: file -> (SaeConfig, tensors) --------------------------------------------------
def _from_saelens(folder: Path, hook_layer: int | None) -> Converted:
    cfg_path = folder / SAELENS_CFG
    cfg = _read_json(cfg_path)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch_name = cfg.get("architecture") or cfg.get("activation_fn_str") or "standard"
    if arch_name not in _SAELENS_ARCHITECTURES:
        raise SaeFormatError(
            cfg_path, f"architecture {arch_name!r} is not supported "
            f"(supported: {sorted(_SAELENS_ARCHITECTURES)})",
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise SaeFormatError(
            cfg_path, f"normalize_activations={norm!r} is not supported: fold the scaling into "
            "the weights and set it to 'none'",
        )
    hook_name = cfg.get("hook_name") or metadata.get("hook_name") or ""
    match = _HOOK_NAME.match(hook_name)
    if hook_name and not match:
        raise SaeFormatError(
            cfg_path, f"hook_name {hook_name!r} is not a residual-stream hook "
            "(expected blocks.N.hook_resid_post or blocks.N.hook_resid_pre)",
        )
    recorded_layer = int(match.group(1)) if match else cfg.get("hook_layer", metadata.get("hook_layer"))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    config = _make_config(
        cfg_path,
        architecture=_SAELENS_ARCHITECTURES[arch_name],
        d_in=_field(cfg, "d_in", int, cfg_path),
        d_sae=_field(cfg, "d_sae", int, cfg_path),
        hook_layer=_require_layer(cfg_path, hook_layer if hook_layer is not None else recorded_layer),
        hook_point=match.group(2) if match else cfg.get("hook_point", "resid_post"),
        model_name=cfg.get("model_name") or metadata.get("model_name"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        k=int(k) if k is not None else None,
    )
    return config, read_safetensors(folder / SAELENS_WEIGHTS)


def _from_sparsify(folder: Path, hook_layer: int | None) -> Converted:
    cfg_path = folder / SAELENS_CFG
    cfg = _read_json(cfg_path)
    activation = cfg.get("activation", "topk")
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag):
            raise SaeFormatError(cfg_path, f"sparsify option {flag}=true is not supported")
    if activation != "topk":
        raise SaeFormatError(cfg_path, f"sparsify activation {activation!r} is not supported")
    d_in = _field(cfg, "d_in", int, cfg_path)
    raw = read_safetensors(folder / SPARSIFY_WEIGHTS)
    try:
        tensors = {
            "W_enc": raw["encoder.weight"].T.contiguous(),
            "b_enc": raw["encoder.bias"],
            "W_dec": raw["W_dec"],
            "b_dec": raw["b_dec"],
        }
    except KeyError as exc:
        raise SaeFormatError(folder / SPARSIFY_WEIGHTS, f"missing tensor {exc}") from None
    # sparsify saves one folder per hookpoint, named like "layers.15".
    layer = hook_layer if hook_layer is not None else _layer_from_path(folder, r"layers\.(\d+)$")
    config = _make_config(
        cfg_path,
        architecture="topk",
        d_in=d_in,
        d_sae=cfg.get("num_latents") or d_in * _field(cfg, "expansion_factor", int, cfg_path),
        hook_layer=_require_layer(cfg_path, layer),
        apply_b_dec_to_input=True,
        k=_field(cfg, "k", int, cfg_path),
    )
    return config, tensors


def _from_gemma_scope(npz_path: Path, hook_layer: int | None) -> Converted:
    try:
        with np.load(npz_path) as params:
            tensors = {name: torch.from_numpy(np.asarray(params[name])) for name in params.files}
    except FileNotFoundError:
        raise SaeFormatError(npz_path, "file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SaeFormatError(npz_path, f"not a readable .npz file ({exc})") from None
    if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
        raise SaeFormatError(npz_path, "missing a 2-D tensor W_enc")
    d_in, d_sae = tensors["W_enc"].shape
    # Gemma Scope paths look like layer_20/width_16k/average_l0_71/params.npz.
    layer = hook_layer if hook_layer is not None else _layer_from_path(npz_path, r"layer_(\d+)")
    config = _make_config(
        npz_path, architecture="jumprelu", d_in=d_in, d_sae=d_sae,
        hook_layer=_require_layer(npz_path, layer), apply_b_dec_to_input=False,
    )
    return config, tensors


def _detect(path: Path) -> tuple[Callable[[Path, int | None], Converted], Path]:
    """Pick the converter from the files present."""
    if path.is_file() and path.suffix == ".npz":
        return _from_gemma_scope, path
    if path.is_dir():
        if (path / SAELENS_WEIGHTS).exists():
            return _from_saelens, path
        if (path / SPARSIFY_WEIGHTS).exists():
            return _from_sparsify, path
        if (path / GEMMA_SCOPE_PARAMS).exists():
            return _from_gemma_scope, path / GEMMA_SCOPE_PARAMS
        raise SaeFormatError(
            path, f"no SAE found: expected {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} "
            f"(sparsify) or {GEMMA_SCOPE_PARAMS} (Gemma Scope)",
        )
    raise SaeFormatError(path, "no such SAE folder or .npz file")


def load_sae(
    path: str | os.PathLike[str],
    *,
    hook_layer: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SparseAutoencoder:
    """Load an SAE from a SAELens folder, a sparsify folder, or a Gemma Scope params.npz.

    ``hook_layer`` overrides (or supplies, for formats that lack it) the layer the SAE reads.
    """
    converter, source = _detect(Path(path))
    config, tensors = converter(source, hook_layer)
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

