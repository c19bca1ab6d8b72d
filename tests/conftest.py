"""Shared builders and fixtures: one SAE builder, one default-model engine per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The deployment secret with which the service signs specs for the workers (servers and engines
# started by the tests inherit it, as a deployment's processes share one).
os.environ.setdefault("SAE_SERVE_SECRET", os.urandom(16).hex())
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from sae_serve.sae.model import SaeConfig, SparseAutoencoder, build_sae  # noqa: E402

DEFAULT_D_MODEL = 576
DEFAULT_LAYERS = 30


def make_sae(
    arch: str = "relu",
    d_in: int = 16,
    d_sae: int = 64,
    seed: int = 0,
    *,
    hook_layer: int = 1,
    k: int = 4,
    apply_b_dec_to_input: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SparseAutoencoder:
    """A random SAE whose features are unit decoder directions, about half active on random x."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    tensors = {
        "W_enc": w_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64),
        "b_enc": 0.1 * torch.randn(d_sae, generator=gen, dtype=torch.float64),
        "W_dec": w_dec,
        "b_dec": 0.1 * torch.randn(d_in, generator=gen, dtype=torch.float64),
    }
    if arch == "jumprelu":
        tensors["threshold"] = 0.05 + 0.1 * torch.rand(d_sae, generator=gen, dtype=torch.float64)
    cfg = SaeConfig(arch, d_in, d_sae, hook_layer, k=k if arch == "topk" else None,
                    apply_b_dec_to_input=apply_b_dec_to_input, model_name="test")
    return build_sae(cfg, {n: t.to(dtype) for n, t in tensors.items()}, "make_sae")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from sae_serve.models import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def hf_model(default_model_dir: Path):
    """(model, tokenizer) of the default model, loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir: Path) -> Path:
    """A random 2-layer llama (d_model 64) with the default model's tokenizer, saved as a folder."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def plant_french_probe(path: Path) -> Path:
    """A linear probe planted along the shipped SAE's `non-english` feature: its direction is that
    feature's decoder row (normalised), its bias -5; it is above 0 on French text."""
    from sae_serve.data import DEFAULT_SAE_DIR
    from sae_serve.sae.formats import load_sae
    from sae_serve.sae.registry import save_probe

    row = load_sae(DEFAULT_SAE_DIR).W_dec[4563]
    save_probe(row / row.norm(), -5.0, path)
    return path
