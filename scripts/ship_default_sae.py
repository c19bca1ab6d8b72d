"""Assemble the shipped default SAE from a device training run (scripts/device/train_default.py).

    python scripts/ship_default_sae.py --run ~/.cache/sae_serve/device_run

Writes sae_serve/data/saes/<name>/: the SAE in SAELens layout; features.json (max activation and
density from the run's calibration over all its tokens, plus the curated labels, tags and
watchlist of scripts/default_sae_labels.json); examples.json.gz (top contexts and promoted
tokens per feature); model_card.json (metrics recomputed here, on CPU, on held-out contexts,
which are kept as heldout_sample.npy so tests can recompute them); training_report.json with the
loss curve, the paper-recipe ReLU comparison and the sweep, and their plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_serve import envs
from sae_serve.data import DEFAULT_SAE_DIR
from sae_serve.models import prepare_model
from sae_serve.sae.features import FeatureCatalog, FeatureInfo
from sae_serve.sae.formats import save_sae
from sae_serve.sae.model import SaeConfig, build_sae
from sae_serve.train.calibrate import (
    FeatureStats,
    calibrated_catalog,
    context_chunks,
    examples,
    promoted_tokens,
    quantile_examples,
    quantile_samples,
    write_examples,
)
from sae_serve.train.evaluate import model_card, reconstruction_metrics, splice_metrics
from sae_serve.train.scaling import SweepRun, fit_sweep, plot_history, plot_sweep

LABELS = Path(__file__).with_name("default_sae_labels.json")
SWEEP_FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # train_default.py's grid: token fractions x widths


def curated_catalog(d_sae: int) -> FeatureCatalog:
    curated = json.loads(LABELS.read_text())
    features = {int(f): FeatureInfo(**info) for f, info in curated["features"].items()}
    return FeatureCatalog(d_sae=d_sae, features=features, watchlist=tuple(curated["watchlist"]))


def sweep_runs(report: dict) -> list[SweepRun]:
    """The device sweep, with each run's training tokens (its report stored only eval tokens)."""
    n, runs = report["train_tokens"], []
    widths = sorted({s["d_sae"] for s in report["sweep"]})
    for i, s in enumerate(report["sweep"]):
        tokens = max(4096, int(n * SWEEP_FRACTIONS[i // len(widths)])) // 4096 * 4096
        runs.append(SweepRun(s["d_sae"], tokens, s.get("fvu_all_tokens", s["fvu"]), s["l0"]))
    return runs


def training_report(report: dict, out: Path) -> dict:
    history = report["default"]["history"]
    series = {k: [h[k] for h in history] for k in ("loss", "fvu", "l0", "dead_fraction")}
    plot_history([h["step"] for h in history], series, out / "loss_curve.png")
    runs = sweep_runs(report)
    fit = fit_sweep(runs, 576)
    plot_sweep(runs, fit, 576, out / "sweep.png")
    return {
        "default": {k: report["default"][k] for k in ("config", "train_seconds", "history")},
        "relu_paper_recipe": {k: report["relu"][k] for k in ("config", "train_seconds", "heldout")},
        "sweep": {"runs": [r.__dict__ for r in runs], "fvu_vs_compute": fit.loss.__dict__,
                  "optimal_features_vs_compute": fit.features.__dict__,
                  "optimal_tokens_vs_compute": fit.tokens.__dict__,
                  "note": "device evaluation, FVU over all held-out tokens (massive-activation tokens included)"},
        "device": report["device"], "reference_max_rel_diff": report["reference_max_rel_diff"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=envs.cache_dir() / "device_run")
    parser.add_argument("--out", type=Path, default=DEFAULT_SAE_DIR)
    parser.add_argument("--eval-contexts", type=int, default=64)
    parser.add_argument("--quantile-contexts", type=int, default=512, help="contexts sampled for quantile examples")
    args = parser.parse_args()
    run, out = args.run, args.out
    cfg = SaeConfig(**json.loads((run / "default_cfg.json").read_text()))
    sae = build_sae(cfg, {**load_file(str(run / "default_enc.safetensors")),
                          **load_file(str(run / "default_dec.safetensors"))}, str(run))
    calib = np.load(run / "calibration.npz")
    ctx_len = int(calib["top_position"].max()) + 1
    stats = FeatureStats(calib["max_activation"], calib["density"], calib["top_values"],
                         calib["top_context"] * (ctx_len - 1) + calib["top_position"] - 1)
    save_sae(sae, out)
    calibrated_catalog(curated_catalog(cfg.d_sae), stats).save(out)

    model_dir = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    contexts = np.load(envs.cache_dir() / "device_contexts.npz")
    all_contexts = np.concatenate([contexts["train"], contexts["heldout"]])
    sample = contexts["train"][: args.quantile_contexts]
    values, rows = quantile_samples(sae, context_chunks(model, sample, cfg.hook_layer), stats.max_activation)
    write_examples(out, examples(stats, all_contexts, tokenizer), promoted_tokens(sae, model.lm_head.weight, tokenizer),
                   quantile_examples(values, rows, sample, tokenizer))

    heldout = contexts["heldout"][: args.eval_contexts]
    np.save(out / "heldout_sample.npy", heldout.astype(np.uint16))
    recon = reconstruction_metrics(sae, torch.cat(list(context_chunks(model, heldout, cfg.hook_layer))))
    splice = splice_metrics(model, sae, heldout[: args.eval_contexts // 2])
    report = json.loads((run / "report.json").read_text())
    (out / "training_report.json").write_text(json.dumps(training_report(report, out), indent=1))
    default_cfg = report["default"]["config"]
    card = model_card(
        recon, splice, model=report["meta"]["model"], hook=cfg.hook_name, architecture="batchtopk -> jumprelu",
        d_sae=cfg.d_sae, k=default_cfg["k"], training_tokens=default_cfg["total_tokens"],
        distinct_tokens=report["train_tokens"], normalisation_scale=report["scale"], trained_on=report["device"],
        train_seconds=round(report["default"]["train_seconds"], 1), eval_contexts=len(heldout),
        splice_contexts=args.eval_contexts // 2, calibration_tokens=report["train_tokens"] + report["heldout_tokens"],
        dead_fraction_over_calibration=float((stats.density == 0).mean()),
        corpus="sae_serve.train.corpus SOURCES; contexts with tokens seen <= 2 times dropped (device transfer)",
    )
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
