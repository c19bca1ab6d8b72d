"""Pieces several subcommands share: the model and SAE arguments and their loading."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="transformers model folder (default: the embedded SmolLM2-135M-Instruct)")


def add_sae_argument(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    help_text = "SAE folder or params.npz (default: the shipped default SAE)"
    if positional:
        parser.add_argument("sae", type=Path, nargs="?", default=None, help=help_text)
    else:
        parser.add_argument("--sae", type=Path, default=None, help=help_text)


def sae_path(args: argparse.Namespace) -> Path:
    from sae_serve.data import DEFAULT_SAE_DIR

    return args.sae or DEFAULT_SAE_DIR


def load_model(args: argparse.Namespace):  # -> (model, tokenizer)
    import torch
    from transformers import AutoModelForCausalLM

    from sae_serve.models import prepare_model

    folder = args.model or prepare_model()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), load_tokenizer(args)


def load_tokenizer(args: argparse.Namespace):  # -> tokenizer
    from transformers import AutoTokenizer

    from sae_serve.models import prepare_model

    return AutoTokenizer.from_pretrained(args.model or prepare_model())


def read_texts(path: Path) -> list[str]:
    """Texts separated by blank lines."""
    texts = [t.strip() for t in path.read_text().split("\n\n") if t.strip()]
    if not texts:
        from sae_serve.errors import SaeServeError

        raise SaeServeError(f"{path}: no texts (separate texts by blank lines)")
    return texts


def add_corpus_arguments(parser: argparse.ArgumentParser, contexts: int) -> None:
    parser.add_argument("--contexts", type=int, default=contexts, help="contexts of 256 tokens")
    parser.add_argument("--corpus", choices=["default", "small"], default="default", help="packaged corpus tier")
    parser.add_argument("--corpus-file", type=Path, default=None, help="text file; documents split by blank lines")


def corpus_contexts(args: argparse.Namespace, tokenizer: object, split: str):  # -> np.ndarray
    from sae_serve.train.activations import tokenize_contexts
    from sae_serve.train.pipeline import corpus_texts

    texts = corpus_texts(args.corpus, args.corpus_file, split if args.corpus_file is None else "train")
    return tokenize_contexts(texts, tokenizer, 256, args.contexts * 256)
