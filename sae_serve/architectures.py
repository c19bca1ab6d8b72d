"""Where a model keeps its decoder layers, and what a layer returns: the one place that knows model families.

A model's residual stream after decoder layer L is what the SAE at L reads and what steering edits.
Two kinds of decoder layer carry it:
- ``deferred``: vLLM's own layers listed in DEFERRED_LAYERS (Llama, Mistral, Qwen2/3, Qwen3-MoE,
  Gemma 1/2/3, Phi-3) return ``(hidden, residual)``; vLLM defers the residual add into the next
  layer's fused norm, so the stream is hidden + residual.
- ``stream``: transformers' own layers, which vLLM runs through its Transformers backend (OLMo 2 in
  vLLM 0.32, any model with ``--model-impl transformers``), return the stream itself (or a tuple
  led by it).
Any other layer is refused at load, naming the architecture and the layer: steering a tensor that
is not the stream would be a silent wrong answer. The check is per wrapped layer, so hybrid models
whose other layers differ are judged by the layer the SAE reads.

The layers are the causal LM's ``model.layers``; in a multimodal model, its language model's
(vLLM's ``get_language_model()``, transformers' ``language_model``). Under pipeline parallelism a
process runs a slice of them; vLLM puts placeholders in the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from sae_serve.errors import SaeServeError

Returns = Literal["deferred", "stream"]

# vLLM's own layers whose (hidden, residual) return was read and tested to mean stream = hidden +
# residual (tests/engines/test_architectures.py). The signature alone does not tell: some layers
# with the same one add the residual themselves and return (stream, an earlier residual), e.g.
# Cohere's, EXAONE 4's and PhiMoE's; others return (hidden, None) or three values.
DEFERRED_LAYERS = frozenset({
    "LlamaDecoderLayer",  # Llama, Phi-3, SmolLM2 and other Llama-architecture models
    "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "Qwen3MoeDecoderLayer",
    "GemmaDecoderLayer",  # Gemma, and PaliGemma's language model
    "Gemma2DecoderLayer", "Gemma3DecoderLayer",
})
VLLM_MODELS = "vllm.model_executor.models."


@dataclass(frozen=True)
class DecoderStack:
    """A model's decoder layers, and which of them this process runs."""

    architecture: str
    layers: nn.ModuleList
    owned: frozenset[int]
    """All of them, or a pipeline stage's (the rest are vLLM's placeholders, PPMissingLayer)."""
    owner: nn.Module
    """The module whose ``layers`` they are (vLLM's runs ``layers[start_layer:end_layer]``)."""

    def stop_after(self, index: int) -> bool:
        """Run layers only up to ``index`` (harvesting), where the stack allows it: vLLM's forward
        reads ``end_layer``, the same bound pipeline stages use (a pipeline stage, or transformers'
        layers through vLLM's Transformers backend, run them all). What the model samples then is
        meaningless."""
        if len(self.owned) < len(self.layers) or not isinstance(getattr(self.owner, "end_layer", None), int):
            return False
        self.owner.end_layer = min(self.owner.end_layer, index + 1)
        return True

    def returns(self, index: int) -> Returns:
        """How to find the residual stream in what layer ``index`` returns (refused when unknown)."""
        layer = self.layers[index]
        name, module = type(layer).__name__, type(layer).__module__
        if module.startswith(VLLM_MODELS) and name in DEFERRED_LAYERS:
            return "deferred"
        if module.split(".")[0] in ("transformers", "transformers_modules"):  # vLLM's Transformers backend
            return "stream"
        raise SaeServeError(f"sae_serve does not support {self.architecture} yet: its decoder layer {name} "
                            f"({module}) is not one whose output sae_serve knows how to read (vLLM's "
                            f"{', '.join(sorted(DEFERRED_LAYERS))}, or transformers' layers through vLLM's "
                            "Transformers backend, --model-impl transformers)")


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
    owner = next((found for found in (getattr(text, "model", None), text)
                  if isinstance(found, nn.Module) and isinstance(getattr(found, "layers", None), nn.ModuleList)), None)
    if owner is None:
        raise SaeServeError(f"sae_serve cannot find the decoder layers of {architecture} ({type(text).__name__} "
                            "has no model.layers)")
    layers = owner.layers
    owned = frozenset(i for i, layer in enumerate(layers) if type(layer).__name__ != "PPMissingLayer")
    return DecoderStack(architecture, layers, owned, owner)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """A transformers model's decoder layers (training, evaluation and the reference engine hook them)."""
    return decoder_stack(model, type(model).__name__).layers


def _attr_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj
