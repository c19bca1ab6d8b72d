"""``sae-serve harvest``: write a layer's activations over a corpus as the shards ``sae-serve train``
reads (the same cache folder, resumable), computed by transformers or by vLLM with the plugin."""

from __future__ import annotations

import argparse
from pathlib import Path

from sae_serve.commands.common import add_model_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sae_serve.models import DEFAULT_HOOK_LAYER

    parser.add_argument("--layer", type=int, default=DEFAULT_HOOK_LAYER, help="decoder layer (resid_post)")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="distinct tokens to harvest")
    parser.add_argument("--ctx-len", type=int, default=256, help="tokens per context")
    parser.add_argument("--corpus", choices=["default", "small"], default="default", help="packaged corpus tier")
    parser.add_argument("--corpus-file", type=Path, default=None, help="text file; documents split by blank lines")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="hf: transformers with a forward hook; vllm: vLLM with the sae_serve plugin")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: tensor-parallel processes")
    parser.add_argument("--dtype", default="float32", help="vllm: the model's dtype (float32 as hf harvests)")
    parser.add_argument("--batch-contexts", type=int, default=None,
                        help="contexts per forward (default: 8 on hf, 256 on vllm, which batches them itself)")
    add_model_argument(parser)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from sae_serve.models import prepare_model
    from sae_serve.train.pipeline import HarvestJob, check_layer, harvested

    folder = args.model or prepare_model()
    name = args.model.name if args.model else "SmolLM2-135M-Instruct"  # (as sae-serve train names it)
    config = AutoConfig.from_pretrained(folder)
    check_layer(args.layer, getattr(config, "text_config", config).num_hidden_layers)  # before any engine starts
    job = HarvestJob(args.layer, args.tokens, args.ctx_len, args.corpus, args.corpus_file)
    if args.engine == "vllm":
        from sae_serve.engines.vllm_harvest import VllmActivations

        source = VllmActivations(folder, args.layer, args.ctx_len, dtype=args.dtype,
                                 tensor_parallel_size=args.tensor_parallel_size)
    else:
        from sae_serve.commands.common import load_model

        source, _ = load_model(args)
    store = harvested(job, source, AutoTokenizer.from_pretrained(folder), name,
                      batch_contexts=args.batch_contexts or (256 if args.engine == "vllm" else 8))
    print(store.folder)
    return 0
