"""Harvest and SAE-training throughput on this machine (issue: dictionary learning).

    python bench/training_throughput.py [--contexts 16] [--steps 10]

Harvest: the default model's forward up to layer 15 over 256-token contexts (later layers are
skipped). Training: BatchTopK steps at the default SAE's size (4,608 features, batch 4,096) and
the paper's ReLU recipe at the same size. Prints JSON and appends it to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from sae_serve.models import prepare_model
from sae_serve.train.activations import layer_activations
from sae_serve.train.trainer import TrainConfig, Trainer


def harvest_rate(contexts: int, batch: int = 8) -> float:
    model = AutoModelForCausalLM.from_pretrained(prepare_model(), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 49152, size=(contexts, 256)))
    layer_activations(model, ids[:batch], 15)  # warm-up
    start = time.perf_counter()
    for b in range(0, contexts, batch):
        layer_activations(model, ids[b : b + batch], 15)
    return contexts * 255 / (time.perf_counter() - start)


def train_rate(arch: str, steps: int) -> float:
    cfg = TrainConfig(arch, d_sae=4608, k=32, total_tokens=4096 * (steps + 2), batch_size=4096)
    trainer = Trainer(cfg, 576)
    data = [torch.randn(4096, 576) for _ in range(steps + 2)]
    trainer.fit(iter(data[:2]), until=2)  # warm-up
    start = time.perf_counter()
    trainer.fit(iter(data[2:]))
    return steps * 4096 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    result = {
        "bench": "training_throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
        "harvest_tokens_per_s": round(harvest_rate(args.contexts)),
        "train_batchtopk_4608_tokens_per_s": round(train_rate("batchtopk", args.steps)),
        "train_relu_4608_tokens_per_s": round(train_rate("relu", args.steps)),
    }
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / "training_throughput.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
