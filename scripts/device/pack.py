"""Pack what training the default SAE on a device machine needs into one folder under 64 MiB.

The device machine has torch and transformers but no network: it gets the default model's first
``layer + 1`` decoder layers (losslessly re-encoded, see codec.py), the embedding rows of the
tokens the corpus uses, the tokenised corpus (ids remapped to those rows), and reference
activations computed here to check that the rebuilt model matches.

    python scripts/device/pack.py --out .device_pack
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from codec import decode, encode

from sae_serve import envs
from sae_serve.models import DEFAULT_HOOK_LAYER, prepare_model
from sae_serve.train.activations import layer_activations, tokenize_contexts
from sae_serve.train.corpus import build_corpus, read_corpus


def _interleaved(corpus: Path, split: str, seed: int = 0) -> list[str]:
    """Documents in a seeded random order, so every budget gets every source."""
    docs = [text for _, text in read_corpus(corpus, split)]
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(".device_pack"))
    parser.add_argument("--train-tokens", type=int, default=8_000_000)
    parser.add_argument("--heldout-tokens", type=int, default=400_000)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--layer", type=int, default=DEFAULT_HOOK_LAYER)
    parser.add_argument("--rare-count", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = build_corpus(envs.cache_dir() / "corpus" / "default")
    train = tokenize_contexts(_interleaved(corpus, "train"), tokenizer, args.ctx_len, args.train_tokens)
    heldout = tokenize_contexts(_interleaved(corpus, "heldout"), tokenizer, args.ctx_len, args.heldout_tokens)
    # The embedding rows are most of the payload: contexts holding a token seen at most
    # --rare-count times in the whole corpus are dropped (about 15%) to fit the 64 MiB transfer.
    ids, counts = np.unique(np.concatenate([train.ravel(), heldout.ravel()]), return_counts=True)
    rare = np.zeros(len(tokenizer), dtype=bool)
    rare[ids[counts <= args.rare_count]] = True
    train, heldout = train[~rare[train].any(1)], heldout[~rare[heldout].any(1)]
    vocab = np.unique(np.concatenate([train.ravel(), heldout.ravel()]))
    remap = np.zeros(len(tokenizer), dtype=np.int64)
    remap[vocab] = np.arange(len(vocab))
    print(f"train {train.shape}, heldout {heldout.shape}, vocab used {len(vocab)}")

    state = load_file(str(model_dir / "model.safetensors"))
    arrays: dict[str, np.ndarray] = {"vocab_ids": vocab.astype(np.int32)}
    for name, tensor in state.items():
        parts = name.split(".")
        if name == "lm_head.weight" or name == "model.norm.weight":
            continue
        if "layers" in parts and int(parts[parts.index("layers") + 1]) > args.layer:
            continue
        w = tensor.numpy()
        if name == "model.embed_tokens.weight":
            w = w[vocab]
        scheme = "q8_0" if "embed" in name else ("raw" if w.ndim == 1 else "q4_1")
        enc = encode(name, w, scheme)
        assert np.array_equal(decode(enc)[name].view(np.uint32), w.view(np.uint32)), name
        arrays.update(enc)
    np.savez(args.out / "weights.npz", **arrays)

    for split, ids in (("train", train), ("heldout", heldout)):
        (args.out / f"{split}.npy.xz").write_bytes(lzma.compress(remap[ids].astype(np.uint16).tobytes(), preset=6))
    config = json.loads((model_dir / "config.json").read_text())
    config.update(num_hidden_layers=args.layer + 1, vocab_size=len(vocab))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    check = torch.from_numpy(heldout[:1]).long()
    ref = layer_activations(model, check, args.layer)
    np.savez_compressed(args.out / "reference.npz", ids=remap[heldout[:1]], acts=ref.numpy())
    meta = {"config": config, "layer": args.layer, "ctx_len": args.ctx_len, "train_shape": list(train.shape),
            "heldout_shape": list(heldout.shape), "model": model_dir.name}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    # Token ids (original vocabulary) stay here: calibration examples are decoded locally.
    np.savez_compressed(envs.cache_dir() / "device_contexts.npz", train=train, heldout=heldout)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"packed {total / 2**20:.1f} MiB into {args.out}")


if __name__ == "__main__":
    main()
