"""Training recovers planted features; export folds the normalisation; checkpoints resume exactly."""

from pathlib import Path

import pytest
import torch

from sae_serve.train.trainer import TrainConfig, Trainer

D, N_TRUE = 32, 48


def planted(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(N_TRUE, D, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def batches(batch_size: int):
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            active = (torch.rand(batch_size, N_TRUE, generator=g) < 3 / N_TRUE).float()
            x = (active * (torch.rand(batch_size, N_TRUE, generator=g) * 2 + 0.5)) @ dirs
            yield x * (D / x.pow(2).sum(-1).mean()).sqrt()
    return dirs, batches


@pytest.mark.parametrize(("arch", "extra"), [("batchtopk", {}), ("topk", {}),
                                             ("relu", {"l1_coefficient": 1.0, "lr": 3e-3})])
def test_recovers_planted_directions(arch: str, extra: dict) -> None:
    dirs, batches = planted()
    cfg = TrainConfig(arch, d_sae=96, total_tokens=1024 * 500, batch_size=1024, k=3, dead_after_tokens=20_000, **extra)
    trainer = Trainer(cfg, D)
    trainer.fit(batches(1024), log_every=100)
    w = trainer.sae.W_dec.detach()
    cos = (dirs @ (w / w.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert (cos > 0.9).all(), cos.min()
    assert trainer.history[-1].fvu < 0.2


def test_schedules_follow_the_paper() -> None:
    trainer = Trainer(TrainConfig("relu", d_sae=8, total_tokens=100 * 64, batch_size=64, l1_coefficient=5.0), 4)
    assert trainer.l1_at(0) == pytest.approx(1.0)  # warm-up over 5 steps: 1/5 of 5
    assert trainer.l1_at(10) == 5.0
    assert trainer.lr_at(79) == 5e-5 and trainer.lr_at(90) == pytest.approx(5e-5 * 0.5)
    assert trainer.lr_at(100) == 0.0
    with pytest.raises(ValueError, match="architecture"):
        TrainConfig("gated", d_sae=8, total_tokens=64, batch_size=64)


@pytest.mark.parametrize(("arch", "exported"), [("relu", "relu"), ("topk", "topk"), ("batchtopk", "jumprelu")])
def test_export_folds_the_input_scale(arch: str, exported: str) -> None:
    _, batches = planted()
    cfg = TrainConfig(arch, d_sae=64, total_tokens=1024 * 30, batch_size=1024, k=3)
    trainer = Trainer(cfg, D)
    trainer.fit(batches(1024))
    scale = 0.25
    sae = trainer.export(scale, hook_layer=3)
    assert (sae.cfg.architecture, sae.hook_layer) == (exported, 3)
    x_raw = next(batches(64)) / scale  # raw activations; the trainer saw scale * x_raw
    with torch.no_grad():
        pre = trainer.sae.pre_activations(x_raw * scale)
        torch.testing.assert_close(sae.pre_activations(x_raw), pre, atol=1e-4, rtol=1e-4)
        if arch != "batchtopk":  # batchtopk's batch-level rule becomes a threshold at export
            expected = trainer.sae.decode(trainer.sae.activate(pre)) / scale
            torch.testing.assert_close(sae(x_raw), expected, atol=1e-4, rtol=1e-4)
    if arch == "batchtopk":
        assert sae.threshold.min() == sae.threshold.max() > 0  # one global threshold


def test_checkpoint_resume_is_exact(tmp_path: Path) -> None:
    _, batches = planted()
    data = [b for _, b in zip(range(20), batches(256), strict=False)]
    cfg = TrainConfig("topk", d_sae=32, total_tokens=256 * 20, batch_size=256, k=3, seed=5)
    straight = Trainer(cfg, D)
    straight.fit(iter(data))
    first = Trainer(cfg, D)
    first.fit(iter(data[:10]), until=10)
    first.save_checkpoint(tmp_path / "ck.pt")
    resumed = Trainer(cfg, D)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    assert resumed.step == 10
    resumed.fit(iter(data[10:]))
    for name, value in straight.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    other = Trainer(TrainConfig("topk", d_sae=32, total_tokens=256 * 20, batch_size=256, k=4), D)
    with pytest.raises(ValueError, match="another config"):
        other.load_checkpoint(tmp_path / "ck.pt")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_decoding_equals_the_dense_decoder_with_the_same_gradients(arch: str) -> None:
    """Training decodes k rows of W_dec per token; it must be the dense decoder, value and gradient."""
    sae = Trainer(TrainConfig(arch, d_sae=48, total_tokens=64, batch_size=64, k=4, seed=1), D).sae
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))
    sparse = sae.decode_codes(sae.codes(sae.pre_activations(x)))
    sparse.pow(2).sum().backward()
    grads = [p.grad.clone() for p in (sae.W_enc, sae.W_dec)]
    sae.zero_grad()
    dense = sae.decode(sae.activate(sae.pre_activations(x)))
    dense.pow(2).sum().backward()
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    for got, p in zip(grads, (sae.W_enc, sae.W_dec), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-4, rtol=1e-4)
    assert (sae.activate(sae.pre_activations(x)) > 0).sum() <= 4 * 64
