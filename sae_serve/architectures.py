"""Where a model keeps its decoder layers, and what a layer returns: the one place that knows model families.

A model's residual stream after decoder layer L is what the SAE at L reads and what steering edits.
Two kinds of decoder layer carry it, told apart by their code rather than by a list of names, so a
new model of a known kind works unchanged:
- ``deferred``: vLLM's own layers (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE
  and most others) take ``(positions, hidden_states, residual)`` and return ``(hidden, residual)``;
  vLLM defers the residual add into the next layer's fused norm, so the stream is hidden + residual.
- ``stream``: transformers' own layers, which vLLM runs through its Transformers backend (OLMo 2 in
  vLLM 0.32, and any model vLLM has no code for), return the stream itself (or a tuple led by it).
Anything else is refused at load with the architecture's name: steering a tensor that is not the
stream would be a silent wrong answer.

The layers are the causal LM's ``model.layers``; in a multimodal model, its language model's
(vLLM's ``get_language_model()``, transformers' ``language_model``). Under pipeline parallelism a
process runs a slice of them; vLLM puts placeholders in the others.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from sae_serve.errors import SaeServeError

Returns = Literal["deferred", "stream"]


@dataclass(frozen=True)
class DecoderStack:
    """A model's decoder layers and how to find the residual stream in what they return."""

    architecture: str
    layers: nn.ModuleList
    returns: Returns
    owned: frozenset[int]
    """The layers this process runs: all of them, or a pipeline stage's (the rest are vLLM's
    placeholders, PPMissingLayer)."""


def language_model(model: nn.Module) -> nn.Module:
    """The text decoder of a multimodal model (vLLM and transformers spell it differently), else the model."""
    if hasattr(model, "get_language_model"):  # vLLM's SupportsMultiModal
        inner = model.get_language_model()
        if inner is not None and inner is not model:
            return language_model(inner)
    for path in ("model.language_model", "language_model"):  # transformers' VLMs
        inner = _attr_path(model, path)
        if isinstance(inner, nn.Module):
            return inner
    return model


def decoder_stack(model: nn.Module, architecture: str) -> DecoderStack:
    """``model``'s decoder layers (a vLLM model, or a transformers causal LM for the reference engine)."""
    text = language_model(model)
    layers = next((found for path in ("model.layers", "layers")
                   if isinstance(found := _attr_path(text, path), nn.ModuleList)), None)
    if layers is None:
        raise SaeServeError(f"sae_serve cannot find the decoder layers of {architecture} ({type(text).__name__} "
                            "has no model.layers)")
    owned = frozenset(i for i, layer in enumerate(layers) if type(layer).__name__ != "PPMissingLayer")
    first = min(owned, default=0)
    return DecoderStack(architecture, layers, _returns(architecture, layers[first]), owned)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """A transformers model's decoder layers (training, evaluation and the reference engine hook them)."""
    return decoder_stack(model, type(model).__name__).layers


def _returns(architecture: str, layer: nn.Module) -> Returns:
    module = type(layer).__module__
    params = list(inspect.signature(type(layer).forward).parameters)
    if module.startswith("vllm.") and params[1:4] == ["positions", "hidden_states", "residual"]:
        return "deferred"
    if module.startswith("transformers."):
        return "stream"
    raise SaeServeError(f"sae_serve does not support {architecture}: its decoder layer {type(layer).__name__} "
                        f"({module}) returns neither (hidden, residual) like vLLM's Llama nor the stream like "
                        "transformers' layers, so the residual stream cannot be located")


def _attr_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj
