"""Watched features: their activations on every token, totalled on the SAE's device for Prometheus.

Each step adds to fixed-shape device totals: tokens seen, tokens on which each feature fires (above
its threshold), a histogram of its active values in the metric's buckets, and their sum. Fixed
shapes, so the same kernels run inside a CUDA graph; only the first ``live`` rows of a padded step
count. The host never waits for the GPU: ``publish`` hands Prometheus the difference since the last
snapshot once that snapshot's copy has landed, then queues the next one (on a GPU, counts reach
Prometheus a step or two late; on a CPU at once).
"""

from __future__ import annotations

import torch

from sae_serve.metrics import ACTIVATION_BUCKETS, WorkerMetrics
from sae_serve.sae.model import FeatureSubset, SparseAutoencoder


class Watch:
    """One SAE's watchlist and its running totals."""

    def __init__(self, sae: SparseAutoencoder, sae_name: str, features: list[int], names: list[str],
                 thresholds: list[float], max_rows: int) -> None:
        device, w, b = sae.W_dec.device, len(features), len(ACTIVATION_BUCKETS) + 1  # + the +Inf bucket
        self.sae, self.sae_name, self.names = sae, sae_name, names
        self.subset: FeatureSubset = sae.subset(torch.tensor(features, device=device))
        self.thresholds = torch.tensor(thresholds, dtype=sae.dtype, device=device)
        self.bounds = torch.tensor(ACTIVATION_BUCKETS, device=device)
        self.row = torch.arange(max_rows, device=device)
        self.cell = torch.arange(w, device=device) * b  # column j's first histogram cell
        self.live = torch.zeros((), dtype=torch.long, device=device)  # real rows of the coming step
        # counts[0]: tokens; counts[1 + j]: fired tokens of feature j; then the (w, b) histogram.
        self.counts = torch.zeros(1 + w + w * b, dtype=torch.long, device=device)
        self.sums = torch.zeros(w, dtype=torch.float64, device=device)
        # What ``publish`` reads: the totals themselves on a CPU, a pinned snapshot of them on a GPU.
        self._host = (self.counts, self.sums) if device.type != "cuda" else (
            self.counts.cpu().pin_memory(), self.sums.cpu().pin_memory())
        self._landed: torch.cuda.Event | None = None  # the queued snapshot's copy
        self._published = (torch.zeros_like(self._host[0]), torch.zeros_like(self._host[1]))

    def set_live(self, rows: int) -> None:
        """How many rows of the coming step are tokens (the rest is padding)."""
        self.live.fill_(rows)

    def accumulate(self, stream: torch.Tensor, live: torch.Tensor | int) -> None:
        """Add one step: ``stream`` (rows, d_in) is the unedited residual stream."""
        acts = self.sae.encode_subset(stream, self.subset)
        w = acts.shape[1]
        real = (self.row[: len(acts)] < live).unsqueeze(1)
        active = (acts > 0) & real
        self.counts[0] += real.sum()
        self.counts[1 : 1 + w] += ((acts > self.thresholds) & real).sum(0)
        cells = self.cell + torch.bucketize(acts.float(), self.bounds)  # value <= bound: Prometheus' rule
        self.counts[1 + w :].scatter_add_(0, cells.flatten(), active.flatten().long())
        self.sums += (acts.double() * active).sum(0)

    def publish(self, metrics: WorkerMetrics) -> None:
        """Give Prometheus what the last snapshot holds beyond what it has, if that snapshot has
        landed; then snapshot the totals again. Never waits for the GPU."""
        if self._landed is not None and not self._landed.query():
            return
        counts, sums = self._host
        new_counts, new_sums = counts - self._published[0], sums - self._published[1]
        if new_counts[0] > 0:  # only tokens make any total grow
            self._published = (counts.clone(), sums.clone())
            w = len(self.names)
            metrics.add_feature_totals(self.sae_name, self.names, int(new_counts[0]), new_counts[1 : 1 + w].tolist(),
                                       new_counts[1 + w :].view(w, -1).tolist(), new_sums.tolist())
        if self.counts.is_cuda:
            counts.copy_(self.counts, non_blocking=True)
            sums.copy_(self.sums, non_blocking=True)
            self._landed = torch.cuda.Event()
            self._landed.record()
