"""Training loop for the paper's ReLU SAE and for TopK / BatchTopK SAEs.

The ReLU recipe is Scaling Monosemanticity's April-2024 update: inputs scaled so E||x||^2 = d_in,
loss ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec_i|| with lambda warmed up over the first 5% of
steps, Adam(0.9, 0.999), lr decayed linearly to 0 over the last 20%, gradient norm clipped to 1,
decoder rows initialised at norm 0.1 and W_enc = W_dec^T. TopK (Gao et al. 2024) and BatchTopK
(Bussmann et al. 2024) use plain MSE plus the AuxK loss on dead features, with unit-norm decoder
rows; BatchTopK is exported as JumpReLU with one global threshold. Under ``torchrun`` each process
trains on its slice of every batch (``distributed.Ranks``) and the result equals one process's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sae_serve.sae.model import SaeConfig, SparseAutoencoder, build_sae
from sae_serve.train.distributed import ONE_PROCESS, Ranks

logger = logging.getLogger(__name__)
TrainArchitecture = Literal["relu", "topk", "batchtopk"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run."""

    architecture: TrainArchitecture
    """relu (the paper's L1 recipe), topk, or batchtopk (exported as jumprelu)."""
    d_sae: int
    """Number of features."""
    total_tokens: int
    """Training tokens; steps = total_tokens // batch_size."""
    k: int = 32
    """Active features per token for topk / batchtopk."""
    l1_coefficient: float = 5.0
    """lambda of the relu recipe, in units of the normalised input (E||x||^2 = d_in)."""
    lr: float | None = None
    """Adam learning rate; default 5e-5 for relu, 2e-4 / sqrt(d_sae / 2^14) for topk/batchtopk."""
    batch_size: int = 4096
    """Tokens per step."""
    warmup_fraction: float = 0.05
    """relu: lambda rises linearly from 0 over this fraction of steps."""
    decay_fraction: float = 0.2
    """lr decays linearly to 0 over this final fraction of steps."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (topk/batchtopk)."""
    dead_after_tokens: int = 1_000_000
    """A feature that has not fired for this many tokens counts as dead (feeds AuxK)."""
    seed: int = 0
    """Seeds initialisation and batch order."""

    def __post_init__(self) -> None:
        if self.architecture not in ("relu", "topk", "batchtopk"):
            raise ValueError(f"architecture must be relu, topk or batchtopk, got {self.architecture!r}")
        if self.d_sae < 1 or self.total_tokens < self.batch_size:
            raise ValueError("need d_sae >= 1 and total_tokens >= batch_size")
        if self.architecture != "relu" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae, got {self.k}")

    @property
    def steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-5 if self.architecture == "relu" else 2e-4 / math.sqrt(self.d_sae / 2**14)


@dataclass(frozen=True)
class StepStats:
    """What one logged step reports."""

    step: int
    loss: float
    fvu: float
    l0: float
    dead_fraction: float


class SparseCodes(NamedTuple):
    """Active features of a batch, row by row: ``counts[i]`` (index, value) pairs for row i."""

    indices: torch.Tensor  # (nnz,) feature indices, rows in order
    values: torch.Tensor  # (nnz,)
    counts: torch.Tensor  # (batch,)

    def embed(self, weight: torch.Tensor) -> torch.Tensor:
        """sum_j values_j * weight[indices_j] per row: (batch, weight columns)."""
        offsets = torch.cumsum(self.counts, 0) - self.counts
        return F.embedding_bag(self.indices, weight, offsets, mode="sum", per_sample_weights=self.values)

    def fired(self, d_sae: int) -> torch.Tensor:
        """(d_sae,) bool: features active on some row."""
        return torch.bincount(self.indices[self.values > 0], minlength=d_sae) > 0

    def l0(self) -> float:
        return float((self.values > 0).sum()) / len(self.counts)


class TrainingSae(nn.Module):
    """The trainable twin of ``SparseAutoencoder``, on normalised inputs."""

    def __init__(self, cfg: TrainConfig, d_in: int, device: torch.device | str, ranks: Ranks = ONE_PROCESS) -> None:
        super().__init__()
        self.cfg = cfg
        self.ranks = ranks
        gen = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(cfg.d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if cfg.architecture == "relu":
            w_dec *= 0.1
        self.W_dec = nn.Parameter(w_dec.to(device))
        self.W_enc = nn.Parameter(w_dec.T.clone().to(device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        self.register_buffer("threshold_sum", torch.zeros((), device=device))
        self.register_buffer("threshold_count", torch.zeros((), device=device))

    @property
    def uses_pre_bias(self) -> bool:
        return self.cfg.architecture != "relu"  # the paper's SAE has no pre-encoder bias

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec if self.uses_pre_bias else x) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """(batch, d_sae) activations under the training-time sparsity rule (dense)."""
        if self.cfg.architecture == "relu":
            return torch.relu(pre)
        codes = self.codes(pre)
        rows = torch.repeat_interleave(torch.arange(pre.shape[0], device=pre.device), codes.counts)
        return torch.zeros_like(pre).index_put_((rows, codes.indices), codes.values)

    def codes(self, pre: torch.Tensor) -> SparseCodes:
        """topk / batchtopk: each row's active features as (indices, values) bags."""
        arch, k, batch = self.cfg.architecture, self.cfg.k, pre.shape[0]
        if arch == "topk":
            top = pre.topk(k, dim=-1)
            counts = torch.full((batch,), k, dtype=torch.long, device=pre.device)
            return SparseCodes(top.indices.flatten(), torch.relu(top.values).flatten(), counts)
        flat, values = self._batch_top(torch.relu(pre).flatten(), k * batch * self.ranks.world)
        if self.training:  # the export threshold: running mean of the smallest kept activation
            kept = values[values > 0]
            smallest = self.ranks.min(kept.min() if kept.numel() else pre.new_tensor(torch.inf))
            if torch.isfinite(smallest):
                self.threshold_sum += smallest.detach()
                self.threshold_count += 1
        counts = torch.bincount(flat // self.cfg.d_sae, minlength=batch)
        return SparseCodes(flat % self.cfg.d_sae, values, counts)

    def _batch_top(self, acts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices in row-major order, values) of the ``n`` largest of ``acts`` over every
        rank's batch. Across ranks: this rank's entries at or above the n-th largest of all, less
        those at 0 (which change nothing: the single process keeps some, they decode to nothing);
        an exact tie at the threshold keeps every tied entry where one process keeps some."""
        if self.ranks.world == 1:
            top = acts.topk(n)
            flat, order = top.indices.sort()  # row-major, so each row's features form one bag
            return flat, top.values[order]
        threshold = self.ranks.gather(acts.topk(min(n, acts.numel())).values).topk(n).values[-1]
        flat = torch.nonzero((acts >= threshold) & (acts > 0)).flatten()
        return flat, acts[flat]

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def decode_codes(self, codes: SparseCodes) -> torch.Tensor:
        """The decoder on sparse codes: k rows of W_dec per token instead of a dense matmul."""
        return codes.embed(self.W_dec) + self.b_dec


def _aux_loss(sae: TrainingSae, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
              dead: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """AuxK: the top dead features reconstruct what the live ones missed (Gao et al., App. B.1)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k_aux = min(x.shape[1] // 2, n_dead)
    top = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=-1)
    counts = torch.full((x.shape[0],), k_aux, dtype=torch.long, device=x.device)
    recon = SparseCodes(top.indices.flatten(), torch.relu(top.values).flatten(), counts).embed(sae.W_dec)
    residual = (x - x_hat).detach()
    return (recon - residual).pow(2).sum(-1).mean() / ranks.row_mean(residual.pow(2).sum(-1)).clamp(min=1e-8)


class Trainer:
    """Trains one SAE from a stream of normalised activation batches."""

    def __init__(self, cfg: TrainConfig, d_in: int, device: torch.device | str = "cpu",
                 ranks: Ranks = ONE_PROCESS) -> None:
        self.cfg = cfg
        self.ranks = ranks
        self.sae = TrainingSae(cfg, d_in, device, ranks)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999))
        self.step = 0
        self.tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
        self.history: list[StepStats] = []

    # --- schedules -------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        decay_start = int(self.cfg.steps * (1 - self.cfg.decay_fraction))
        if step < decay_start:
            return self.cfg.learning_rate
        return self.cfg.learning_rate * max(0.0, (self.cfg.steps - step) / max(1, self.cfg.steps - decay_start))

    def l1_at(self, step: int) -> float:
        warmup = max(1, int(self.cfg.steps * self.cfg.warmup_fraction))
        return self.cfg.l1_coefficient * min(1.0, (step + 1) / warmup)

    # --- one step, as a list of named parts -----------------------------------------------------
    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """(total loss, features fired in this rank's rows, L0, squared error per token)."""
        sae = self.sae
        pre = sae.pre_activations(x)
        if self.cfg.architecture == "relu":
            acts = sae.activate(pre)
            sq_err = (x - sae.decode(acts)).pow(2).sum(-1)
            sparsity = (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
            loss = sq_err.mean() + self.l1_at(self.step) * sparsity
            return loss, (acts > 0).any(0), float((acts > 0).float().sum(-1).mean()), sq_err
        codes = sae.codes(pre)  # k active features per token: decode sparsely, not with a dense matmul
        x_hat = sae.decode_codes(codes)
        sq_err = (x - x_hat).pow(2).sum(-1)
        dead = self.tokens_since_fired >= self.cfg.dead_after_tokens
        aux = _aux_loss(sae, x, x_hat, pre, dead, self.ranks)
        loss = sq_err.mean() / self.ranks.row_mean(x.pow(2).sum(-1)) + self.cfg.aux_coefficient * aux
        return loss, codes.fired(self.cfg.d_sae), codes.l0(), sq_err

    def _unit_norm_decoder(self) -> None:
        """TopK/BatchTopK keep decoder rows at unit norm; drop the gradient along them first."""
        w = self.sae.W_dec
        if w.grad is not None:
            w.grad -= (w.grad * w.data).sum(1, keepdim=True) * w.data
        self.optimizer.step()
        with torch.no_grad():
            w.data /= w.data.norm(dim=1, keepdim=True).clamp(min=1e-8)

    def train_step(self, batch: torch.Tensor) -> StepStats:
        """One step on a global batch (each rank trains on its slice)."""
        x = self.ranks.shard(batch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss, fired, l0, sq_err = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ranks.average_gradients(self.sae.parameters())
        nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
        if self.cfg.architecture == "relu":
            self.optimizer.step()
        else:
            self._unit_norm_decoder()
        fired = self.ranks.max(fired.long()).bool()
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + batch.shape[0])
        self.step += 1
        with torch.no_grad():
            # Over the global batch: mean loss, squared error, L0, and the variance from sums.
            rows = batch.shape[0]
            x64 = x.double()  # (E||x||^2 - ||E x||^2 cancels badly in float32 when the mean dominates)
            sums = self.ranks.sum(torch.cat([torch.stack([loss.detach().double() * x.shape[0], sq_err.double().sum(),
                                                          x64.new_tensor(l0 * x.shape[0]), x64.pow(2).sum()]),
                                             x64.sum(0)]))
            total_var = sums[3] / rows - (sums[4:] / rows).pow(2).sum()
            return StepStats(self.step, float(sums[0] / rows), float(sums[1] / rows / total_var), float(sums[2] / rows),
                             float((self.tokens_since_fired >= self.cfg.dead_after_tokens).float().mean()))

    def fit(self, batches: Iterator[torch.Tensor], log_every: int = 50, until: int | None = None,
            on_log: Callable[[StepStats], None] = lambda s: None) -> list[StepStats]:
        """Train until step ``until`` (default: the end); ``batches`` yields (batch_size, d_in)
        normalised activations. Every ``log_every`` steps, and at the last, the stats are kept."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        self.sae.train()
        while self.step < until:
            stats = self.train_step(next(batches))
            if stats.step % log_every == 0 or stats.step == self.cfg.steps:
                self.history.append(stats)
                on_log(stats)
        self.sae.eval()
        return self.history

    # --- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"step": self.step, "sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "tokens_since_fired": self.tokens_since_fired, "history": [asdict(h) for h in self.history],
                    "cfg": asdict(self.cfg)}, tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.sae.W_dec.device)
        if state["cfg"] != asdict(self.cfg):
            raise ValueError(f"{path}: checkpoint was made with another config: {json.dumps(state['cfg'])}")
        self.step = state["step"]
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired = state["tokens_since_fired"]
        self.history = [StepStats(**h) for h in state["history"]]

    # --- export -----------------------------------------------------------------------------------
    def export(self, scale: float, hook_layer: int, model_name: str | None = None) -> SparseAutoencoder:
        """An inference SAE on raw activations: the input scale is folded into the weights.

        Training saw x_n = scale * x. Encoding scale * x with W_enc equals encoding x with
        scale * W_enc (pre-bias b_dec / scale); decoding is divided by scale.
        """
        sae, arch = self.sae, self.cfg.architecture
        tensors = {
            "W_enc": sae.W_enc.detach() * scale,
            "b_enc": sae.b_enc.detach().clone(),
            "W_dec": sae.W_dec.detach() / scale,
            "b_dec": sae.b_dec.detach() / scale,
        }
        if arch == "batchtopk":
            theta = sae.threshold_sum / sae.threshold_count.clamp(min=1)
            tensors["threshold"] = theta.expand(self.cfg.d_sae).clone()
        cfg = SaeConfig(
            architecture={"relu": "relu", "topk": "topk", "batchtopk": "jumprelu"}[arch],  # type: ignore[arg-type]
            d_in=sae.W_dec.shape[1], d_sae=self.cfg.d_sae, hook_layer=hook_layer, model_name=model_name,
            apply_b_dec_to_input=sae.uses_pre_bias, k=self.cfg.k if arch == "topk" else None,
        )
        return build_sae(cfg, {n: t.float().cpu() for n, t in tensors.items()}, "trainer export")
