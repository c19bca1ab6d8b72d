"""``sae-serve train``: harvest a layer's activations and train an SAE on them (resumable). Under
``torchrun --nproc-per-node N`` the processes train data-parallel (one result, written once)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from sae_serve.commands.common import add_model_argument, load_model, load_tokenizer
from sae_serve.errors import SaeServeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sae_serve.models import DEFAULT_HOOK_LAYER

    parser.add_argument("--out", type=Path, required=True, help="output folder (resumes if it has a checkpoint)")
    parser.add_argument("--layer", type=int, default=DEFAULT_HOOK_LAYER, help="decoder layer (resid_post)")
    parser.add_argument("--architecture", choices=["relu", "topk", "batchtopk"], default="batchtopk",
                        help="relu: the paper's L1 recipe; batchtopk exports as jumprelu")
    parser.add_argument("--d-sae", type=int, default=4608, help="number of features")
    parser.add_argument("--k", type=int, default=32, help="active features per token (topk, batchtopk)")
    parser.add_argument("--l1-coefficient", type=float, default=5.0, help="lambda of the relu recipe")
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-5 relu, 2e-4/sqrt(F/2^14) otherwise")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="distinct tokens to harvest")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the harvested tokens")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    parser.add_argument("--ctx-len", type=int, default=256, help="tokens per context")
    parser.add_argument("--corpus", choices=["default", "small"], default="default", help="packaged corpus tier")
    parser.add_argument("--corpus-file", type=Path, default=None, help="text file; documents split by blank lines")
    parser.add_argument("--seed", type=int, default=0)
    add_model_argument(parser)


def run(args: argparse.Namespace) -> int:
    from sae_serve.train.distributed import Ranks
    from sae_serve.train.pipeline import HarvestJob, TrainJob, run_training
    from sae_serve.train.trainer import TrainConfig

    config = TrainConfig(args.architecture, d_sae=args.d_sae, k=args.k, l1_coefficient=args.l1_coefficient,
                         lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         total_tokens=int(args.tokens * args.epochs))
    job = TrainJob(args.out, config, HarvestJob(args.layer, args.tokens, args.ctx_len, args.corpus, args.corpus_file))
    if args.batch_size % (ranks := Ranks.from_env()).world:
        raise SaeServeError(f"--batch-size {args.batch_size} does not divide among {ranks.world} processes")
    # Only the first process harvests: the others read its shards and need no model.
    model, tokenizer = load_model(args) if ranks.main else (None, load_tokenizer(args))
    name = (args.model.name if args.model else "SmolLM2-135M-Instruct")
    with tqdm(total=config.steps, desc="train", unit="step", disable=not ranks.main) as bar:
        def on_log(stats) -> None:
            bar.update(stats.step - bar.n)
            bar.set_postfix(loss=f"{stats.loss:.4f}", fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.1f}",
                            dead=f"{stats.dead_fraction:.3f}")
        run_training(job, model, tokenizer, name, on_log, ranks)
    ranks.close()
    if ranks.main:
        print(args.out)
    return 0
