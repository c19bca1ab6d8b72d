import pytest
import torch

from sae_serve.errors import SaeFormatError, SaeServeError
from sae_serve.sae.model import SaeConfig, build_sae
from tests.conftest import make_sae

ARCHS = ["relu", "jumprelu", "topk"]


def reference_encode(sae, x: torch.Tensor) -> torch.Tensor:
    """The textbook formulas in float64, written independently of the classes."""
    t = {n: b.double() for n, b in sae.tensors().items()}
    x = x.double()
    if sae.cfg.apply_b_dec_to_input:
        x = x - t["b_dec"]
    pre = x @ t["W_enc"] + t["b_enc"]
    if sae.cfg.architecture == "relu":
        return pre.clamp(min=0)
    if sae.cfg.architecture == "jumprelu":
        return torch.where(pre > t["threshold"], pre.clamp(min=0), 0.0)
    kth = pre.sort(dim=-1, descending=True).values[..., sae.cfg.k - 1 : sae.cfg.k]
    return torch.where(pre >= kth, pre.clamp(min=0), 0.0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_encode_decode_match_float64_reference(arch: str, b_dec_in: bool) -> None:
    sae = make_sae(arch, apply_b_dec_to_input=b_dec_in)
    x = torch.randn(32, sae.d_in, generator=torch.Generator().manual_seed(1))
    acts = sae.encode(x)
    ref = reference_encode(sae, x)
    torch.testing.assert_close(acts.double(), ref, atol=1e-5, rtol=1e-5)
    assert 0 < (acts > 0).float().mean() < 1  # the test SAE is neither dead nor dense
    t = {n: b.double() for n, b in sae.tensors().items()}
    torch.testing.assert_close(sae.decode(acts).double(), acts.double() @ t["W_dec"] + t["b_dec"],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))


def test_topk_keeps_exactly_k() -> None:
    sae = make_sae("topk", k=5)
    acts = sae.encode(torch.randn(20, sae.d_in) * 3)
    assert ((acts != 0).sum(dim=1) <= 5).all()
    assert ((acts != 0).sum(dim=1) == 5).float().mean() > 0.5


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_encode_subset_equals_full_encode_columns(arch: str) -> None:
    sae = make_sae(arch)
    x = torch.randn(10, sae.d_in)
    idx = torch.tensor([5, 0, 63, 17, 5])
    torch.testing.assert_close(sae.encode_subset(x, idx), sae.encode(x)[:, idx])


def test_the_encoder_is_held_once_as_feature_rows() -> None:
    # The fixed-shape op gathers encoder rows; they must be W_enc's own memory, not a second copy
    # (on a GPU that copy would cost d_in x d_sae more), through dtype and device moves too.
    sae = make_sae("jumprelu", 16, 64)
    for s in (sae, sae.to(torch.float64)):
        assert s.encoder_rows.is_contiguous() and s.encoder_rows.data_ptr() == s.W_enc.data_ptr()
        assert torch.equal(s.encoder_rows, s.W_enc.T)


def test_encode_subset_refuses_topk() -> None:
    with pytest.raises(SaeServeError, match="topk"):
        make_sae("topk").encode_subset(torch.randn(2, 16), torch.tensor([1]))


def test_properties() -> None:
    sae = make_sae("jumprelu", d_in=16, d_sae=64, hook_layer=3)
    assert (sae.d_in, sae.d_sae, sae.hook_layer, sae.hook_point) == (16, 64, 3, "resid_post")
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "gated"}, "architecture"),
        ({"d_sae": 0}, "d_sae"),
        ({"hook_layer": -1}, "hook_layer"),
        ({"hook_point": "mlp_out"}, "hook_point"),
        ({"architecture": "topk", "k": None}, "k must be"),
        ({"architecture": "topk", "k": 99}, "k must be"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    base = {"architecture": "relu", "d_in": 4, "d_sae": 8, "hook_layer": 0}
    with pytest.raises(ValueError, match=message):
        SaeConfig(**{**base, **kwargs})


def test_build_rejects_bad_tensors() -> None:
    cfg = SaeConfig("jumprelu", 4, 8, 0)
    good = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4),
            "b_dec": torch.zeros(4), "threshold": torch.zeros(8)}
    build_sae(cfg, good, "ok")
    with pytest.raises(SaeFormatError, match=r"f.safetensors: missing tensor\(s\) \['threshold'\]"):
        build_sae(cfg, {k: v for k, v in good.items() if k != "threshold"}, "f.safetensors")
    with pytest.raises(SaeFormatError, match=r"W_dec has shape \(4, 8\), expected \(8, 4\)"):
        build_sae(cfg, {**good, "W_dec": torch.zeros(4, 8)}, "f")
    nan = torch.zeros(8)
    nan[3] = float("nan")
    with pytest.raises(SaeFormatError, match="b_enc contains NaN"):
        build_sae(cfg, {**good, "b_enc": nan}, "f")
    with pytest.raises(SaeFormatError, match="expected a float"):
        build_sae(cfg, {**good, "b_dec": torch.zeros(4, dtype=torch.long)}, "f")


def test_the_site_is_the_layer_whose_output_the_sae_reads() -> None:
    """resid_pre of layer L is the output of layer L-1: calibration, eval, checks and the plugin
    all read the SAE there."""
    from dataclasses import replace

    from sae_serve.sae.model import build_sae

    post = make_sae("relu", hook_layer=5)
    pre = build_sae(replace(post.cfg, hook_point="resid_pre"), post.tensors(), "test")
    assert (post.site_layer, pre.site_layer) == (5, 4)
