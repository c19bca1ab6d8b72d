"""``sae-serve calibrate``: per-feature max activation, density, top examples, promoted tokens."""

from __future__ import annotations

import argparse

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
    add_corpus_arguments(parser, contexts=512)
    add_model_argument(parser)


def run(args: argparse.Namespace) -> int:
    from sae_serve.sae.features import FeatureCatalog
    from sae_serve.sae.formats import load_sae
    from sae_serve.train.calibrate import (
        calibrated_catalog,
        context_chunks,
        examples,
        feature_stats,
        promoted_tokens,
        quantile_examples,
        quantile_samples,
        write_examples,
    )

    folder = sae_path(args)
    sae = load_sae(folder)
    model, tokenizer = load_model(args)
    contexts = corpus_contexts(args, tokenizer, "train")
    stats = feature_stats(sae, context_chunks(model, contexts, sae.site_layer))
    catalog = calibrated_catalog(FeatureCatalog.load(folder, sae.d_sae), stats)
    print(catalog.save(folder))
    promoted = promoted_tokens(sae, model.lm_head.weight, tokenizer)
    # A second pass: the activation intervals are fractions of the max the first pass found.
    values, rows = quantile_samples(sae, context_chunks(model, contexts, sae.site_layer), stats.max_activation)
    print(write_examples(folder, examples(stats, contexts, tokenizer), promoted,
                         quantile_examples(values, rows, contexts, tokenizer)))
    return 0
