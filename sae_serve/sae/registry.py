"""The SAEs and steering vectors a server or engine has loaded, by name.

Requests name SAEs and vectors; they never name files. The registry is built once from
configuration (``RegistryConfig``) and is read-only afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from sae_serve.errors import SaeFormatError, SaeMismatchError
from sae_serve.sae.features import FeatureCatalog
from sae_serve.sae.formats import load_sae
from sae_serve.sae.model import SparseAutoencoder
from sae_serve.sae.reading import read_safetensors

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class SaeEntry(BaseModel):
    """One SAE to attach to the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    """The name requests use, e.g. ``layer15``."""
    path: str
    """SAELens/sparsify folder or Gemma Scope params.npz (features.json beside it is read)."""
    hook_layer: int | None = Field(default=None, ge=0)
    """Overrides the layer recorded in the file (required for formats that lack it)."""
    watchlist: tuple[int | str, ...] | None = None
    """Features to monitor; defaults to the catalog's watchlist."""


class VectorEntry(BaseModel):
    """A named steering vector: a safetensors file holding one (d_in,) tensor named ``vector``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    """The name requests use."""
    sae: str
    """The SAE whose hook site (layer, resid point) the vector is added at."""
    path: str
    """The safetensors file."""


class ProbeEntry(BaseModel):
    """A linear probe (trained on one's own data): a safetensors file holding ``direction`` (d_in,)
    and ``bias`` (a scalar). Its value on a token is ``direction . x + bias``, with x the residual
    stream after decoder layer ``layer``, passed through a sigmoid when ``sigmoid``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    """The name guardrails use."""
    layer: int = Field(ge=0)
    """The decoder layer whose output it reads; an SAE must read the same stream (its site)."""
    path: str
    """The safetensors file."""
    sigmoid: bool = False
    """Report sigmoid(direction . x + bias), a probability, instead of the logit."""


class RegistryConfig(BaseModel):
    """The ``saes``, ``vectors`` and ``probes`` sections of the sae_serve config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    saes: tuple[SaeEntry, ...] = ()
    vectors: tuple[VectorEntry, ...] = ()
    probes: tuple[ProbeEntry, ...] = ()


@dataclass(frozen=True)
class LoadedSae:
    """An SAE ready to serve."""

    name: str
    sae: SparseAutoencoder
    catalog: FeatureCatalog
    watchlist: tuple[int, ...]
    """Resolved indices of the watched features."""


@dataclass(frozen=True)
class SteeringVector:
    name: str
    sae: str
    vector: torch.Tensor  # (d_in,)


@dataclass(frozen=True)
class LinearProbe:
    name: str
    sae: str
    """The SAE whose site (the same residual stream) the probe reads."""
    direction: torch.Tensor  # (d_in,)
    bias: float
    sigmoid: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The probe's value on each row of ``x`` (rows, d_in)."""
        logit = x.float() @ self.direction.float() + self.bias  # float32: thresholds near 1 stay meaningful
        return torch.sigmoid(logit) if self.sigmoid else logit


@dataclass(frozen=True)
class SaeRegistry:
    saes: dict[str, LoadedSae]
    vectors: dict[str, SteeringVector]
    probes: dict[str, LinearProbe] = field(default_factory=dict)

    def moved(self, device: str | torch.device, names: Collection[str]) -> SaeRegistry:
        """This registry with the SAEs ``names``, their vectors and probes on ``device`` (the SAEs
        move in place); the others stay where they were loaded."""
        for name in names:
            self.saes[name].sae.to(device)
        vectors = {key: replace(v, vector=v.vector.to(device)) if v.sae in names else v
                   for key, v in self.vectors.items()}
        probes = {key: replace(p, direction=p.direction.to(device)) if p.sae in names else p
                  for key, p in self.probes.items()}
        return SaeRegistry(self.saes, vectors, probes)

    def check_fits(self, d_model: int, num_layers: int) -> None:
        """Refuse SAEs that cannot belong to a model of this width and depth."""
        for loaded in self.saes.values():
            sae = loaded.sae
            if sae.d_in != d_model:
                raise SaeMismatchError(
                    f"SAE {loaded.name!r}: d_in={sae.d_in} but the model's hidden size is {d_model}"
                )
            if sae.hook_layer >= num_layers:
                raise SaeMismatchError(
                    f"SAE {loaded.name!r}: hook_layer={sae.hook_layer} but the model has "
                    f"{num_layers} layers (0..{num_layers - 1})"
                )


def load_entry(entry: SaeEntry, dtype: torch.dtype, device: str | torch.device) -> LoadedSae:
    sae = load_sae(entry.path, hook_layer=entry.hook_layer, dtype=dtype, device=device)
    folder = Path(entry.path)
    catalog = FeatureCatalog.load(folder if folder.is_dir() else folder.parent, sae.d_sae)
    refs = entry.watchlist if entry.watchlist is not None else catalog.watchlist
    watchlist = tuple(catalog.resolve(ref, f"saes[{entry.name}].watchlist") for ref in refs)
    return LoadedSae(entry.name, sae, catalog, watchlist)


def _load_vector(entry: VectorEntry, saes: dict[str, LoadedSae]) -> SteeringVector:
    if entry.sae not in saes:
        raise SaeMismatchError(f"vector {entry.name!r}: no SAE named {entry.sae!r} is loaded")
    sae = saes[entry.sae].sae
    tensors = read_safetensors(Path(entry.path))
    vector = tensors.get("vector")
    if vector is None or tuple(vector.shape) != (sae.d_in,):
        raise SaeFormatError(entry.path, f"expected one tensor 'vector' of shape ({sae.d_in},)")
    if not torch.isfinite(vector).all():
        raise SaeFormatError(entry.path, "tensor vector contains NaN or infinite values")
    return SteeringVector(entry.name, entry.sae, vector.to(device=sae.W_dec.device, dtype=sae.dtype))


def _load_probe(entry: ProbeEntry, saes: dict[str, LoadedSae]) -> LinearProbe:
    site = next((name for name, loaded in saes.items() if loaded.sae.site_layer == entry.layer), None)
    if site is None:
        raise SaeMismatchError(f"probe {entry.name!r} reads layer {entry.layer}, where no SAE is loaded: a probe is "
                               "read at an SAE's site (load one that reads that layer's output)")
    sae = saes[site].sae
    tensors = read_safetensors(Path(entry.path))
    direction, bias = tensors.get("direction"), tensors.get("bias")
    if direction is None or tuple(direction.shape) != (sae.d_in,) or bias is None or bias.numel() != 1:
        raise SaeFormatError(entry.path, f"expected tensors 'direction' of shape ({sae.d_in},) and a scalar 'bias'")
    if not (torch.isfinite(direction).all() and torch.isfinite(bias).all()):
        raise SaeFormatError(entry.path, "the probe contains NaN or infinite values")
    return LinearProbe(entry.name, site, direction.to(device=sae.W_dec.device, dtype=sae.dtype), float(bias),
                       entry.sigmoid)


def build_registry(
    config: RegistryConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SaeRegistry:
    names = [e.name for e in (*config.saes, *config.vectors, *config.probes)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SaeMismatchError(f"names used twice in the config: {duplicates}")
    saes = {e.name: load_entry(e, dtype, device) for e in config.saes}
    vectors = {e.name: _load_vector(e, saes) for e in config.vectors}
    return SaeRegistry(saes, vectors, {e.name: _load_probe(e, saes) for e in config.probes})


def registry_of(
    saes: dict[str, SparseAutoencoder],
    catalogs: dict[str, FeatureCatalog] | None = None,
    vectors: dict[str, tuple[str, torch.Tensor]] | None = None,
) -> SaeRegistry:
    """A registry over SAEs already in memory (tests, training, the reference engine).

    ``vectors`` maps a vector name to (SAE name, (d_in,) tensor).
    """
    catalogs = catalogs or {}
    loaded = {}
    for name, sae in saes.items():
        catalog = catalogs.get(name, FeatureCatalog(d_sae=sae.d_sae))
        loaded[name] = LoadedSae(name, sae, catalog, catalog.watchlist)
    steering = {n: SteeringVector(n, s, v) for n, (s, v) in (vectors or {}).items()}
    return SaeRegistry(loaded, steering)


def save_vector(vector: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write a steering vector file that ``VectorEntry`` can name."""
    save_file({"vector": vector.detach().cpu().contiguous()}, str(path))


def save_probe(direction: torch.Tensor, bias: float, path: str | os.PathLike[str]) -> None:
    """Write a linear probe file that ``ProbeEntry`` can name."""
    save_file({"direction": direction.detach().cpu().contiguous(), "bias": torch.tensor(float(bias))}, str(path))
