"""Train, evaluate and calibrate the default SAE on a device machine from a pack (pack.py).

    python scripts/device/train_default.py --pack .device_pack --out $OUT [--smoke]

Steps: rebuild the model's first layers and check them against reference activations; harvest
layer activations of every context into device memory; train the default BatchTopK SAE; evaluate
it on held-out contexts; calibrate every feature (max activation, density, top examples); then,
while time remains, a ReLU run of the paper's recipe and a (features x tokens) sweep.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
from codec import decode
from safetensors.torch import save_file

from sae_serve.train.activations import layer_activations, normalisation_scale
from sae_serve.train.calibrate import feature_stats
from sae_serve.train.evaluate import reconstruction_metrics
from sae_serve.train.trainer import TrainConfig, Trainer

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def build_model(pack: Path, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    meta = json.loads((pack / "meta.json").read_text())
    config = LlamaConfig(**{k: v for k, v in meta["config"].items() if k not in ("architectures",)})
    model = LlamaModel(config)
    arrays = dict(np.load(pack / "weights.npz"))
    state = {k.removeprefix("model."): torch.from_numpy(v.copy()) for k, v in decode(
        {k: v for k, v in arrays.items() if k != "vocab_ids"}).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"norm.weight"} and not unexpected, (missing, unexpected)
    return model.to(device=device, dtype=torch.float32).eval()


def load_tokens(pack: Path, split: str) -> np.ndarray:
    meta = json.loads((pack / "meta.json").read_text())
    raw = np.frombuffer(lzma.decompress((pack / f"{split}.npy.xz").read_bytes()), dtype=np.uint16)
    return raw.reshape(-1, meta["ctx_len"]).astype(np.int64)


def harvest(model: torch.nn.Module, ids: np.ndarray, layer: int, device: str, batch: int) -> torch.Tensor:
    """(contexts * (ctx_len - 1), d) activations, position 0 skipped, on the device."""
    out = []
    for b in range(0, len(ids), batch):
        acts = layer_activations(model, torch.from_numpy(ids[b : b + batch]).to(device), layer)[:, 1:]
        out.append(acts.reshape(-1, acts.shape[-1]))
    return torch.cat(out)


def batches(acts: torch.Tensor, scale: float, batch_size: int, seed: int):
    gen = torch.Generator(device=acts.device).manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen, device=acts.device)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            yield acts[order[s : s + batch_size]] * scale


def evaluate(sae, acts: torch.Tensor) -> dict:
    return asdict(reconstruction_metrics(sae, acts))


def calibrate(sae, acts: torch.Tensor, ctx_len: int) -> dict[str, np.ndarray]:
    """Per feature: max activation, density, and the top (context, position, value) examples."""
    stats = feature_stats(sae, acts.split(32768))
    return {"max_activation": stats.max_activation, "density": stats.density, "top_values": stats.top_values,
            "top_context": stats.top_rows // (ctx_len - 1), "top_position": stats.top_rows % (ctx_len - 1) + 1}


def train(cfg: TrainConfig, acts: torch.Tensor, scale: float, layer: int, device: str):
    trainer = Trainer(cfg, acts.shape[1], device)
    start = time.time()
    history = trainer.fit(batches(acts, scale, cfg.batch_size, cfg.seed), log_every=max(1, cfg.steps // 20),
                          on_log=lambda s: log(f"  {cfg.architecture} F={cfg.d_sae} {s}"))
    return trainer.export(scale, layer, "SmolLM2-135M-Instruct").to(device), history, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pack", type=Path, default=Path(".device_pack"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script on a CPU")
    parser.add_argument("--budget", type=float, default=420, help="seconds before optional work stops")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # activations as exact as the CPU engine's
    args.out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((args.pack / "meta.json").read_text())
    layer, ctx_len = meta["layer"], meta["ctx_len"]
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "meta": meta}

    model = build_model(args.pack, device)
    ref = np.load(args.pack / "reference.npz")
    got = layer_activations(model, torch.from_numpy(ref["ids"]).to(device), layer).cpu().numpy()
    rel = float(np.abs(got - ref["acts"])[:, 1:].max() / np.abs(ref["acts"][:, 1:]).max())
    report["reference_max_rel_diff"] = rel
    log(f"model rebuilt on {device}; max relative difference to CPU reference {rel:.2e}")
    assert rel < 1e-3, "rebuilt model does not match the reference"

    train_ids, held_ids = load_tokens(args.pack, "train"), load_tokens(args.pack, "heldout")
    if args.smoke:
        train_ids, held_ids = train_ids[:64], held_ids[:8]
    acts = harvest(model, train_ids, layer, device, 64)
    held = harvest(model, held_ids, layer, device, 64)
    del model
    scale = normalisation_scale(acts[:200_000])
    report.update(scale=scale, train_tokens=len(acts), heldout_tokens=len(held))
    log(f"harvested {len(acts)} train + {len(held)} held-out activations; scale {scale:.5f}")

    smoke = args.smoke
    width = 256 if smoke else 4608
    default = TrainConfig("batchtopk", d_sae=width, k=32, total_tokens=(2 * len(acts) if not smoke else 8192),
                          batch_size=4096 if not smoke else 1024, dead_after_tokens=1_000_000, seed=0)
    sae, history, seconds = train(default, acts, scale, layer, device)
    report["default"] = {"config": asdict(default), "train_seconds": seconds, "history": [asdict(h) for h in history],
                         "heldout": evaluate(sae, held), "train_sample": evaluate(sae, acts[:500_000])}
    log(f"default SAE: {report['default']['heldout']}")
    t = {k: v.contiguous().cpu() for k, v in sae.tensors().items()}
    save_file({k: t[k] for k in ("W_enc", "b_enc", "threshold")}, str(args.out / "default_enc.safetensors"))
    save_file({k: t[k] for k in ("W_dec", "b_dec")}, str(args.out / "default_dec.safetensors"))
    (args.out / "default_cfg.json").write_text(json.dumps(asdict(sae.cfg)))
    np.savez_compressed(args.out / "calibration.npz", **calibrate(sae, torch.cat([acts, held]), ctx_len))
    log("calibration written")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))

    relu = TrainConfig("relu", d_sae=width, l1_coefficient=5.0, total_tokens=(len(acts) if not smoke else 8192),
                       batch_size=4096 if not smoke else 1024, seed=0)
    sae, history, seconds = train(relu, acts, scale, layer, device)
    report["relu"] = {"config": asdict(relu), "train_seconds": seconds, "heldout": evaluate(sae, held),
                      "history": [asdict(h) for h in history]}
    log(f"relu SAE: {report['relu']['heldout']}")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))

    report["sweep"] = []
    widths = [64, 128] if smoke else [1152, 2304, 4608, 9216]
    fractions = [0.125, 0.25, 0.5, 1.0]
    for tokens_frac in fractions:
        for w in widths:
            if time.time() - T0 > args.budget:
                log("time budget reached: sweep stops here")
                break
            cfg = TrainConfig("batchtopk", d_sae=w, k=32, total_tokens=max(4096, int(len(acts) * tokens_frac)),
                              batch_size=4096 if not smoke else 1024, seed=1)
            sae, _, seconds = train(cfg, acts, scale, layer, device)
            result = {**evaluate(sae, held), "d_sae": w, "train_tokens": cfg.steps * cfg.batch_size, "seconds": seconds}
            report["sweep"].append(result)
            log(f"sweep {result}")
            (args.out / "report.json").write_text(json.dumps(report, indent=1))
    log("done")


if __name__ == "__main__":
    main()
