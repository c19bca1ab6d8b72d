"""Converters for research checkpoints: saprmarks/dictionary_learning trainers, OpenMOSS Llama
Scope (lm_saes), Gemma Scope 2 (params.safetensors), and single-file state dicts (Goodfire's Llama
SAEs; OpenAI's GPT-2 autoencoders, recognised and refused). Same rules as ``converters.py``: each
field maps onto our math exactly or is refused by name."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_serve.errors import SaeFormatError
from sae_serve.sae.reading import (
    Converted,
    exact_tensors,
    field,
    fold_decoder_norms,
    layer_from_path,
    make_config,
    read_json,
    read_safetensors,
    refuse,
    refuse_unknown,
    require_layer,
    residual_hook,
    torch_state,
)

DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
DICTIONARY_LEARNING_CFG = "config.json"
LLAMA_SCOPE_CFG = "hyperparams.json"
LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"
GEMMA_SCOPE_2_PARAMS = "params.safetensors"
GEMMA_SCOPE_2_CFG = "config.json"


# --- saprmarks/dictionary_learning: trainer_N/ae.pt + config.json -------------------------------
def _dl_linear(state: dict[str, torch.Tensor], b_dec: str) -> dict[str, torch.Tensor]:
    """nn.Linear encoder/decoder (weights stored (out, in)) as our tensors."""
    return {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"], "W_dec": state["decoder.weight"].T,
            "b_dec": state[b_dec]}


# dict_class -> (our architecture, subtracts b_dec before encoding, tensors from the state dict).
_DICTIONARY_LEARNING: dict[str, tuple[str, bool, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]] = {
    "AutoEncoder": ("relu", True, lambda s: _dl_linear(s, "bias")),
    "AutoEncoderNew": ("relu", False, lambda s: _dl_linear(s, "decoder.bias")),
    "AutoEncoderTopK": ("topk", True, lambda s: _dl_linear(s, "b_dec")),
    # BatchTopK encodes with its learned scalar threshold by default: relu(pre) * (relu(pre) > t).
    "BatchTopKSAE": ("jumprelu", True, lambda s: {**_dl_linear(s, "b_dec"), "threshold": s["threshold"]}),
    # JumpReLU does not subtract b_dec; Matryoshka (all groups active) is BatchTopK's form.
    "JumpReluAutoEncoder": ("jumprelu", False, lambda s: {n: s[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                                             "threshold")}),
    "MatryoshkaBatchTopKSAE": ("jumprelu", True, lambda s: {n: s[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                                               "threshold")}),
}
_DL_LINEAR = {"encoder.weight", "encoder.bias", "decoder.weight"}
_DL_KEYS = {  # every key each class's state dict holds (the ones not read above only trained it)
    "AutoEncoder": _DL_LINEAR | {"bias"}, "AutoEncoderNew": _DL_LINEAR | {"decoder.bias"},
    "AutoEncoderTopK": _DL_LINEAR | {"b_dec", "k", "threshold"},
    "BatchTopKSAE": _DL_LINEAR | {"b_dec", "k", "threshold"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "k", "group_sizes"}}


def _dl_hook(cfg_path: Path, trainer: dict[str, Any], buffer: dict[str, Any]) -> str:
    """dictionary_learning hooks a layer module: its output is resid_post, its input resid_pre."""
    name = str(trainer.get("submodule_name") or "")
    if re.search(r"mlp|attn|attention|embed|ffn|feed.?forward", name, re.I):
        raise refuse(cfg_path, "trainer.submodule_name", name, "only a decoder layer's residual stream is")
    io = buffer.get("io", "out")
    if io not in ("in", "out"):
        raise refuse(cfg_path, "buffer.io", io, "expected in or out")
    return "resid_pre" if io == "in" else "resid_post"


def from_dictionary_learning(folder: Path, hook_layer: int | None) -> Converted:
    cfg_path, weights = folder / DICTIONARY_LEARNING_CFG, folder / DICTIONARY_LEARNING_WEIGHTS
    cfg = read_json(cfg_path)
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    buffer = cfg.get("buffer") if isinstance(cfg.get("buffer"), dict) else {}
    dict_class = trainer.get("dict_class")
    if dict_class not in _DICTIONARY_LEARNING:
        why = ("a gated SAE gates with one affine map and scales with another" if dict_class == "GatedAutoEncoder"
               else f"supported: {sorted(_DICTIONARY_LEARNING)}")
        raise refuse(cfg_path, "trainer.dict_class", dict_class, why)
    state = torch_state(weights)
    arch, subtract_b_dec, convert = _DICTIONARY_LEARNING[dict_class]
    try:
        tensors = {n: t.contiguous() for n, t in convert(state).items()}
    except KeyError as exc:
        raise SaeFormatError(weights, f"missing tensor {exc} for a {dict_class}") from None
    extra = sorted(set(state) - _DL_KEYS[dict_class])
    if extra:
        raise SaeFormatError(weights, f"tensor {extra[0]} is not part of a {dict_class}")
    d_in, d_sae = tensors["W_enc"].shape
    if arch == "jumprelu":
        tensors["threshold"] = tensors["threshold"].reshape(-1).expand(d_sae).contiguous()
    k = state.get("k", trainer.get("k"))
    config = make_config(
        cfg_path, architecture=arch, d_in=d_in, d_sae=d_sae,
        hook_layer=require_layer(cfg_path, hook_layer if hook_layer is not None else trainer.get("layer")),
        hook_point=_dl_hook(cfg_path, trainer, buffer), model_name=trainer.get("lm_name"),
        apply_b_dec_to_input=subtract_b_dec, k=int(k) if arch == "topk" and k is not None else None)
    return config, tensors


# --- OpenMOSS Llama Scope (lm_saes): hyperparams.json + checkpoints/final.safetensors ------------
_LLAMA_SCOPE_FIELDS = frozenset({
    "hook_point_in", "hook_point_out", "d_model", "expansion_factor", "d_sae", "use_decoder_bias", "use_glu_encoder",
    "act_fn", "jump_relu_threshold", "apply_decoder_bias_to_pre_encoder", "norm_activation",
    "sparsity_include_decoder_norm", "top_k", "dataset_average_activation_norm", "sae_type",
    "sae_pretrained_name_or_path", "strict_loading", "l1_coefficient", "lp", "dtype", "device",
    "use_triton_kernel", "force_unit_decoder_norm", "sparsity_threshold_for_triton_spmm_kernel",
    "jumprelu_threshold_window",
    # training only (the released fnlp/Llama3_1-8B-Base-L*R-* files carry them)
    "seed", "bias_init_method", "decoder_exactly_fixed_norm", "init_decoder_norm", "init_encoder_norm",
    "init_encoder_with_decoder_transpose", "l1_coefficient_warmup_steps", "k_warmup_steps", "use_batch_norm_mse",
    "use_ghost_grads", "tp_size", "ddp_size"})


def _llama_scope_scales(cfg: dict[str, Any], source: Path) -> tuple[float, float]:
    """(s_in, s_out): lm_saes feeds x * s_in and its output is in units of 1 / s_out."""
    mode = cfg.get("norm_activation", "token-wise")
    if mode == "inference":  # the parameters were already standardised
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise refuse(source, "norm_activation", mode, "per-token or per-batch normalisation of the input is not")
    norms = cfg.get("dataset_average_activation_norm")
    if not isinstance(norms, dict) or not all(isinstance(norms.get(k), int | float) for k in ("in", "out")):
        raise SaeFormatError(source, "field dataset_average_activation_norm must hold numbers 'in' and 'out'")
    if norms["in"] <= 0 or norms["out"] <= 0:
        raise refuse(source, "dataset_average_activation_norm", norms, "norms must be positive")
    root = float(field(cfg, "d_model", int, source)) ** 0.5
    return root / norms["in"], root / norms["out"]


def from_llama_scope(folder: Path, hook_layer: int | None) -> Converted:
    cfg_path = folder / LLAMA_SCOPE_CFG
    cfg = read_json(cfg_path)
    act = cfg.get("act_fn", "relu")
    for name, value, bad, why in (
            ("sae_type", cfg.get("sae_type", "sae"), cfg.get("sae_type", "sae") != "sae", "only plain SAEs are"),
            ("use_glu_encoder", cfg.get("use_glu_encoder"), bool(cfg.get("use_glu_encoder")), "a gated encoder is not"),
            ("act_fn", act, act not in ("relu", "jumprelu", "topk"), "only relu, jumprelu and topk are"),
            ("hook_point_out", cfg.get("hook_point_out"), cfg.get("hook_point_out", cfg.get("hook_point_in")) !=
             cfg.get("hook_point_in"), "a transcoder predicts another site"),
            ("jump_relu_threshold", cfg.get("jump_relu_threshold"), act == "jumprelu" and
             cfg.get("jump_relu_threshold", 0) < 0, "lm_saes lets negative activations through below zero")):
        if bad:
            raise refuse(cfg_path, name, value, why)
    refuse_unknown(cfg, _LLAMA_SCOPE_FIELDS, cfg_path)
    hook = residual_hook(str(cfg.get("hook_point_in", "")))
    if hook is None:
        raise refuse(cfg_path, "hook_point_in", cfg.get("hook_point_in"), "only residual-stream SAEs are")
    s_in, s_out = _llama_scope_scales(cfg, cfg_path)
    bias = bool(cfg.get("use_decoder_bias", True))
    subtract = bias and bool(cfg.get("apply_decoder_bias_to_pre_encoder", True))
    if subtract and abs(s_in - s_out) > 1e-6 * s_in:  # (x s_in - b) W = (x - b / s_out) s_in W only if equal
        raise refuse(cfg_path, "apply_decoder_bias_to_pre_encoder", True, "with different in and out norms the "
                      "bias subtracted in normalised units has no raw-unit equivalent")
    raw = read_safetensors(folder / LLAMA_SCOPE_WEIGHTS)
    exact_tensors(raw, {"encoder.weight", "encoder.bias", "decoder.weight"} | ({"decoder.bias"} if bias else set()),
                  folder / LLAMA_SCOPE_WEIGHTS, "this SAE (use_decoder_bias, use_glu_encoder?)")
    d_sae = raw["encoder.weight"].shape[0]
    tensors = {"W_enc": raw["encoder.weight"].T * s_in, "b_enc": raw["encoder.bias"],
               "W_dec": raw["decoder.weight"].T, "b_dec": raw["decoder.bias"] if bias else
               torch.zeros(raw["decoder.weight"].shape[0])}
    # sparsity_include_decoder_norm: lm_saes activates pre * |W_dec_i| and divides the activations back.
    # For jumprelu that is pre gated at threshold / |W_dec_i| (its own activation values, exactly); relu
    # is unchanged by it; topk selects on the scaled values, so its norms are folded in (activations
    # then in units of |W_dec_i|, as SAELens reports rescaled TopK SAEs).
    norms = tensors["W_dec"].norm(dim=1) if cfg.get("sparsity_include_decoder_norm", True) else torch.ones(d_sae)
    if act == "topk":
        tensors = fold_decoder_norms(tensors)
    if act == "jumprelu":
        tensors["threshold"] = float(cfg.get("jump_relu_threshold", 0.0)) / norms
    tensors["W_dec"], tensors["b_dec"] = tensors["W_dec"] / s_out, tensors["b_dec"] / s_out  # back to raw units
    config = make_config(
        cfg_path, architecture=act, d_in=field(cfg, "d_model", int, cfg_path), d_sae=d_sae,
        hook_layer=hook_layer if hook_layer is not None else hook[0], hook_point=hook[1],
        apply_b_dec_to_input=subtract, k=int(cfg.get("top_k", 50)) if act == "topk" else None)
    return config, {n: t.contiguous() for n, t in tensors.items()}


# --- Gemma Scope 2 (Gemma 3): <site>/layer_N_width_W_l0_L/{config.json, params.safetensors} -------
_GEMMA_SCOPE_2_FIELDS = frozenset({"width", "model_name", "architecture", "l0", "affine_connection", "type",
                                   "hf_hook_point_in", "hf_hook_point_out"})
_GEMMA_SCOPE_2_TENSORS = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec",
                          "threshold": "threshold"}


def _gemma_scope_2_site(cfg: dict[str, Any], folder: Path, cfg_path: Path) -> int | None:
    """The residual-stream layer the SAE reads: from config.json's Hugging Face hook points, or, in a
    folder without one, from the release's site folder (resid_post/, resid_post_all/)."""
    if cfg.get("type", "sae") != "sae":
        raise refuse(cfg_path, "type", cfg["type"], "only SAEs are (a transcoder predicts another site)")
    if cfg.get("affine_connection"):
        raise refuse(cfg_path, "affine_connection", True, "a skip connection adds a map outside the dictionary")
    if "hf_hook_point_in" in cfg:
        hook = residual_hook(str(cfg["hf_hook_point_in"]))
        if hook is None:
            raise refuse(cfg_path, "hf_hook_point_in", cfg["hf_hook_point_in"], "only residual-stream SAEs "
                          "(model.layers.N.output) are")
        if cfg.get("hf_hook_point_out") not in (None, cfg["hf_hook_point_in"]):
            raise refuse(cfg_path, "hf_hook_point_out", cfg["hf_hook_point_out"], "a transcoder predicts another site")
        return hook[0]
    if not folder.parent.name.startswith("resid_post"):
        raise SaeFormatError(folder, f"no {GEMMA_SCOPE_2_CFG} and a site folder {folder.parent.name!r}: only "
                             "residual-stream SAEs (resid_post/) are supported, and no other site could be told apart")
    return layer_from_path(Path(folder.name), r"layer_(\d+)")


def from_gemma_scope_2(folder: Path, hook_layer: int | None) -> Converted:
    """JumpReLU without b_dec subtracted, as Gemma Scope 1 (tensors named w_enc, w_dec...)."""
    cfg_path = folder / GEMMA_SCOPE_2_CFG
    cfg = read_json(cfg_path) if cfg_path.exists() else {}
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise refuse(cfg_path, "architecture", cfg["architecture"], "Gemma Scope 2 SAEs are jump_relu")
    refuse_unknown(cfg, _GEMMA_SCOPE_2_FIELDS, cfg_path)
    layer = _gemma_scope_2_site(cfg, folder, cfg_path)
    path = folder / GEMMA_SCOPE_2_PARAMS
    raw = read_safetensors(path)
    exact_tensors(raw, _GEMMA_SCOPE_2_TENSORS, path, "a residual SAE")
    tensors = {ours: raw[theirs] for theirs, ours in _GEMMA_SCOPE_2_TENSORS.items()}
    if tensors["W_enc"].ndim != 2:
        raise SaeFormatError(path, "tensor w_enc must be 2-D")
    d_in, d_sae = tensors["W_enc"].shape
    if cfg.get("width", d_sae) != d_sae:
        raise SaeFormatError(cfg_path, f"field width={cfg['width']} but w_enc has {d_sae} features")
    config = make_config(
        path, architecture="jumprelu", d_in=d_in, d_sae=d_sae, model_name=cfg.get("model_name"),
        hook_layer=require_layer(path, hook_layer if hook_layer is not None else layer), apply_b_dec_to_input=False)
    return config, tensors


# --- single-file state dicts: Goodfire's Llama SAEs, OpenAI's GPT-2 autoencoders ---------------
def from_state_dict_file(path: Path, hook_layer: int | None) -> Converted:
    """Goodfire: relu(encoder_linear(x)), decoded by decoder_linear (no b_dec subtracted), layer in the
    file name (``...-SAE-l19.pth``). OpenAI's GPT-2 files are recognised and refused by name."""
    state = torch_state(path)
    if "pre_bias" in state and "latent_bias" in state:
        activation = state.get("activation")
        why = ("its TopK autoencoders layer-normalise each token's input and de-normalise the output"
               if activation == "TopK" else "only TopK files are residual-stream SAEs there")
        raise refuse(path, "activation", activation, f"OpenAI's GPT-2 autoencoder: {why}")
    names = {"encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"}
    if set(state) != names:
        raise SaeFormatError(path, f"a state dict with {sorted(state)[:6]}: not a known SAE layout (Goodfire's is "
                             f"{sorted(names)})")
    layer = hook_layer if hook_layer is not None else layer_from_path(Path(path.name), r"-l(\d+)\.pth?$")
    d_sae, d_in = state["encoder_linear.weight"].shape
    config = make_config(path, architecture="relu", d_in=d_in, d_sae=d_sae, hook_layer=require_layer(path, layer),
                          apply_b_dec_to_input=False)
    return config, {"W_enc": state["encoder_linear.weight"].T.contiguous(), "b_enc": state["encoder_linear.bias"],
                    "W_dec": state["decoder_linear.weight"].T.contiguous(), "b_dec": state["decoder_linear.bias"]}


