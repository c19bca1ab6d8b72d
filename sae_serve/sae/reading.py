"""Reading helpers every converter shares: files, fields, and refusals that name them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_serve.errors import SaeFormatError
from sae_serve.sae.model import SaeConfig

Converted = tuple[SaeConfig, dict[str, torch.Tensor]]
HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre)$")
# A decoder layer's module path in a Hugging Face model (SAELens on HF models, Gemma Scope 2's
# hf_hook_point_in): its output is the residual stream after that layer.
LAYER_OUTPUT = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)(?:\.output)?$")


def residual_hook(name: str) -> tuple[int, str] | None:
    """(layer, "resid_post" or "resid_pre") of a residual-stream hook name, else None: TransformerLens's
    ``blocks.N.hook_resid_post``, or a decoder layer's module path (``model.layers.N``)."""
    if match := HOOK_NAME.match(name):
        return int(match.group(1)), match.group(2)
    if match := LAYER_OUTPUT.match(name):
        return int(match.group(1)), "resid_post"
    return None

def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SaeFormatError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaeFormatError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SaeFormatError(path, "expected a JSON object")
    return data


def as_float32(tensors: dict[str, Any]) -> dict[str, Any]:
    """Floating tensors in float32 before any folding arithmetic (bf16 folds drift and can flip a
    near-tied top-k choice); other values as they are."""
    return {n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in tensors.items()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return as_float32(load_file(str(path)))
    except FileNotFoundError:
        raise SaeFormatError(path, "file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise SaeFormatError(path, f"not a readable safetensors file ({exc})") from None


def field(cfg: dict[str, Any], name: str, kind: type, source: Path) -> Any:
    value = cfg.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise SaeFormatError(source, f"field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def make_config(source: Path, **fields: Any) -> SaeConfig:
    try:
        return SaeConfig(**fields)
    except ValueError as exc:
        raise SaeFormatError(source, str(exc)) from None


def layer_from_path(path: Path, pattern: str) -> int | None:
    match = re.search(pattern, str(path))
    return int(match.group(1)) if match else None


def require_layer(source: Path, hook_layer: int | None) -> int:
    if hook_layer is None:
        raise SaeFormatError(source, "hook_layer is not recorded here: pass hook_layer explicitly")
    return hook_layer


def exact_tensors(tensors: dict[str, torch.Tensor], expected: Iterable[str], source: Path, what: str) -> None:
    """Refuse a file whose tensors are not exactly ``expected``, naming the first missing or extra one."""
    odd = sorted(set(tensors) ^ set(expected))
    if odd:
        raise SaeFormatError(source, f"tensor {odd[0]} is {'not part of ' + what if odd[0] in tensors else 'missing'}")


def refuse_unknown(cfg: dict[str, Any], known: Iterable[str], source: Path) -> None:
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise SaeFormatError(source, f"field {unknown[0]!r} is not one this loader knows, so it cannot tell "
                             "whether it changes the SAE's math: refused")


def refuse(source: Path, field: str, value: Any, why: str) -> SaeFormatError:
    return SaeFormatError(source, f"field {field}={value!r} is not supported: {why}")


def fold_decoder_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale each feature's pre-activation by its decoder row's norm and unit-normalise the row:
    the same encode and decode (SAELens folds ``rescale_acts_by_decoder_norm`` so on saving)."""
    norms = tensors["W_dec"].norm(dim=1)
    return {**tensors, "W_enc": tensors["W_enc"] * norms, "b_enc": tensors["b_enc"] * norms,
            "W_dec": tensors["W_dec"] / norms[:, None]}


def torch_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SaeFormatError(path, "file not found") from None
    except Exception as exc:  # torch.load raises many kinds for a corrupt or hostile file
        raise SaeFormatError(path, f"not a readable state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise SaeFormatError(path, "expected a state dict")
    return as_float32(state)


