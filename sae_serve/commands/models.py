"""``sae-serve models prepare | path``."""

from __future__ import annotations

import argparse

from tqdm import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("prepare", help="convert the packaged GGUF into a model folder (once; cached)")
    sub.add_parser("path", help="print the model folder (prepare first)")


def run(args: argparse.Namespace) -> int:
    from sae_serve.models import MARKER, model_dir, prepare_model

    if args.action == "path":
        folder = model_dir()
        if not (folder / MARKER).exists():
            print(f"not prepared yet: run `sae-serve models prepare` (would be {folder})")
            return 1
        print(folder)
        return 0
    with tqdm(total=100, desc="default model", unit="%", file=None) as bar:
        folder = prepare_model(progress=lambda f: bar.update(round(100 * f) - bar.n))
    print(folder)
    return 0
