"""SAE training: sae_serve against SAELens on the same cached activations.

    python bench/training.py [--tokens 163840] [--epochs 6] [--rounds 2]

Both train a TopK SAE (4,608 features, k = 32, the default SAE's width) on the same real
layer-15 activations of the default model (harvested once from the offline corpus, normalised so
that E||x||^2 = d_in, position 0 and the rare massive-norm tokens skipped), with the same batch
size, learning rate, steps and data order (``--epochs`` passes over the cached tokens). SAELens
(`sae-lens`, pinned below) runs in its own virtual environment, created on first use, because its
pins differ from ours. Reports training tokens/s of each (median of rounds, alternating) and FVU /
L0 on held-out activations after the same number of tokens.
Appends JSON to bench/results/training.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

SAELENS = "sae-lens==6.54.12"
D_SAE, K, BATCH = 4608, 32, 4096
SAELENS_RUN = """
import json, sys, time, numpy as np, torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig, LoggingConfig
from sae_lens.training.sae_trainer import SAETrainer
train, held, lr, d_sae, k, batch, epochs = sys.argv[1], sys.argv[2], float(sys.argv[3]), *map(int, sys.argv[4:8])
torch.manual_seed(0)
data = torch.from_numpy(np.load(train)).repeat(epochs, 1)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.shape[1], d_sae=d_sae, k=k))
steps = len(data) // batch
cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=0.0,
                       lr_decay_steps=steps // 5, logger=LoggingConfig(log_to_wandb=False))  # as ours: last 20%
trainer = SAETrainer(cfg, sae, iter(data[i * batch:(i + 1) * batch] for i in range(steps)))
start = time.perf_counter()
trainer.fit()
seconds = time.perf_counter() - start
x = torch.from_numpy(np.load(held))
with torch.no_grad():
    acts = sae.encode(x)
    error = ((sae.decode(acts) - x) ** 2).sum()
print(json.dumps({"tokens_per_s": steps * batch / seconds, "fvu": float(error / ((x - x.mean(0)) ** 2).sum()),
                  "l0": float((acts > 0).float().sum(-1).mean())}))
"""


def cached_activations(tokens: int, folder: Path) -> tuple[Path, Path]:
    """Normalised layer-15 activations: ``tokens`` to train on and a tenth as many held out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_serve.models import prepare_model
    from sae_serve.train.activations import layer_activations, normalisation_scale, tokenize_contexts
    from sae_serve.train.pipeline import corpus_texts

    train, held = folder / f"train-{tokens}.npy", folder / f"heldout-{tokens}.npy"
    if train.exists() and held.exists():
        return train, held
    model_dir = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acts = []
    for split, n in (("train", tokens), ("heldout", tokens // 10)):
        contexts = torch.from_numpy(tokenize_contexts(corpus_texts(split=split), tokenizer, 256, n + n // 200 + 512))
        rows = torch.cat([layer_activations(model, contexts[i:i + 8], 15)[:, 1:].reshape(-1, 576)
                          for i in range(0, len(contexts), 8)])
        ordinary = rows.norm(dim=-1) < 10 * rows.norm(dim=-1).median()  # drop the ~1e-4 massive tokens
        acts.append(rows[ordinary][:n])
    scale = normalisation_scale(acts[0])
    folder.mkdir(parents=True, exist_ok=True)
    for path, rows in ((train, acts[0]), (held, acts[1])):
        np.save(path, (rows * scale).numpy().astype(np.float32))
    return train, held


def saelens_python(folder: Path) -> Path:
    python = folder / "saelens-venv" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(python.parents[1])], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", SAELENS], check=True)
    return python


def ours(train: Path, held: Path, lr: float, epochs: int) -> dict[str, float]:
    from sae_serve.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    data = torch.from_numpy(np.load(train)).repeat(epochs, 1)
    steps = len(data) // BATCH
    trainer = Trainer(TrainConfig("topk", d_sae=D_SAE, k=K, total_tokens=steps * BATCH, batch_size=BATCH, lr=lr),
                      data.shape[1])
    start = time.perf_counter()
    trainer.fit(iter(data[i * BATCH:(i + 1) * BATCH] for i in range(steps)))
    seconds = time.perf_counter() - start
    sae = trainer.sae
    x = torch.from_numpy(np.load(held))
    with torch.no_grad():
        acts = sae.activate(sae.pre_activations(x))
        error = ((sae.decode(acts) - x) ** 2).sum()
    return {"tokens_per_s": steps * BATCH / seconds, "fvu": float(error / ((x - x.mean(0)) ** 2).sum()),
            "l0": float((acts > 0).float().sum(-1).mean())}


def saelens(python: Path, train: Path, held: Path, lr: float, epochs: int) -> dict[str, float]:
    out = subprocess.run([str(python), "-c", SAELENS_RUN, str(train), str(held), str(lr), str(D_SAE), str(K),
                          str(BATCH), str(epochs)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=40 * BATCH)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from sae_serve import envs

    folder = envs.cache_dir() / "bench"
    train, held = cached_activations(args.tokens, folder)
    python = saelens_python(folder)
    lr = 2e-4 / (D_SAE / 2**14) ** 0.5  # our default for topk at this width, given to both
    runs: dict[str, list[dict[str, float]]] = {"sae_serve": [], "saelens": []}
    for _ in range(args.rounds):
        runs["sae_serve"].append(ours(train, held, lr, args.epochs))
        runs["saelens"].append(saelens(python, train, held, lr, args.epochs))
    median = {name: {key: round(statistics.median(r[key] for r in rs), 4) for key in rs[0]}
              for name, rs in runs.items()}
    result = {
        "bench": "training", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
        "saelens": SAELENS, "architecture": "topk", "d_sae": D_SAE, "k": K, "batch": BATCH, "lr": lr,
        "tokens": args.tokens, "epochs": args.epochs, "median": median,
        "ratio_tokens_per_s": round(median["sae_serve"]["tokens_per_s"] / median["saelens"]["tokens_per_s"], 2),
    }
    print(json.dumps(result, indent=1))
    with (Path(__file__).parent / "results" / "training.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
