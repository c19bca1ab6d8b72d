"""Harvest residual-stream activations of one layer over a text corpus.

Texts are tokenised, joined with the end-of-text token and cut into fixed-length contexts.
Position 0 of every context is skipped: its residual norm is an outlier (about 100x the rest on
the default model). Activations go to disk in shards written atomically, so an interrupted
harvest resumes at the first missing shard and produces identical files. The activations come
from transformers (a forward hook) or from any other engine that computes a batch of contexts'
(``ContextActivations``; vLLM's lives in ``engines/vllm_harvest.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sae_serve.architectures import decoder_layers
from sae_serve.errors import SaeServeError

logger = logging.getLogger(__name__)
ContextActivations = Callable[[torch.Tensor], torch.Tensor]
"""(contexts, ctx_len) token ids -> (contexts, ctx_len, d_model) resid_post of the harvested layer."""


class _StopForward(Exception):
    """Raised by the harvest hook: layers after the hooked one need not run."""


def tokenize_contexts(texts: Iterable[str], tokenizer: object, ctx_len: int, max_tokens: int) -> np.ndarray:
    """(n_contexts, ctx_len) int32 token ids: texts joined by EOS and cut into contexts."""
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    want = max_tokens // ctx_len * ctx_len
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        if len(buffer) >= want:
            break
    n = min(len(buffer), want) // ctx_len
    if n == 0:
        raise SaeServeError(f"corpus: fewer than ctx_len={ctx_len} tokens of text")
    return np.asarray(buffer[: n * ctx_len], dtype=np.int32).reshape(n, ctx_len)


def layer_activations(model: nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(batch, seq, d_model) output of decoder layer ``layer`` (resid_post); later layers skipped."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SaeServeError(f"layer {layer} is out of range: the model has layers 0..{len(layers) - 1}")
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = layers[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def every_layer_activations(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """(batch, seq, d_model) output of every decoder layer (resid_post), in one forward."""
    captured: dict[int, torch.Tensor] = {}

    def grab(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in sorted(captured)]


def normalisation_scale(sample: torch.Tensor) -> float:
    """The paper's scalar: scale * x has E||scale * x||^2 = d_in."""
    mean_sq = sample.double().pow(2).sum(-1).mean()
    if not torch.isfinite(mean_sq) or mean_sq <= 0:
        raise SaeServeError("activations contain NaN/inf or are all zero: cannot normalise")
    return float((sample.shape[-1] / mean_sq).sqrt())


@dataclass(frozen=True)
class ActivationStore:
    """A folder of shards ``shard-00000.npy`` of (tokens, d_in) float16 activations."""

    folder: Path

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npy"))

    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())

    def batches(self, batch_size: int, seed: int, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
        """Endless shuffled batches of normalised float32 activations."""
        scale = self.meta()["scale"]
        gen = np.random.default_rng(seed)
        shards = self.shards()
        while True:
            for i in gen.permutation(len(shards)):
                data = np.load(shards[i], mmap_mode="r")
                order = gen.permutation(len(data))
                for start in range(0, len(order) - batch_size + 1, batch_size):
                    rows = np.sort(order[start : start + batch_size])
                    yield torch.from_numpy(np.asarray(data[rows], dtype=np.float32)).to(device) * scale


def harvest(source: nn.Module | ContextActivations | None, contexts: np.ndarray, layer: int, folder: Path,
            batch_contexts: int = 8, shard_contexts: int = 256) -> ActivationStore:
    """Write activations of ``layer`` for ``contexts`` (position 0 skipped) to ``folder``; resumable.
    ``source``: a transformers model, or a function that computes a batch's activations (None:
    every shard must be there already)."""
    compute = (lambda ids: layer_activations(source, ids, layer)) if isinstance(source, nn.Module) else source
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (len(contexts) + shard_contexts - 1) // shard_contexts
    done = [s for s in range(n_shards) if (folder / f"shard-{s:05d}.npy").exists()]
    if done:
        logger.info("harvest: resuming, %d of %d shards already in %s", len(done), n_shards, folder)
    per_context = contexts.shape[1] - 1
    bar = tqdm(total=(len(contexts) - sum(len(contexts[s * shard_contexts : (s + 1) * shard_contexts])
                                          for s in done)) * per_context, desc="harvest", unit="tok",
               unit_scale=True, disable=None)
    for s in range(n_shards):
        path = folder / f"shard-{s:05d}.npy"
        if path.exists():
            continue
        if compute is None:
            raise SaeServeError(f"{path}: not harvested yet, and nothing was given to harvest it with")
        chunk = contexts[s * shard_contexts : (s + 1) * shard_contexts]
        parts = []
        for b in range(0, len(chunk), batch_contexts):
            ids = torch.from_numpy(chunk[b : b + batch_contexts]).long()
            acts = compute(ids)[:, 1:]
            parts.append(acts.reshape(-1, acts.shape[-1]).float())
        acts = torch.cat(parts)
        if not torch.isfinite(acts).all():
            raise SaeServeError(f"layer {layer} produced NaN/inf activations in shard {s}")
        tmp = folder / f".shard-{s:05d}.tmp.npy"
        np.save(tmp, acts.numpy().astype(np.float16))
        tmp.rename(path)
        bar.update(len(acts))
    bar.close()
    store = ActivationStore(folder)
    if not (folder / "meta.json").exists():
        sample = torch.from_numpy(np.load(store.shards()[0]).astype(np.float32))
        (folder / "meta.json").write_text(json.dumps({"layer": layer, "scale": normalisation_scale(sample),
                                                      "d_in": int(sample.shape[1])}))
    return store
