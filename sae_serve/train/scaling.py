"""Sweeps and power-law fits: which width and how many tokens for a compute budget.

Scaling Monosemanticity found the loss falling as a power law in compute, with the
compute-optimal number of features growing faster than the optimal number of steps. Here:
fit FVU = a * C^-b over all runs, take the best run per compute level, and fit
F_opt = c_F * C^alpha and D_opt = c_D * C^beta through those optima.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SweepRun:
    d_sae: int
    tokens: int
    fvu: float
    l0: float


@dataclass(frozen=True)
class PowerLaw:
    coefficient: float
    exponent: float

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.power(x, self.exponent)


def training_flops(d_in: int, d_sae: int, tokens: int) -> float:
    """Forward (encode + decode, 4 d F per token) plus backward (twice that)."""
    return 12.0 * d_in * d_sae * tokens


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least squares in log-log space: y = coefficient * x^exponent."""
    if len(x) < 2 or min(x) <= 0 or min(y) <= 0:
        raise ValueError("a power-law fit needs at least two positive points")
    exponent, log_coef = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(np.exp(log_coef)), float(exponent))


@dataclass(frozen=True)
class ScalingFit:
    loss: PowerLaw  # FVU vs compute (envelope of the best runs)
    features: PowerLaw  # optimal d_sae vs compute
    tokens: PowerLaw  # optimal tokens vs compute

    def recommend(self, flops: float) -> tuple[int, int]:
        """(d_sae, tokens) for a compute budget in FLOPs."""
        return round(float(self.features(flops))), round(float(self.tokens(flops)))


def fit_sweep(runs: Sequence[SweepRun], d_in: int) -> ScalingFit:
    """Fit the envelope: for each run, is it the best among runs of no more compute?"""
    ordered = sorted(runs, key=lambda r: training_flops(d_in, r.d_sae, r.tokens))
    frontier, best = [], float("inf")
    for r in ordered:
        if r.fvu < best:
            frontier.append(r)
            best = r.fvu
    compute = [training_flops(d_in, r.d_sae, r.tokens) for r in frontier]
    return ScalingFit(
        loss=fit_power_law(compute, [r.fvu for r in frontier]),
        features=fit_power_law(compute, [r.d_sae for r in frontier]),
        tokens=fit_power_law(compute, [r.tokens for r in frontier]),
    )


def plot_sweep(runs: Sequence[SweepRun], fit: ScalingFit, d_in: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for width in sorted({r.d_sae for r in runs}):
        pts = sorted((training_flops(d_in, r.d_sae, r.tokens), r.fvu) for r in runs if r.d_sae == width)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"{width} features")
    c = np.geomspace(min(training_flops(d_in, r.d_sae, r.tokens) for r in runs),
                     max(training_flops(d_in, r.d_sae, r.tokens) for r in runs), 50)
    ax.plot(c, fit.loss(c), "k--", label=f"FVU = {fit.loss.coefficient:.3g} C^{fit.loss.exponent:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel="held-out FVU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_history(steps: Sequence[int], series: dict[str, Sequence[float]], path: Path) -> Path:
    """The loss-curve PNG of a training run: one panel per logged quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 3))
    for ax, (name, values) in zip(np.atleast_1d(axes), series.items(), strict=True):
        ax.plot(steps, values)
        ax.set(title=name, xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
