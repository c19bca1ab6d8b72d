"""SAE files as other libraries write them (their key names, cfg fields and folder layouts, read
from their code), checked against float64 references of each library's own encode formula; and
every option that would change the math either folded in exactly or refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_serve.errors import SaeFormatError
from sae_serve.sae.formats import load_sae, save_sae
from tests.conftest import make_sae

D, F = 16, 64


def _random(seed: int = 0, decoder_norms: bool = True) -> dict[str, torch.Tensor]:
    """Tensors under SAELens names; decoder rows of uneven norm unless told otherwise."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(F, D, generator=g, dtype=torch.float64)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * (torch.rand(F, 1, generator=g, dtype=torch.float64) * 2 + 0.2
                                                        if decoder_norms else 1)
    return {"W_enc": w_dec.T.clone() + 0.3 * torch.randn(D, F, generator=g, dtype=torch.float64),
            "b_enc": 0.2 * torch.randn(F, generator=g, dtype=torch.float64), "W_dec": w_dec,
            "b_dec": 0.1 * torch.randn(D, generator=g, dtype=torch.float64)}


def _x(n: int = 24) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def _topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))


def _check(sae, acts: torch.Tensor, recon: torch.Tensor, x: torch.Tensor) -> None:
    """The loaded SAE's activations and reconstruction equal the library's (float64) formula."""
    torch.testing.assert_close(sae.encode(x.float()).double(), acts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(x.float()).double(), recon, atol=1e-4, rtol=1e-4)


def _write_saelens(folder: Path, tensors: dict[str, torch.Tensor], **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.float().contiguous() for n, t in tensors.items()}, str(folder / "sae_weights.safetensors"))
    base = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"model_name": "m", "hook_name": "blocks.4.hook_resid_post", "sae_lens_version": "6.49.2"}}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return folder


# --- SAELens --------------------------------------------------------------------------------
def test_saelens_topk_rescaled_by_decoder_norm_is_folded_exactly(tmp_path: Path) -> None:
    """SAELens TopK with rescale_acts_by_decoder_norm: top-k of pre * |W_dec_i|, decoded / |W_dec_i|."""
    t, x = _random(), _x()
    norms = t["W_dec"].norm(dim=1)
    acts = _topk(((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms, 4)
    recon = (acts / norms) @ t["W_dec"] + t["b_dec"]
    sae = load_sae(_write_saelens(tmp_path, t, architecture="topk", k=4, rescale_acts_by_decoder_norm=True))
    _check(sae, acts, recon, x)
    plain = load_sae(_write_saelens(tmp_path / "plain", t, architecture="topk", k=4))
    assert not torch.allclose(plain.encode(x.float()).double(), acts, atol=1e-3)  # ignoring it is wrong


def test_saelens_jumprelu_with_thresholds_at_or_below_zero(tmp_path: Path) -> None:
    t, x = _random(1), _x()
    t["threshold"] = torch.linspace(-0.5, 0.3, F, dtype=torch.float64)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    acts = torch.relu(pre) * (pre > t["threshold"])  # SAELens and Gemma Scope: never negative
    sae = load_sae(_write_saelens(tmp_path, t, architecture="jumprelu"))
    _check(sae, acts, acts @ t["W_dec"] + t["b_dec"], x)
    assert (sae.encode(x.float()) >= 0).all()


def test_saelens_training_checkpoints_and_old_configs(tmp_path: Path) -> None:
    """log_threshold (JumpReLU training), a BatchTopK checkpoint (its learned scalar threshold, as
    SAELens exports it), a fine-tuning scale, and a pre-6.0 cfg (flat hook fields, activation_fn_str)."""
    t, x = _random(2, decoder_norms=False), _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    theta = torch.full((F,), 0.15, dtype=torch.float64)
    sae = load_sae(_write_saelens(tmp_path / "log", {**t, "log_threshold": theta.log()}, architecture="jumprelu"))
    _check(sae, torch.relu(pre) * (pre > theta), (torch.relu(pre) * (pre > theta)) @ t["W_dec"] + t["b_dec"], x)
    sae = load_sae(_write_saelens(tmp_path / "btk", {**t, "topk_threshold": torch.tensor(0.15, dtype=torch.float64)},
                                  architecture="batchtopk", k=4, rescale_acts_by_decoder_norm=False))
    assert sae.cfg.architecture == "jumprelu"
    _check(sae, torch.relu(pre) * (pre > theta), (torch.relu(pre) * (pre > theta)) @ t["W_dec"] + t["b_dec"], x)
    scale = torch.linspace(0.5, 2, F, dtype=torch.float64)
    sae = load_sae(_write_saelens(tmp_path / "ft", {**t, "scaling_factor": scale}, architecture="standard",
                                  finetuning_scaling_factor=True))
    _check(sae, torch.relu(pre), (torch.relu(pre) * scale) @ t["W_dec"] + t["b_dec"], x)
    old = _write_saelens(tmp_path / "old", t)
    (old / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
        "model_name": "gpt2", "hook_point": "blocks.6.hook_resid_pre", "hook_point_layer": 6,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "context_size": 128, "normalize_activations": False}))
    sae = load_sae(old)
    assert (sae.cfg.architecture, sae.cfg.k, sae.hook_layer, sae.hook_point) == ("topk", 4, 6, "resid_pre")
    _check(sae, _topk(pre, 4), _topk(pre, 4) @ t["W_dec"] + t["b_dec"], x)


@pytest.mark.parametrize(("cfg", "tensors", "field"), [
    ({"architecture": "gated"}, {}, "architecture='gated'"),
    ({"architecture": "skip_transcoder", "d_out": D}, {}, "architecture='skip_transcoder'"),
    ({"architecture": "jumprelu_transcoder"}, {}, "architecture='jumprelu_transcoder'"),
    ({"normalize_activations": "expected_average_only_in"}, {}, "normalize_activations='expected_average_only_in'"),
    ({"normalize_activations": True}, {}, "normalize_activations=True"),
    ({"normalize_activations": "constant_norm_rescale"}, {}, "normalize_activations='constant_norm_rescale'"),
    ({"reshape_activations": "hook_z"}, {}, "reshape_activations='hook_z'"),
    ({"metadata": {"hook_name": "blocks.4.attn.hook_z"}}, {}, "hook_name='blocks.4.attn.hook_z'"),
    ({"metadata": {"hook_name": "blocks.4.hook_resid_post", "hook_head_index": 3}}, {}, "hook_head_index=3"),
    ({"activation_fn_str": "tanh-relu"}, {}, "activation_fn_str='tanh-relu'"),
    ({"some_new_option": 2}, {}, "field 'some_new_option' is not one this loader knows"),
    ({}, {"W_skip": torch.zeros(D, D)}, "tensor W_skip is not part of a relu SAE"),
    ({}, {"scaling_factor": torch.full((F,), 2.0)}, "scaling_factor is not all ones"),
])
def test_saelens_options_that_change_the_math_are_refused_by_name(tmp_path: Path, cfg: dict, tensors: dict,
                                                                  field: str) -> None:
    folder = _write_saelens(tmp_path, {**_random(), **tensors}, **{"architecture": "standard", **cfg})
    with pytest.raises(SaeFormatError, match=field) as info:
        load_sae(folder)
    assert str(folder) in str(info.value)


def test_saelens_runner_configs_before_6_and_sae_on_hugging_face_models_load(tmp_path: Path) -> None:
    """Before 6, SAELens' trainer saved its whole run config as cfg.json (as gpt2-small-res-jb's and
    most community files are); SAELens reads only the SAE's fields. An SAE trained on a Hugging Face
    model names its hook by module path."""
    t, x = _random(3, decoder_norms=False), _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    old = tmp_path / "runner"
    _write_saelens(old, t)
    (old / "cfg.json").write_text(json.dumps({
        "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8, "d_in": D,
        "d_sae": F, "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False, "context_size": 128,
        "use_cached_activations": False, "b_dec_init_method": "geometric_median", "expansion_factor": F // D,
        "normalize_activations": False, "lr": 4e-4, "lr_scheduler_name": "constant", "l1_coefficient": 8e-5,
        "use_ghost_grads": True, "feature_sampling_window": 1000, "wandb_project": "gpt2", "seed": 42,
        "n_batches_in_buffer": 128, "sae_lens_training_version": "3.5.0", "apply_b_dec_to_input": True}))
    sae = load_sae(old)
    assert (sae.cfg.architecture, sae.hook_layer, sae.hook_point) == ("relu", 8, "resid_pre")
    _check(sae, torch.relu(pre), torch.relu(pre) @ t["W_dec"] + t["b_dec"], x)
    hf = _write_saelens(tmp_path / "hf", t, architecture="standard", l1_warm_up_steps=1000,
                        metadata={"model_name": "Qwen/Qwen2.5-0.5B", "hook_name": "model.layers.11",
                                  "sae_lens_version": "6.54.12"})
    assert (load_sae(hf).hook_layer, load_sae(hf).hook_point) == (11, "resid_post")
    new = _write_saelens(tmp_path / "new", t, architecture="standard", some_new_option=2)  # 6.x: still refused
    with pytest.raises(SaeFormatError, match="field 'some_new_option' is not one this loader knows"):
        load_sae(new)


# --- Gemma Scope 2 -------------------------------------------------------------------------------
GS2_THRESHOLD = torch.linspace(0.05, 0.6, F, dtype=torch.float64)


def _write_gemma_scope_2(folder: Path, t: dict[str, torch.Tensor], cfg: dict | None, **extra: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w_enc": t["W_enc"].float().contiguous(), "w_dec": t["W_dec"].float().contiguous(),
               "b_enc": t["b_enc"].float(), "b_dec": t["b_dec"].float(), "threshold": GS2_THRESHOLD.float(),
               **extra}, str(folder / "params.safetensors"))
    if cfg is not None:  # as google/gemma-scope-2-4b-pt resid_post/layer_17_width_16k_l0_big/config.json
        (folder / "config.json").write_text(json.dumps({
            "width": F, "model_name": "google/gemma-3-4b-pt", "architecture": "jump_relu", "l0": 150,
            "affine_connection": False, "hf_hook_point_in": "model.layers.17.output",
            "hf_hook_point_out": "model.layers.17.output", "type": "sae", **cfg}))
    return folder


def test_gemma_scope_2_computes_its_jumprelu_and_refuses_other_sites(tmp_path: Path) -> None:
    t, x = _random(4), _x()
    pre = x @ t["W_enc"] + t["b_enc"]  # no b_dec subtracted; pre * (pre > threshold)
    acts = pre * (pre > GS2_THRESHOLD)
    sae = load_sae(_write_gemma_scope_2(tmp_path / "resid_post" / "layer_17_width_16k_l0_big", t, {}))
    assert (sae.cfg.architecture, sae.hook_layer, sae.hook_point, sae.cfg.model_name) == (
        "jumprelu", 17, "resid_post", "google/gemma-3-4b-pt")
    _check(sae, acts, acts @ t["W_dec"] + t["b_dec"], x)
    bare = load_sae(_write_gemma_scope_2(tmp_path / "resid_post_all" / "layer_6_width_16k_l0_small", t, None))
    assert bare.hook_layer == 6  # no config.json: the site folder and the layer from the folder's name
    _check(bare, acts, acts @ t["W_dec"] + t["b_dec"], x)
    for name, cfg, extra, message in (
            ("mlp", {"hf_hook_point_in": "model.layers.17.post_feedforward_layernorm.output",
                     "hf_hook_point_out": "model.layers.17.post_feedforward_layernorm.output"}, {},
             "hf_hook_point_in='model.layers.17.post_feedforward_layernorm.output'"),
            ("tc", {"type": "transcoder", "hf_hook_point_out": "model.layers.17.post_feedforward_layernorm.output"},
             {}, "type='transcoder'"),
            ("skip", {"affine_connection": True}, {"affine_skip_connection": torch.zeros(D, D)}, "affine_connection"),
            ("extra", {}, {"affine_skip_connection": torch.zeros(D, D)}, "tensor affine_skip_connection is not"),
            ("arch", {"architecture": "topk"}, {}, "architecture='topk'"),
            ("new", {"mystery": 1}, {}, "field 'mystery' is not one this loader knows")):
        with pytest.raises(SaeFormatError, match=message):
            load_sae(_write_gemma_scope_2(tmp_path / name / "layer_17_width_16k_l0_big", t, cfg, **extra))
    with pytest.raises(SaeFormatError, match="site folder 'mlp_out_all'"):
        load_sae(_write_gemma_scope_2(tmp_path / "mlp_out_all" / "layer_3_width_16k_l0_big", t, None))


# --- sparsify -------------------------------------------------------------------------------
def _write_sparsify(folder: Path, t: dict[str, torch.Tensor], extra: dict | None = None, **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": t["W_enc"].T.float().contiguous(), "encoder.bias": t["b_enc"].float(),
               "W_dec": t["W_dec"].float(), "b_dec": t["b_dec"].float(), **(extra or {})},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": F, "k": 4,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **cfg}))
    return folder


def test_sparsify_as_sparsify_computes_it(tmp_path: Path) -> None:
    """relu((x - b_dec) W_enc^T + b) then top-k; num_latents overrides expansion_factor; GPT-2
    style ``h.N`` folders name the layer too."""
    t, x = _random(3), _x()
    acts = _topk(torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]), 4)
    for name in ("layers.7", "h.7"):
        sae = load_sae(_write_sparsify(tmp_path / "run" / name, t, multi_topk=True))
        assert (sae.d_sae, sae.hook_layer, sae.hook_point) == (F, 7, "resid_post")
        _check(sae, acts, acts @ t["W_dec"] + t["b_dec"], x)


@pytest.mark.parametrize(("name", "cfg", "extra", "message"), [
    ("layers.3", {"transcode": True}, {}, "transcode=True is not supported"),
    ("layers.3", {"skip_connection": True}, {}, "skip_connection=True is not supported"),
    ("layers.3", {"activation": "groupmax"}, {}, "activation='groupmax' is not supported"),
    ("layers.3", {"signed": True}, {}, "signed=True is not supported"),
    ("layers.3", {"embed_skip": True}, {}, "field 'embed_skip' is not one this loader knows"),
    ("layers.3", {}, {"W_skip": torch.zeros(D, D)}, "tensor W_skip is not part of a plain sparsify SAE"),
    ("layers.3.mlp", {}, {}, "hookpoint 'layers.3.mlp' is not a decoder layer's output"),
])
def test_sparsify_variants_are_refused_by_name(tmp_path: Path, name: str, cfg: dict, extra: dict,
                                               message: str) -> None:
    with pytest.raises(SaeFormatError, match=message):
        load_sae(_write_sparsify(tmp_path / name, _random(), extra, **cfg))


# --- dictionary_learning ----------------------------------------------------------------------
def _write_dl(folder: Path, dict_class: str, state: dict[str, torch.Tensor], **trainer) -> Path:
    """trainer_0/ae.pt (a state dict) + config.json, as dictionary_learning's trainSAE writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({n: v.float() if v.is_floating_point() else v for n, v in state.items()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": dict_class, "trainer_class": "X", "activation_dim": D, "dict_size": F, "layer": 3,
                    "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3", **trainer},
        "buffer": {"d_submodule": D, "io": "out", "n_ctxs": 30000, "ctx_len": 128}}))
    return folder


def _linear(t: dict[str, torch.Tensor], b_dec: str) -> dict[str, torch.Tensor]:
    return {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"],
            "decoder.weight": t["W_dec"].T.contiguous(), b_dec: t["b_dec"]}


def test_dictionary_learning_classes_as_they_encode(tmp_path: Path) -> None:
    t, x = _random(4, decoder_norms=False), _x()
    centred = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    raw = x @ t["W_enc"] + t["b_enc"]
    theta = torch.tensor(0.2, dtype=torch.float64)
    cases = {  # dict_class: (state dict, the class's own encode)
        "AutoEncoder": (_linear(t, "bias"), torch.relu(centred)),
        "AutoEncoderNew": ({**_linear(t, "decoder.bias")}, torch.relu(raw)),
        "AutoEncoderTopK": ({**_linear(t, "b_dec"), "k": torch.tensor(4, dtype=torch.int32),
                             "threshold": torch.tensor(-1.0)}, _topk(torch.relu(centred), 4)),
        "BatchTopKSAE": ({**_linear(t, "b_dec"), "k": torch.tensor(4, dtype=torch.int32), "threshold": theta},
                         torch.relu(centred) * (torch.relu(centred) > theta)),
        "JumpReluAutoEncoder": ({**t, "threshold": torch.full((F,), 0.2, dtype=torch.float64)},
                                torch.relu(raw * (raw > 0.2))),
        "MatryoshkaBatchTopKSAE": ({**t, "threshold": theta, "k": torch.tensor(4), "group_sizes": torch.tensor([F])},
                                   torch.relu(centred) * (torch.relu(centred) > theta)),
    }
    for dict_class, (state, acts) in cases.items():
        sae = load_sae(_write_dl(tmp_path / dict_class / "trainer_0", dict_class, state))
        assert (sae.hook_layer, sae.hook_point) == (3, "resid_post")
        assert sae.cfg.model_name == "EleutherAI/pythia-70m-deduped"
        _check(sae, acts, acts @ t["W_dec"] + t["b_dec"], x)


@pytest.mark.parametrize(("dict_class", "trainer", "extra", "message"), [
    ("GatedAutoEncoder", {}, {}, "trainer.dict_class='GatedAutoEncoder' is not supported"),
    ("AutoEncoder", {"submodule_name": "mlp_out_layer_3"}, {}, "trainer.submodule_name='mlp_out_layer_3'"),
    ("AutoEncoder", {}, {"W_skip": torch.zeros(D, D)}, "tensor W_skip is not part of a AutoEncoder"),
])
def test_dictionary_learning_refusals(tmp_path: Path, dict_class: str, trainer: dict, extra: dict,
                                      message: str) -> None:
    with pytest.raises(SaeFormatError, match=message):
        load_sae(_write_dl(tmp_path, dict_class, {**_linear(_random(), "bias"), **extra}, **trainer))


def test_dictionary_learning_layer_input_is_resid_pre_and_a_corrupt_file_is_named(tmp_path: Path) -> None:
    folder = _write_dl(tmp_path / "a", "AutoEncoder", _linear(_random(), "bias"))
    config = json.loads((folder / "config.json").read_text())
    config["buffer"]["io"] = "in"
    (folder / "config.json").write_text(json.dumps(config))
    assert load_sae(folder).hook_point == "resid_pre"
    (folder / "ae.pt").write_bytes(b"not a zip or pickle")
    with pytest.raises(SaeFormatError, match=r"ae.pt: not a readable state dict"):
        load_sae(folder)


def test_our_own_files_still_round_trip_with_the_field_check(tmp_path: Path) -> None:
    for arch in ("relu", "jumprelu", "topk"):
        sae = make_sae(arch)
        assert load_sae(save_sae(sae, tmp_path / arch)).cfg == sae.cfg


# --- Llama Scope (lm_saes) ----------------------------------------------------------------------
def _write_llama_scope(folder: Path, t: dict[str, torch.Tensor], **cfg) -> Path:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": t["W_enc"].T.float().contiguous(), "encoder.bias": t["b_enc"].float(),
               "decoder.weight": t["W_dec"].T.float().contiguous(), "decoder.bias": t["b_dec"].float()},
              str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps({
        "hook_point_in": "blocks.5.hook_resid_post", "hook_point_out": "blocks.5.hook_resid_post", "d_model": D,
        "expansion_factor": F // D, "use_decoder_bias": True, "use_glu_encoder": False, "act_fn": "jumprelu",
        "jump_relu_threshold": 0.5, "apply_decoder_bias_to_pre_encoder": False, "norm_activation": "dataset-wise",
        "sparsity_include_decoder_norm": True, "top_k": 4, "dataset_average_activation_norm": {"in": 9.0, "out": 9.0},
        "l1_coefficient": 8e-5, "lp": 1, "seed": 42, "bias_init_method": "all_zero",
        "decoder_exactly_fixed_norm": False, "init_decoder_norm": 0.5, "init_encoder_norm": None,
        "init_encoder_with_decoder_transpose": True,
        "l1_coefficient_warmup_steps": 78125, "k_warmup_steps": 78125, "use_batch_norm_mse": True,
        "use_ghost_grads": False, "tp_size": 1, "ddp_size": 1, **cfg}))  # (as fnlp's released files)
    return folder


def _lm_saes(t: dict[str, torch.Tensor], x: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_saes' own encode and decode, in float64: (activations as it reports them, reconstruction)."""
    s_in, s_out = (D ** 0.5 / cfg["in"], D ** 0.5 / cfg["out"])
    xn = x * s_in - (t["b_dec"] if cfg["subtract"] else 0)
    norms = t["W_dec"].norm(dim=1)
    hidden = (xn @ t["W_enc"] + t["b_enc"]) * norms
    acts = (hidden * (hidden > 0.5) if cfg["act"] == "jumprelu" else _topk(torch.relu(hidden), 4)) / norms
    return acts, (acts @ t["W_dec"] + t["b_dec"]) / s_out


@pytest.mark.parametrize("cfg", [{"act": "jumprelu", "in": 9.0, "out": 9.0, "subtract": False},
                                 {"act": "topk", "in": 7.0, "out": 7.0, "subtract": True},
                                 {"act": "jumprelu", "in": 9.0, "out": 5.0, "subtract": False}])
def test_llama_scope_takes_its_dataset_norms_and_decoder_norms_exactly(tmp_path: Path, cfg: dict) -> None:
    t, x = _random(6), _x() * 3
    sae = load_sae(_write_llama_scope(tmp_path, t, act_fn=cfg["act"], apply_decoder_bias_to_pre_encoder=cfg["subtract"],
                                      dataset_average_activation_norm={"in": cfg["in"], "out": cfg["out"]}))
    assert (sae.cfg.architecture, sae.hook_layer, sae.hook_point) == (cfg["act"], 5, "resid_post")
    acts, recon = _lm_saes(t, x, cfg)
    # JumpReLU activations are lm_saes' own; TopK ones are in units of each decoder norm (the scale
    # its selection uses), as SAELens reports rescaled TopK SAEs.
    _check(sae, acts * t["W_dec"].norm(dim=1) if cfg["act"] == "topk" else acts, recon, x)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"norm_activation": "token-wise"}, "norm_activation='token-wise' is not supported"),
    ({"apply_decoder_bias_to_pre_encoder": True, "dataset_average_activation_norm": {"in": 9.0, "out": 4.0}},
     "apply_decoder_bias_to_pre_encoder=True is not supported"),
    ({"hook_point_out": "blocks.5.hook_mlp_out"}, "hook_point_out='blocks.5.hook_mlp_out'"),
    ({"hook_point_in": "blocks.5.hook_attn_out", "hook_point_out": "blocks.5.hook_attn_out"},
     "hook_point_in='blocks.5.hook_attn_out'"),
    ({"use_glu_encoder": True}, "use_glu_encoder=True"),
    ({"jump_relu_threshold": -0.1}, "jump_relu_threshold=-0.1"),
    ({"mystery": 1}, "field 'mystery' is not one this loader knows"),
])
def test_llama_scope_options_we_cannot_fold_are_refused_by_name(tmp_path: Path, cfg: dict, message: str) -> None:
    with pytest.raises(SaeFormatError, match=message):
        load_sae(_write_llama_scope(tmp_path, _random(), **cfg))


# --- single-file state dicts --------------------------------------------------------------------
def test_goodfire_state_dicts_and_openai_refusals(tmp_path: Path) -> None:
    t, x = _random(7), _x()
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save({"encoder_linear.weight": t["W_enc"].T.float().contiguous(), "encoder_linear.bias": t["b_enc"].float(),
                "decoder_linear.weight": t["W_dec"].T.float().contiguous(), "decoder_linear.bias": t["b_dec"].float()},
               path)
    sae = load_sae(path)
    assert (sae.hook_layer, sae.cfg.apply_b_dec_to_input) == (19, False)
    acts = torch.relu(x @ t["W_enc"] + t["b_enc"])  # Goodfire: relu(encoder_linear(x)), decoder_linear(f)
    _check(sae, acts, acts @ t["W_dec"] + t["b_dec"], x)
    openai = tmp_path / "5.pt"
    torch.save({"pre_bias": torch.zeros(D), "encoder.weight": torch.zeros(F, D), "latent_bias": torch.zeros(F),
                "decoder.weight": torch.zeros(D, F), "activation": "TopK", "activation_state_dict": {"k": 4}}, openai)
    with pytest.raises(SaeFormatError, match="layer-normalise each token's input"):
        load_sae(openai)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(SaeFormatError, match="not a known SAE layout"):
        load_sae(tmp_path / "other.pt")


# --- review findings: each once a silent mistake or an unnamed crash ----------------------------
def test_gemma_scope_releases_of_other_sites_are_refused_and_the_nearest_layer_counts(tmp_path: Path) -> None:
    import numpy as np

    t = {n: v.float().numpy() for n, v in _random().items()} | {"threshold": np.full(F, 0.1, dtype=np.float32)}
    for release in ("gemma-scope-2b-pt-mlp", "gemma-scope-2b-pt-att", "gemma-scope-2b-pt-transcoders"):
        folder = tmp_path / release / "layer_3" / "width_16k" / "average_l0_50"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **t)
        with pytest.raises(SaeFormatError, match=f"{release}' names an MLP, attention or transcoder release"):
            load_sae(folder)
    folder = tmp_path / "layer_9_runs" / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **t)
    assert load_sae(folder).hook_layer == 12


def test_bf16_files_are_folded_in_float32(tmp_path: Path) -> None:
    """SAELens TopK rescaled by decoder norm, saved in bf16: the fold runs after the cast to float32."""
    t, x = {n: v.to(torch.bfloat16).double() for n, v in _random(8).items()}, _x()
    folder = tmp_path / "bf16"
    folder.mkdir()
    save_file({n: v.to(torch.bfloat16).contiguous() for n, v in t.items()}, str(folder / "sae_weights.safetensors"))
    _write_saelens(tmp_path / "cfg", t, architecture="topk", k=4, rescale_acts_by_decoder_norm=True)
    (folder / "cfg.json").write_text((tmp_path / "cfg" / "cfg.json").read_text())
    norms = t["W_dec"].norm(dim=1)
    acts = _topk(((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms, 4)
    _check(load_sae(folder), acts, (acts / norms) @ t["W_dec"] + t["b_dec"], x)


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: _write_llama_scope(p, {**_random()}, dataset_average_activation_norm={"in": -3.0, "out": 3.0}),
     "norms must be positive"),
    (lambda p: _write_llama_scope(p, _random(), use_decoder_bias=False), "tensor decoder.bias is not part"),
    (lambda p: _write_dl(p, "AutoEncoder", {**_linear(_random(), "bias"), "threshold": torch.tensor(0.5)}),
     "tensor threshold is not part of a AutoEncoder"),
    (lambda p: _write_dl(p, "AutoEncoder", _linear(_random(), "bias"), submodule_name="layers.3.MLP"),
     "trainer.submodule_name='layers.3.MLP'"),
    (lambda p: _write_saelens(p, _random(), architecture="standard", activation_fn_kwargs=[4]),
     "unexpected content"),
    (lambda p: _write_saelens(p, {**_random(), "topk_threshold": torch.ones(3)}, architecture="batchtopk"),
     "topk_threshold must be a scalar"),
])
def test_odd_files_are_refused_naming_the_file(tmp_path: Path, write, message: str) -> None:
    folder = write(tmp_path / "sae")
    with pytest.raises(SaeFormatError, match=message) as info:
        load_sae(folder)
    assert str(tmp_path) in str(info.value)
