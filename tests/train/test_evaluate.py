"""Metrics match hand-computed values on tiny inputs."""

import numpy as np
import pytest
import torch

from sae_serve.sae.model import SaeConfig, build_sae
from sae_serve.train.evaluate import reconstruction_metrics, splice_metrics


def axis_sae(d: int = 3) -> "object":
    """Features = the coordinate axes, active when the coordinate is > 0.5."""
    eye = torch.eye(d)
    return build_sae(SaeConfig("jumprelu", d, d, 0), {"W_enc": eye, "b_enc": torch.zeros(d), "W_dec": eye,
                                                      "b_dec": torch.zeros(d), "threshold": torch.full((d,), 0.5)}, "t")


def test_reconstruction_metrics_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0, 0.2], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    m = reconstruction_metrics(axis_sae(), x)
    # x_hat drops only the 0.2: error 0.04. Centred variance: mean (0.5, 0.75, 0.05).
    total = ((x - x.mean(0)) ** 2).sum().item()
    assert m.fvu == pytest.approx(0.04 / total)
    assert m.l0 == pytest.approx((1 + 1 + 2 + 0) / 4)
    assert m.dead_fraction == pytest.approx(1 / 3)  # feature 2 never fires
    assert m.dense_fraction == pytest.approx(2 / 3)
    assert (m.tokens, m.massive_tokens) == (4, 0)


def test_massive_tokens_are_reported_apart() -> None:
    x = torch.tensor([[1.0, 0.0, 0.2]] * 20 + [[0.0, 1.0, 0.2]] * 19 + [[400.0, 0.0, 40.0]])
    m = reconstruction_metrics(axis_sae(), x)
    assert m.massive_tokens == 1
    ordinary = x[:-1]
    assert m.fvu == pytest.approx(0.04 * 39 / ((ordinary - ordinary.mean(0)) ** 2).sum().item(), rel=1e-6)
    assert m.fvu_all_tokens < m.fvu / 10  # the outlier swamps the all-token figure


def test_splice_metrics_are_consistent(tiny_llama) -> None:
    model, _ = tiny_llama
    sae = build_sae(SaeConfig("relu", 64, 64, 1), {"W_enc": torch.eye(64), "b_enc": torch.full((64,), 100.0),
                                                    "W_dec": torch.eye(64), "b_dec": torch.full((64,), -100.0)}, "t")
    contexts = np.random.default_rng(0).integers(0, 49152, size=(3, 16))
    m = splice_metrics(model, sae, contexts)
    # relu(x + 100) - 100 == x for |x| < 100: a perfect SAE changes nothing (up to rounding).
    assert m.delta_ce == pytest.approx(0.0, abs=1e-3) and m.kl == pytest.approx(0.0, abs=1e-3)
    assert m.loss_recovered == pytest.approx(1.0, abs=1e-2)
    assert m.tokens == 3 * 14
    assert m.ce_zero_ablated != pytest.approx(m.ce_clean)
