"""``sae-serve sweep``: train a (features x tokens) grid, fit power laws, recommend a size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sae_serve.commands.common import add_model_argument, load_model


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sae_serve.models import DEFAULT_HOOK_LAYER

    parser.add_argument("--out", type=Path, required=True, help="folder for sweep.json and sweep.png")
    parser.add_argument("--widths", type=_ints, default=[256, 512, 1024], help="comma-separated d_sae values")
    parser.add_argument("--tokens", type=_ints, default=[50_000, 100_000, 200_000], help="comma-separated")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--layer", type=int, default=DEFAULT_HOOK_LAYER)
    parser.add_argument("--budget-flops", type=float, default=1e15, help="compute budget to recommend a size for")
    parser.add_argument("--corpus", choices=["default", "small"], default="default")
    parser.add_argument("--corpus-file", type=Path, default=None)
    add_model_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from sae_serve.train.activations import tokenize_contexts
    from sae_serve.train.calibrate import context_chunks
    from sae_serve.train.evaluate import reconstruction_metrics
    from sae_serve.train.pipeline import HarvestJob, corpus_texts, harvested
    from sae_serve.train.scaling import SweepRun, fit_sweep, plot_sweep
    from sae_serve.train.trainer import TrainConfig, Trainer

    model, tokenizer = load_model(args)
    store = harvested(HarvestJob(args.layer, max(args.tokens), corpus=args.corpus, corpus_file=args.corpus_file),
                      model, tokenizer, "sweep")
    held = tokenize_contexts(corpus_texts(args.corpus, args.corpus_file, "heldout"), tokenizer, 256, 16 * 256)
    held_acts = torch.cat(list(context_chunks(model, held, args.layer)))
    runs = []
    for tokens in args.tokens:
        for width in args.widths:
            cfg = TrainConfig("batchtopk", d_sae=width, k=args.k, total_tokens=tokens, batch_size=args.batch_size)
            trainer = Trainer(cfg, store.meta()["d_in"])
            trainer.fit(store.batches(cfg.batch_size, seed=1))
            metrics = reconstruction_metrics(trainer.export(store.meta()["scale"], args.layer), held_acts)
            runs.append(SweepRun(width, cfg.steps * cfg.batch_size, metrics.fvu, metrics.l0))
            print(f"d_sae={width:>6} tokens={tokens:>10}  FVU={metrics.fvu:.4f}  L0={metrics.l0:.1f}", flush=True)
    d_in = store.meta()["d_in"]
    fit = fit_sweep(runs, d_in)
    width, tokens = fit.recommend(args.budget_flops)
    print(f"FVU ~ {fit.loss.coefficient:.3g} * C^{fit.loss.exponent:.3f};  "
          f"F_opt ~ C^{fit.features.exponent:.3f};  D_opt ~ C^{fit.tokens.exponent:.3f}")
    print(f"for {args.budget_flops:.3g} FLOPs: d_sae ~ {width}, tokens ~ {tokens}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps({
        "runs": [r.__dict__ for r in runs], "fvu_vs_compute": fit.loss.__dict__,
        "optimal_features_vs_compute": fit.features.__dict__, "optimal_tokens_vs_compute": fit.tokens.__dict__,
        "recommendation": {"flops": args.budget_flops, "d_sae": width, "tokens": tokens}}, indent=1))
    print(plot_sweep(runs, fit, d_in, args.out / "sweep.png"))
    return 0
