"""``sae-serve <subcommand>``: each subcommand lives in its own lazily imported module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sae_serve.errors import SaeServeError

# subcommand -> module under sae_serve.commands with add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "models": "Prepare and locate the embedded default model.",
    "features": "Show a feature's card; find features by contrastive search.",
    "harvest": "Harvest a layer's activations over a corpus (transformers or vLLM) for train.",
    "train": "Harvest activations and train an SAE (paper ReLU, TopK, BatchTopK).",
    "eval": "Evaluate an SAE on held-out text: FVU, L0, dead, Delta CE, loss recovered.",
    "sae": "Check an SAE (any supported format) against a model before deploying it.",
    "calibrate": "Calibrate features: max activation, density, top examples, promoted tokens.",
    "sweep": "Train a (features x tokens) grid and fit scaling laws.",
    "serve": "Serve a model with SAE steering over the OpenAI-compatible API.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-serve", description="Production feature steering for LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"sae_serve.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(f"sae_serve.commands.{args.command}")
    try:
        return module.run(args)
    except SaeServeError as exc:
        print(f"sae-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
