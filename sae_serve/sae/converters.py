"""SAE files written by other libraries -> our ``SaeConfig`` and tensors under SAELens names.

One converter per source, picked by the files a folder holds (``detect``). Each reads the
layout from the library's own code, and every config field either maps to our math or is
refused with an error naming the file and the field: a loader that ignored an option that
changes the encoder would steer with a silently wrong dictionary. Options that only trained the
SAE are listed as harmless. Where a library's option is a reparametrisation (SAELens'
``rescale_acts_by_decoder_norm``, a fine-tuning scale), it is folded into the weights exactly.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_serve.errors import SaeFormatError
from sae_serve.sae.converters_extra import (
    DICTIONARY_LEARNING_WEIGHTS,
    GEMMA_SCOPE_2_PARAMS,
    LLAMA_SCOPE_WEIGHTS,
    from_dictionary_learning,
    from_gemma_scope_2,
    from_llama_scope,
    from_state_dict_file,
)
from sae_serve.sae.reading import (
    Converted,
    as_float32,
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
)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
GEMMA_SCOPE_NOT_RESIDUAL = re.compile(r"gemma-scope.*-(mlp|att|transcoders?)\b", re.I)


# --- SAELens (our native format: cfg.json + sae_weights.safetensors) --------------------------
_SAELENS_ARCHITECTURES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu",
                          "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
_SAELENS_REFUSED = {
    "gated": "a gated SAE gates with one affine map and scales with another, not one encoder and activation",
    "transcoder": "a transcoder predicts another site; it does not reconstruct the residual stream it reads",
    "skip_transcoder": "a transcoder predicts another site; it does not reconstruct the residual stream it reads",
    "jumprelu_transcoder": "a transcoder predicts another site; it does not reconstruct the residual stream",
    "jumprelu_skip_transcoder": "a transcoder predicts another site; it does not reconstruct the residual stream",
    "temporal": "temporal SAEs read context across tokens",
    "matching_pursuit": "matching-pursuit SAEs encode iteratively",
}
# Fields that do not change inference, or that the converter reads below.
_SAELENS_FIELDS = frozenset({
    "architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm", "hook_name", "hook_layer",
    "hook_point", "hook_head_index", "hook_point_layer", "hook_point_head_index", "model_name",
    "activation_fn_str", "activation_fn", "activation_fn_kwargs", "finetuning_scaling_factor",
    "sae_lens_version", "sae_lens_training_version", "prepend_bos", "dataset_path", "dataset_trust_remote_code",
    "context_size", "neuronpedia_id", "model_from_pretrained_kwargs", "seqpos_slice", "decoder_init_norm",
    "l1_coefficient", "lp_norm", "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
    "l0_coefficient", "pre_act_loss_coefficient", "use_sparse_activations", "aux_loss_coefficient",
    "topk_threshold_lr", "matryoshka_widths", "training_architecture", "training_architecture_details",
    "l1_warm_up_steps", "l0_warm_up_steps", "jumprelu_tanh_scale", "jumprelu_ste_to_input", "target_l0",
    "use_matryoshka_aux_loss",
})


def _saelens_6(cfg: dict[str, Any]) -> bool:
    """Written by SAELens 6 or later (or by us): a ``metadata`` object, or a version from 6 on."""
    major = str(cfg.get("sae_lens_version") or cfg.get("sae_lens_training_version") or "0").split(".")[0]
    return isinstance(cfg.get("metadata"), dict) or (major.isdigit() and int(major) >= 6)


def _saelens_architecture(cfg: dict[str, Any], source: Path) -> str:
    """SAELens v6 ``architecture``, or before v6 ``architecture`` + ``activation_fn_str``."""
    activation = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if activation not in ("relu", "topk"):
        raise refuse(source, "activation_fn_str", activation, "only relu and topk activations are")
    name = cfg.get("architecture") or "standard"
    if name == "standard" and activation == "topk":
        name = "topk"
    if name in _SAELENS_REFUSED:
        raise refuse(source, "architecture", name, _SAELENS_REFUSED[name])
    if name not in _SAELENS_ARCHITECTURES:
        raise refuse(source, "architecture", name, f"supported: {sorted(_SAELENS_ARCHITECTURES)}")
    return name


def _saelens_checks(cfg: dict[str, Any], metadata: dict[str, Any], source: Path) -> None:
    norm = cfg.get("normalize_activations")
    if norm in (True, "expected_average_only_in"):  # (SAELens sets 'none' when it folds the factor in)
        raise refuse(source, "normalize_activations", norm, "its scale factor is not in the file (SAELens keeps it "
                      "as norm_scaling_factor in pretrained_saes.yaml, or in the trainer's state): fold it in "
                      "(W_enc *= s, W_dec /= s, b_dec /= s) and set 'none'")
    if norm not in (None, False, "none"):
        raise refuse(source, "normalize_activations", norm, "per-token normalisation of the input is not")
    if cfg.get("reshape_activations") not in (None, "none"):
        raise refuse(source, "reshape_activations", cfg["reshape_activations"],
                      "only residual-stream SAEs are (hook_z SAEs read attention heads)")
    for name in ("hook_head_index", "hook_point_head_index"):
        if cfg.get(name, metadata.get(name)) is not None:
            raise refuse(source, name, cfg.get(name, metadata.get(name)), "only whole residual-stream vectors are")


def _saelens_tensors(cfg: dict[str, Any], arch: str, folder: Path) -> dict[str, torch.Tensor]:
    path = folder / SAELENS_WEIGHTS
    tensors = read_safetensors(path)
    if "log_threshold" in tensors:  # SAELens JumpReLU training checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if arch in ("batchtopk", "matryoshka_batchtopk"):  # inference: the learned threshold (as SAELens exports)
        if "topk_threshold" not in tensors:
            raise SaeFormatError(path, f"a {arch} SAE needs its topk_threshold tensor")
        threshold = tensors.pop("topk_threshold")
        if threshold.numel() != 1:
            raise SaeFormatError(path, f"tensor topk_threshold must be a scalar, has shape {tuple(threshold.shape)}")
        tensors["threshold"] = threshold.reshape(1).expand(tensors["b_enc"].shape[0]).contiguous()
    if cfg.get("rescale_acts_by_decoder_norm") and arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        tensors = fold_decoder_norms(tensors)
    scales = [tensors.pop(name) for name in ("finetuning_scaling_factor", "scaling_factor") if name in tensors]
    if len(scales) > 1:
        raise SaeFormatError(path, "tensors finetuning_scaling_factor and scaling_factor are both present")
    scale = scales[0] if scales else None
    if scale is not None and scale.shape != tensors["b_enc"].shape:
        raise SaeFormatError(path, f"tensor scaling_factor has shape {tuple(scale.shape)}, expected one per feature")
    if scale is not None and not (cfg.get("finetuning_scaling_factor") or torch.all(scale == 1)):
        raise SaeFormatError(path, "tensor scaling_factor is not all ones but finetuning_scaling_factor is off")
    if scale is not None:  # decode is (a * scale) W_dec: fold it into the decoder rows
        tensors["W_dec"] = tensors["W_dec"] * scale[:, None]
    elif cfg.get("finetuning_scaling_factor"):
        raise SaeFormatError(path, "finetuning_scaling_factor is on but the file has no scaling tensor")
    return tensors


def from_saelens(folder: Path, hook_layer: int | None) -> Converted:
    cfg_path = folder / SAELENS_CFG
    cfg = read_json(cfg_path)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch = _saelens_architecture(cfg, cfg_path)
    _saelens_checks(cfg, metadata, cfg_path)
    if _saelens_6(cfg):
        refuse_unknown(cfg, _SAELENS_FIELDS, cfg_path)
    # (Before 6, SAELens' trainer saved its whole run config here, and SAELens reads only the SAE's own
    # fields, every one of which is read or checked above: the rest trained the SAE.)
    point = str(cfg.get("hook_point", "resid_post"))  # ours ("resid_post"), or SAELens' old name of hook_name
    hook_name = cfg.get("hook_name") or (point if point not in ("resid_post", "resid_pre") else "") or \
        metadata.get("hook_name")
    hook = residual_hook(str(hook_name or ""))
    if hook_name and hook is None:
        raise refuse(cfg_path, "hook_name", hook_name, "only residual-stream SAEs are "
                      "(blocks.N.hook_resid_post, blocks.N.hook_resid_pre, or a decoder layer's output model.layers.N)")
    recorded = hook[0] if hook else cfg.get("hook_layer", cfg.get("hook_point_layer", metadata.get("hook_layer")))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    config = make_config(
        cfg_path, architecture=_SAELENS_ARCHITECTURES[arch], d_in=field(cfg, "d_in", int, cfg_path),
        d_sae=field(cfg, "d_sae", int, cfg_path),
        hook_layer=require_layer(cfg_path, hook_layer if hook_layer is not None else recorded),
        hook_point=hook[1] if hook else point,
        model_name=cfg.get("model_name") or metadata.get("model_name"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        k=int(k) if k is not None and arch == "topk" else None)
    return config, _saelens_tensors(cfg, arch, folder)


# --- EleutherAI sparsify: <hookpoint>/cfg.json + sae.safetensors -------------------------------
_SPARSIFY_FIELDS = frozenset({"activation", "expansion_factor", "normalize_decoder", "num_latents", "k",
                              "multi_topk", "skip_connection", "transcode", "signed", "d_in"})
_SPARSIFY_HOOK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)$")


def from_sparsify(folder: Path, hook_layer: int | None) -> Converted:
    cfg_path = folder / SAELENS_CFG
    cfg = read_json(cfg_path)
    for flag, why in (("skip_connection", "it adds x W_skip^T, outside the dictionary"),
                      ("transcode", "a transcoder predicts a module's output from its input"),
                      ("signed", "signed activations are not")):
        if cfg.get(flag):
            raise refuse(cfg_path, flag, cfg[flag], why)
    if cfg.get("activation", "topk") != "topk":
        raise refuse(cfg_path, "activation", cfg["activation"], "only topk is (groupmax keeps one feature per group)")
    refuse_unknown(cfg, _SPARSIFY_FIELDS, cfg_path)
    raw = read_safetensors(folder / SPARSIFY_WEIGHTS)
    extra = sorted(set(raw) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise SaeFormatError(folder / SPARSIFY_WEIGHTS, f"tensor {extra[0]} is not part of a plain sparsify SAE")
    try:
        tensors = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"],
                   "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    except KeyError as exc:
        raise SaeFormatError(folder / SPARSIFY_WEIGHTS, f"missing tensor {exc}") from None
    # sparsify records the hookpoint only as the folder's name: the output of layers.N (or h.N).
    if hook_layer is None and not _SPARSIFY_HOOK.search(folder.name):
        raise SaeFormatError(folder, f"hookpoint {folder.name!r} is not a decoder layer's output (the residual "
                             "stream): pass hook_layer only if it is one")
    d_in = field(cfg, "d_in", int, cfg_path)
    config = make_config(
        cfg_path, architecture="topk", d_in=d_in,
        d_sae=cfg.get("num_latents") or d_in * field(cfg, "expansion_factor", int, cfg_path),
        hook_layer=require_layer(cfg_path, hook_layer if hook_layer is not None else
                                  layer_from_path(Path(folder.name), _SPARSIFY_HOOK.pattern)),
        apply_b_dec_to_input=True, k=field(cfg, "k", int, cfg_path))
    return config, tensors


# --- Gemma Scope: params.npz -------------------------------------------------------------------
def from_gemma_scope(npz_path: Path, hook_layer: int | None) -> Converted:
    try:
        with np.load(npz_path) as params:
            tensors = as_float32({name: torch.from_numpy(np.asarray(params[name])) for name in params.files})
    except FileNotFoundError:
        raise SaeFormatError(npz_path, "file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SaeFormatError(npz_path, f"not a readable .npz file ({exc})") from None
    if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
        raise SaeFormatError(npz_path, "missing a 2-D tensor W_enc")
    d_in, d_sae = tensors["W_enc"].shape
    # Releases name their site (gemma-scope-2b-pt-res, -mlp, -att, -transcoders): the files look alike.
    site = next((p for p in npz_path.parts if GEMMA_SCOPE_NOT_RESIDUAL.search(p)), None)
    if site is not None:
        raise SaeFormatError(npz_path, f"{site!r} names an MLP, attention or transcoder release: only "
                             "residual-stream SAEs (-res) are supported")
    # Gemma Scope paths look like layer_20/width_16k/average_l0_71/params.npz: the nearest layer_N.
    layers = [int(p[6:]) for p in npz_path.parts if re.fullmatch(r"layer_\d+", p)]
    layer = hook_layer if hook_layer is not None else (layers[-1] if layers else None)
    config = make_config(npz_path, architecture="jumprelu", d_in=d_in, d_sae=d_sae,
                          hook_layer=require_layer(npz_path, layer), apply_b_dec_to_input=False)
    return config, tensors


def detect(path: Path) -> tuple[Callable[[Path, int | None], Converted], Path]:
    """Pick the converter from the files present."""
    if path.is_file() and path.suffix == ".npz":
        return from_gemma_scope, path
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return from_state_dict_file, path
    if path.is_dir():
        for weights, converter, source in ((SAELENS_WEIGHTS, from_saelens, path),
                                           (SPARSIFY_WEIGHTS, from_sparsify, path),
                                           (DICTIONARY_LEARNING_WEIGHTS, from_dictionary_learning, path),
                                           (LLAMA_SCOPE_WEIGHTS, from_llama_scope, path),
                                           (GEMMA_SCOPE_PARAMS, from_gemma_scope, path / GEMMA_SCOPE_PARAMS),
                                           (GEMMA_SCOPE_2_PARAMS, from_gemma_scope_2, path)):
            if (path / weights).exists():
                return converter, source
        raise SaeFormatError(path, f"no SAE found: expected {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} "
                             f"(sparsify), {DICTIONARY_LEARNING_WEIGHTS} (dictionary_learning), "
                             f"{LLAMA_SCOPE_WEIGHTS} (Llama Scope), {GEMMA_SCOPE_PARAMS} (Gemma Scope) or "
                             f"{GEMMA_SCOPE_2_PARAMS} (Gemma Scope 2), or pass a "
                             ".npz (Gemma Scope) or .pt/.pth file (Goodfire)")
    raise SaeFormatError(path, "no such SAE folder or .npz/.pt file")
