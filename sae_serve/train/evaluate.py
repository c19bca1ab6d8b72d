"""How good an SAE is (shared/notes/dictionary-learning.md, "Metrics").

- FVU = E||x - x_hat||^2 / E||x - E[x]||^2, centred, in raw units; explained variance = 1 - FVU.
  It is taken over ordinary tokens: a few "massive activation" tokens (norm > 10x the median;
  about 1 in 10,000 on the default model, ~140x the usual norm, like the first position) would
  otherwise dominate both sums and make any SAE look good. ``fvu_all_tokens`` keeps them.
- L0 = mean number of active features per token; dead = never active on the evaluated tokens;
  dense = active on more than 10% of them.
- Splicing the reconstruction into the forward pass (every position but the first, whose outlier
  norm the SAE never saw): Delta CE in nats, KL to the clean next-token distribution, and
  loss recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean) against zero ablation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sae_serve.architectures import decoder_layers
from sae_serve.sae.model import SparseAutoencoder

DENSE_ABOVE = 0.1
MASSIVE_FACTOR = 10.0


@dataclass(frozen=True)
class ReconstructionMetrics:
    fvu: float
    """Fraction of variance unexplained (centred, raw units) over ordinary tokens."""
    fvu_all_tokens: float
    """The same including massive-activation tokens."""
    massive_tokens: int
    """Tokens whose norm exceeds 10x the median norm."""
    l0: float
    """Mean active features per token."""
    dead_fraction: float
    """Features never active on these tokens."""
    dense_fraction: float
    """Features active on more than 10% of these tokens."""
    tokens: int
    """Tokens evaluated (the window in which 'dead' is judged)."""


@torch.no_grad()
def _fvu(sae: SparseAutoencoder, acts: torch.Tensor, chunk: int) -> float:
    mean = acts.double().mean(0)
    err = total = 0.0
    for s in range(0, len(acts), chunk):
        x = acts[s : s + chunk]
        err += float((x.double() - sae(x).double()).pow(2).sum())
        total += float((x.double() - mean).pow(2).sum())
    return err / total


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, acts: torch.Tensor, chunk: int = 32768) -> ReconstructionMetrics:
    """Metrics over ``acts`` (tokens, d_in) in raw units, accumulated in float64."""
    norms = acts.float().norm(dim=1)
    ordinary = norms <= MASSIVE_FACTOR * norms.median()
    fired = torch.zeros(sae.d_sae, dtype=torch.float64, device=acts.device)
    for s in range(0, len(acts), chunk):
        fired += (sae.encode(acts[s : s + chunk]) > 0).double().sum(0)
    density = fired / len(acts)
    return ReconstructionMetrics(
        fvu=_fvu(sae, acts[ordinary], chunk), fvu_all_tokens=_fvu(sae, acts, chunk),
        massive_tokens=int((~ordinary).sum()), l0=float(density.sum()),
        dead_fraction=float((fired == 0).double().mean()),
        dense_fraction=float((density > DENSE_ABOVE).double().mean()), tokens=len(acts),
    )


@contextmanager
def _replaced(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """Replace decoder layer ``layer``'s output at positions >= 1 by ``fn(output)``."""
    if fn is None:
        yield
        return

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        new[:, 1:] = fn(hidden[:, 1:]).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class SpliceMetrics:
    ce_clean: float
    """Next-token cross-entropy of the model, nats."""
    ce_sae: float
    """With the SAE's reconstruction spliced in."""
    ce_zero_ablated: float
    """With the layer's output zeroed."""
    delta_ce: float
    """ce_sae - ce_clean."""
    kl: float
    """Mean KL(clean || spliced) of the next-token distributions, nats."""
    loss_recovered: float
    """(ce_zero_ablated - ce_sae) / (ce_zero_ablated - ce_clean)."""
    tokens: int


@torch.no_grad()
def splice_metrics(model: nn.Module, sae: SparseAutoencoder, contexts: np.ndarray, batch: int = 8) -> SpliceMetrics:
    """Splice ``sae`` into ``model`` at its hook layer over ``contexts`` (n, ctx_len) token ids."""
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    splices = {"clean": None, "sae": sae, "zero": torch.zeros_like}
    for b in range(0, len(contexts), batch):
        ids = torch.from_numpy(np.asarray(contexts[b : b + batch])).long()
        targets = ids[:, 2:].reshape(-1)  # predictions made at positions >= 1
        logprobs = {}
        for name, fn in splices.items():
            with _replaced(model, sae.site_layer, fn):
                logits = model(input_ids=ids).logits[:, 1:-1].float()
            logprobs[name] = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
            sums[name] += float(F.nll_loss(logprobs[name], targets, reduction="sum"))
        sums["kl"] += float(F.kl_div(logprobs["sae"], logprobs["clean"], log_target=True, reduction="sum"))
        count += len(targets)
    ce = {k: v / count for k, v in sums.items()}
    return SpliceMetrics(
        ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero_ablated=ce["zero"], delta_ce=ce["sae"] - ce["clean"],
        kl=ce["kl"], loss_recovered=(ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), tokens=count,
    )


def model_card(recon: ReconstructionMetrics, splice: SpliceMetrics, **extra: object) -> dict:
    """The JSON card written next to the weights."""
    return {"reconstruction": asdict(recon), "splice": asdict(splice), **extra}
