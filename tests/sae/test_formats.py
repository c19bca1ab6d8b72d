import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_serve.errors import SaeFormatError
from sae_serve.sae.formats import load_sae, save_sae
from tests.conftest import make_sae
from tests.sae.test_model import reference_encode


def assert_same_math(a, b) -> None:
    x = torch.randn(12, a.d_in, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.encode(x), b.encode(x))
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_saelens_round_trip(tmp_path: Path, arch: str) -> None:
    sae = make_sae(arch, hook_layer=7, apply_b_dec_to_input=arch == "topk")
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
    assert cfg["hook_name"] == "blocks.7.hook_resid_post"
    loaded = load_sae(tmp_path / "s")
    assert loaded.cfg == sae.cfg
    assert_same_math(sae, loaded)


def test_saelens_file_written_by_saelens_v6(tmp_path: Path) -> None:
    """A cfg.json in SAELens v6's shape (hook name only under metadata, extra fields)."""
    sae = make_sae("relu", apply_b_dec_to_input=True)
    save_file({k: v for k, v in sae.tensors().items()}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 16, "d_sae": 64, "dtype": "float32", "device": "cuda",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre", "prepend_bos": True},
    }))
    loaded = load_sae(tmp_path)
    assert (loaded.hook_layer, loaded.hook_point, loaded.cfg.model_name) == (8, "resid_pre", "gpt2")
    torch.testing.assert_close(loaded.encode(torch.ones(2, 16)).double(), reference_encode(sae, torch.ones(2, 16)),
                               atol=1e-5, rtol=1e-5)


def test_sparsify_checkpoint(tmp_path: Path) -> None:
    sae = make_sae("topk", k=4, apply_b_dec_to_input=True)
    folder = tmp_path / "layers.12"
    folder.mkdir()
    t = sae.tensors()
    save_file({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"],
               "W_dec": t["W_dec"], "b_dec": t["b_dec"]}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0,
        "k": 4, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": 16}))
    loaded = load_sae(folder)
    assert (loaded.cfg.architecture, loaded.d_sae, loaded.hook_layer, loaded.cfg.k) == ("topk", 64, 12, 4)
    assert_same_math(sae, loaded)


def test_gemma_scope_params(tmp_path: Path) -> None:
    sae = make_sae("jumprelu")
    folder = tmp_path / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in sae.tensors().items()})
    for path in (folder, folder / "params.npz"):
        loaded = load_sae(path)
        assert (loaded.cfg.architecture, loaded.hook_layer) == ("jumprelu", 20)
        assert_same_math(sae, loaded)


def test_dtype_and_hook_layer_override(tmp_path: Path) -> None:
    save_sae(make_sae("relu", hook_layer=2), tmp_path)
    loaded = load_sae(tmp_path, hook_layer=5, dtype=torch.bfloat16)
    assert (loaded.hook_layer, loaded.dtype) == (5, torch.bfloat16)


# --- bad input: each a clear error naming the file and the field -------------------------------
def _saelens(tmp_path: Path, **cfg_changes) -> Path:
    save_sae(make_sae("relu"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(cfg_changes)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": "gated"}, "field architecture='gated' is not supported"),
        ({"normalize_activations": "layer_norm"}, "field normalize_activations='layer_norm' is not supported"),
        ({"hook_name": "blocks.3.hook_mlp_out"}, "hook_name='blocks.3.hook_mlp_out' is not supported"),
        ({"d_in": "16"}, "field 'd_in' must be a int"),
        ({"d_sae": 65}, r"W_enc has shape \(16, 64\), expected \(16, 65\)"),
        ({"hook_name": None, "hook_layer": None, "metadata": {}}, "pass hook_layer"),
    ],
)
def test_saelens_bad_config(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(SaeFormatError, match=message) as info:
        load_sae(_saelens(tmp_path, **changes))
    assert str(tmp_path) in str(info.value)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(SaeFormatError, match="no such SAE folder"):
        load_sae(tmp_path / "nowhere")
    with pytest.raises(SaeFormatError, match="no SAE found"):
        load_sae(tmp_path)
    folder = _saelens(tmp_path / "a")
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SaeFormatError, match=r"cfg.json: not valid JSON"):
        load_sae(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(SaeFormatError, match=r"cfg.json: file not found"):
        load_sae(folder)
    folder = _saelens(tmp_path / "b")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SaeFormatError, match=r"sae_weights.safetensors: not a readable safetensors"):
        load_sae(folder)
    bad_npz = tmp_path / "layer_3" / "params.npz"
    bad_npz.parent.mkdir()
    bad_npz.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SaeFormatError, match="params.npz: not a readable .npz"):
        load_sae(bad_npz)


def test_nan_weights_named(tmp_path: Path) -> None:
    sae = make_sae("relu")
    t = sae.tensors()
    t["W_dec"][3, 2] = float("nan")
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    _ = _saelens(tmp_path / "cfg_only")
    (tmp_path / "cfg.json").write_text((tmp_path / "cfg_only" / "cfg.json").read_text())
    with pytest.raises(SaeFormatError, match="W_dec contains NaN"):
        load_sae(tmp_path)


def test_sparsify_unsupported_options(tmp_path: Path) -> None:
    (tmp_path / "sae.safetensors").write_bytes(b"")
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 16, "k": 4, "skip_connection": True}))
    with pytest.raises(SaeFormatError, match="skip_connection=True is not supported"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 16, "k": 4, "activation": "groupmax"}))
    with pytest.raises(SaeFormatError, match="activation='groupmax'"):
        load_sae(tmp_path)


def test_gemma_scope_without_layer(tmp_path: Path) -> None:
    sae = make_sae("jumprelu")
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in sae.tensors().items()})
    with pytest.raises(SaeFormatError, match="pass hook_layer"):
        load_sae(tmp_path / "params.npz")
    assert load_sae(tmp_path / "params.npz", hook_layer=4).hook_layer == 4
