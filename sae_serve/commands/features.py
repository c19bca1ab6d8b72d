"""``sae-serve features show N | search --positive FILE --negative FILE | import-labels FILE``."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from sae_serve.commands.common import add_model_argument, add_sae_argument, load_model, read_texts, sae_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print one feature's card")
    show.add_argument("feature", help="feature index or label")
    show.add_argument("--examples", type=int, default=5, help="top examples to print")
    add_sae_argument(show)
    search = sub.add_parser("search", help="rank features by how much more they fire on positive texts")
    search.add_argument("--positive", type=Path, required=True, help="texts separated by blank lines")
    search.add_argument("--negative", type=Path, required=True, help="texts separated by blank lines")
    search.add_argument("--top", type=int, default=10)
    add_sae_argument(search)
    add_model_argument(search)
    validate = sub.add_parser("validate", help="check each label on held-out texts; record precision and recall")
    validate.add_argument("--checks", type=Path, default=None,
                          help="label_checks.json: {labels: {LABEL: {positive: [...], negative: [...]}}} "
                               "(default: the one beside the SAE)")
    add_sae_argument(validate)
    add_model_argument(validate)
    labels = sub.add_parser("import-labels", help="take descriptions and labels from a Neuronpedia export")
    labels.add_argument("file", type=Path, help="explanations: JSON lines (batch-N.jsonl.gz) or a JSON array")
    labels.add_argument("--neuronpedia-id", default=None,
                        help="MODEL/SAE as Neuronpedia and SAELens name it (default: the SAE's cfg.json "
                             "neuronpedia_id, else the export's only one)")
    labels.add_argument("--overwrite", action="store_true", help="replace labels the catalog already has")
    add_sae_argument(labels)


def saelens_neuronpedia_id(folder: Path) -> str | None:
    """The ``neuronpedia_id`` SAELens records in cfg.json (under metadata since v6), if any."""
    path = folder / "cfg.json"
    if not path.exists():
        return None
    cfg = json.loads(path.read_text())
    return cfg.get("neuronpedia_id") or (cfg.get("metadata") or {}).get("neuronpedia_id")


def _examples(folder: Path) -> dict:
    path = folder / "examples.json.gz"
    if not path.exists():
        return {"examples": [], "promoted_tokens": []}
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _describe(index: int, catalog, extras: dict, n_examples: int) -> str:
    info = catalog.info(index)
    lines = [f"feature {index}" + (f"  {info.label!r}" if info.label else "")]
    if info.tags:
        lines.append(f"  tags:           {', '.join(info.tags)}")
    if info.max_activation is not None:
        lines.append(f"  max activation: {info.max_activation:.3f}")
    if info.density is not None:
        lines.append(f"  density:        {info.density:.5f}")
    if info.description:
        lines.append(f"  description:    {info.description}")
    if info.precision is not None:
        lines.append(f"  label check:    precision {info.precision:.2f}, recall {info.recall:.2f} "
                     f"on {info.checked_texts} held-out texts")
    if index < len(extras["promoted_tokens"]):
        lines.append(f"  promotes:       {extras['promoted_tokens'][index]}")
    for ex in (extras["examples"][index] if index < len(extras["examples"]) else [])[:n_examples]:
        lines.append(f"  {ex['activation']:8.3f}  {_text(ex)}")
    quantiles = extras.get("quantile_examples", [])
    if index < len(quantiles) and quantiles[index]:
        lines.append("  by activation interval:")
        lines.extend(f"  {ex['interval']:>18}  {ex['activation']:8.3f}  {_text(ex)}" for ex in quantiles[index])
    return "\n".join(lines)


def _text(ex: dict) -> str:
    return f"{ex['before']}[[{ex['token']}]]{ex['after']}".replace("\n", "\\n")


def run(args: argparse.Namespace) -> int:
    from sae_serve.sae.features import FeatureCatalog
    from sae_serve.sae.formats import load_sae

    folder = sae_path(args)
    sae = load_sae(folder)
    catalog = FeatureCatalog.load(folder if folder.is_dir() else folder.parent, sae.d_sae)
    extras = _examples(folder if folder.is_dir() else folder.parent)
    if args.action == "import-labels":
        from sae_serve.sae.labels import import_labels, read_explanations

        source = args.neuronpedia_id or saelens_neuronpedia_id(folder if folder.is_dir() else folder.parent)
        catalog, count = import_labels(catalog, read_explanations(args.file), args.file, source, args.overwrite)
        path = catalog.save(folder if folder.is_dir() else folder.parent)
        print(f"{count} features described from {args.file}; wrote {path}")
        return 0
    if args.action == "validate":
        from sae_serve.train.label_checks import CHECKS_FILE, read_checks, validated_catalog

        checks_path = args.checks or (folder if folder.is_dir() else folder.parent) / CHECKS_FILE
        model, tokenizer = load_model(args)
        catalog = validated_catalog(catalog, sae, model, tokenizer, read_checks(checks_path), checks_path)
        catalog.save(folder if folder.is_dir() else folder.parent)
        print(f"{'label':<22} {'feature':>7} {'precision':>9} {'recall':>6}  texts")
        for check in read_checks(checks_path):
            index = catalog.resolve(check.label, "label")
            info = catalog.info(index)
            print(f"{check.label:<22} {index:>7} {info.precision:>9.2f} {info.recall:>6.2f}  {info.checked_texts}")
        return 0
    if args.action == "show":
        ref = int(args.feature) if args.feature.isascii() and args.feature.isdigit() else args.feature
        print(_describe(catalog.resolve(ref, "feature"), catalog, extras, args.examples))
        return 0
    from sae_serve.train.calibrate import contrastive_scores

    model, tokenizer = load_model(args)
    scores = contrastive_scores(sae, model, tokenizer, read_texts(args.positive), read_texts(args.negative))
    print(f"{'feature':>8} {'score':>8}  label (precision/recall of its held-out check)")
    for index in scores.topk(args.top).indices.tolist():
        info = catalog.info(index)
        checked = f" ({info.precision:.2f}/{info.recall:.2f})" if info.precision is not None else ""
        tokens = [ex["token"] for ex in extras["examples"][index][:4]] if extras["examples"] else []
        print(f"{index:>8} {scores[index]:>8.3f}  {info.label or ''}{checked}  {tokens}")
    return 0
