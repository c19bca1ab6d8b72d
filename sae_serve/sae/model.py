"""What an SAE is: a dictionary of ``d_sae`` feature directions for one residual-stream site.

    a = act(W_enc^T (x - b_dec * apply_b_dec_to_input) + b_enc)      # (tokens, d_sae)
    x_hat = a W_dec + b_dec                                          # (tokens, d_in)

``act`` is ReLU (the paper's "standard" SAE), JumpReLU (per-feature threshold; BatchTopK SAEs are
exported this way) or TopK. For ReLU and JumpReLU feature i depends only on encoder column i, so
``encode_subset`` computes a few features without touching the rest (DESIGN.md, "cost model").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from sae_serve.errors import SaeFormatError, SaeServeError

Architecture = Literal["relu", "topk", "jumprelu"]
HookPoint = Literal["resid_post", "resid_pre"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
HOOK_POINTS: tuple[str, ...] = get_args(HookPoint)


@dataclass(frozen=True)
class SaeConfig:
    """Everything needed to rebuild an SAE besides its tensors."""

    architecture: Architecture
    """Activation function: ``relu`` (the paper's), ``topk`` or ``jumprelu``."""
    d_in: int
    """Width of the residual stream it reads (the model's hidden size)."""
    d_sae: int
    """Number of features in the dictionary."""
    hook_layer: int
    """Index of the decoder layer whose residual stream the SAE reads."""
    hook_point: HookPoint = "resid_post"
    """``resid_post``: the output of decoder layer ``hook_layer``; ``resid_pre``: its input."""
    model_name: str | None = None
    """The model the SAE was trained on, when known."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from x before encoding (SAELens/sparsify do; the paper does not)."""
    k: int | None = None
    """Active features per token, TopK SAEs only."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.hook_point not in HOOK_POINTS:
            raise ValueError(f"hook_point must be one of {HOOK_POINTS}, got {self.hook_point!r}")
        for name in ("d_in", "d_sae"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hook_layer < 0:
            raise ValueError(f"hook_layer must be >= 0, got {self.hook_layer}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise ValueError(f"k must be in 1..d_sae={self.d_sae} for a topk SAE, got {self.k}")

    @property
    def hook_name(self) -> str:
        """The TransformerLens-style name SAELens uses, e.g. ``blocks.15.hook_resid_post``."""
        return f"blocks.{self.hook_layer}.hook_{self.hook_point}"


class FeatureSubset(NamedTuple):
    """The encoder slices of a few features, gathered once so each use is two small matmuls."""

    features: torch.Tensor  # (m,) long
    w_enc: torch.Tensor  # (d_in, m)
    b_enc: torch.Tensor  # (m,)
    threshold: torch.Tensor | None  # (m,) jumprelu only


def _expected_shapes(cfg: SaeConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


class SparseAutoencoder(nn.Module):
    """Base class: the affine encoder and decoder. Subclasses supply the activation."""

    architecture: ClassVar[str]

    def __init__(self, cfg: SaeConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_gemm: Callable[[torch.Tensor], torch.Tensor] | None = None
        """(rows, d_in) -> (rows, d_sae) pre-activations, when an engine has a faster GEMM than
        torch's for them (``vllm_site``: vLLM's own on a CPU); None: ``F.linear``."""
        for name, tensor in tensors.items():
            if name == "W_enc":  # held as (d_sae, d_in) rows: see ``encoder_rows``
                self.register_buffer(name, tensor.detach().T.clone(memory_format=torch.contiguous_format).T)
            else:
                self.register_buffer(name, tensor.detach().clone(memory_format=torch.contiguous_format))

    # --- the pieces every architecture shares ---------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def hook_layer(self) -> int:
        return self.cfg.hook_layer

    @property
    def hook_point(self) -> str:
        return self.cfg.hook_point

    @property
    def site_layer(self) -> int:
        """The decoder layer whose output the SAE reads: resid_pre of L is the output of L-1
        (-1 for resid_pre of layer 0: the embeddings, which no decoder layer outputs)."""
        return self.hook_layer - (self.hook_point == "resid_pre")

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def encoder_rows(self) -> torch.Tensor:
        """W_enc as (d_sae, d_in), one row per feature, without a copy: W_enc (d_in, d_sae) is kept
        as a transposed view of these rows, so a feature subset gathers contiguous rows and the
        fixed-shape op needs no second copy of the encoder (d_in x d_sae more GPU memory)."""
        return self.W_enc.T

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae): the encoder's affine part."""
        x = self._encoder_input(x)
        if self.encoder_gemm is not None and x.dim() == 2:
            return self.encoder_gemm(x)
        return F.linear(x, self.encoder_rows, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) feature activations."""
        return self._activate(self.pre_activations(x))

    def subset(self, features: torch.Tensor) -> FeatureSubset:
        """Gather what ``encode_subset`` needs for ``features`` (exact for relu and jumprelu)."""
        threshold = getattr(self, "threshold", None)
        return FeatureSubset(features, self.W_enc[:, features].contiguous(), self.b_enc[features],
                             None if threshold is None else threshold[features])

    def encode_subset(self, x: torch.Tensor, features: torch.Tensor | FeatureSubset) -> torch.Tensor:
        """(..., d_in) -> (..., len(features)): equals ``encode(x)[..., features]``."""
        sub = features if isinstance(features, FeatureSubset) else self.subset(features)
        return self._activate_subset(self._encoder_input(x) @ sub.w_enc + sub.b_enc, sub)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in)."""
        return acts.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat."""
        return self.decode(self.encode(x))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The SAE's tensors by their SAELens names, contiguous as files hold them (W_enc is a
        copy: the SAE keeps it as feature rows)."""
        return {name: buf.contiguous() for name, buf in self.named_buffers()}

    # --- what each architecture defines ---------------------------------------------------
    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _activate_subset(self, pre: torch.Tensor, sub: FeatureSubset) -> torch.Tensor:
        raise NotImplementedError


class ReluSAE(SparseAutoencoder):
    """The paper's SAE (SAELens "standard")."""

    architecture = "relu"

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def _activate_subset(self, pre: torch.Tensor, sub: FeatureSubset) -> torch.Tensor:
        return torch.relu(pre)


class JumpReluSAE(SparseAutoencoder):
    """Gemma Scope's JumpReLU: a_i = relu(z_i) if z_i > threshold_i else 0. The relu matters for
    thresholds <= 0 (an unset BatchTopK threshold, some trained ones): as SAELens and Gemma Scope
    compute it, never a negative activation."""

    architecture = "jumprelu"

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def _activate_subset(self, pre: torch.Tensor, sub: FeatureSubset) -> torch.Tensor:
        return torch.relu(pre) * (pre > sub.threshold)


class TopKSAE(SparseAutoencoder):
    """Gao et al.'s TopK: keep the k largest pre-activations (then ReLU), as SAELens does."""

    architecture = "topk"

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        top = torch.topk(pre, k=self.cfg.k or 0, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    def subset(self, features: torch.Tensor) -> FeatureSubset:
        raise SaeServeError("encode_subset: a topk SAE's activations depend on all features; use encode()")


SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (ReluSAE, JumpReluSAE, TopKSAE)
}


def build_sae(cfg: SaeConfig, tensors: dict[str, torch.Tensor], source: str) -> SparseAutoencoder:
    """Check shapes and values, then build the SAE. ``source`` names the file in errors."""
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise SaeFormatError(source, f"missing tensor(s) {missing} for a {cfg.architecture} SAE")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise SaeFormatError(
                source, f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        if not tensor.is_floating_point():
            raise SaeFormatError(source, f"tensor {name} has dtype {tensor.dtype}, expected a float")
        if not torch.isfinite(tensor).all():
            raise SaeFormatError(source, f"tensor {name} contains NaN or infinite values")
    extra = sorted(set(tensors) - set(expected))
    if extra:  # a tensor the math would ignore means the file computes something else
        raise SaeFormatError(source, f"tensor {extra[0]} is not part of a {cfg.architecture} SAE")
    return SAE_CLASSES[cfg.architecture](cfg, dict(tensors))


def with_hook_layer(cfg: SaeConfig, hook_layer: int | None) -> SaeConfig:
    """The same config at another layer (formats that do not record it take it from the caller)."""
    return cfg if hook_layer is None else replace(cfg, hook_layer=hook_layer)
