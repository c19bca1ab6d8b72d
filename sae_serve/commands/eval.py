"""``sae-serve eval``: FVU, L0, dead/dense fractions and spliced Delta CE on held-out text."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from sae_serve.commands.common import (
    add_corpus_arguments,
    add_model_argument,
    add_sae_argument,
    corpus_contexts,
    load_model,
    sae_path,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sae_argument(parser, positional=True)
    add_corpus_arguments(parser, contexts=32)
    parser.add_argument("--write-card", action="store_true", help="write model_card.json beside the SAE")
    add_model_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from sae_serve.errors import SaeMismatchError
    from sae_serve.sae.formats import load_sae
    from sae_serve.train.calibrate import context_chunks
    from sae_serve.train.evaluate import model_card, reconstruction_metrics, splice_metrics

    folder = sae_path(args)
    sae = load_sae(folder)
    model, tokenizer = load_model(args)
    if sae.d_in != model.config.hidden_size:
        raise SaeMismatchError(f"{folder}: d_in={sae.d_in} but the model's hidden size is {model.config.hidden_size}")
    contexts = corpus_contexts(args, tokenizer, "heldout")
    recon = reconstruction_metrics(sae, torch.cat(list(context_chunks(model, contexts, sae.site_layer))))
    splice = splice_metrics(model, sae, contexts)
    rows = {**asdict(recon), **asdict(splice)}
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.write_card:
        (folder / "model_card.json").write_text(json.dumps(model_card(recon, splice), indent=1))
    return 0
