"""Harvesting activations on vLLM: the plugin returns each context's residual stream after the
harvested layer (``return_hidden_states``), in place of transformers' forward hook.

``sae-serve harvest --engine vllm`` hands this to ``train.activations.harvest``, which writes the
same shards as the transformers path, in the same cache folder, so ``sae-serve train`` finds them.
Tensor parallelism and vLLM's other engine options pass through.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sae_serve.config import HiddenStatesConfig, LimitsConfig, SaeServeConfig
from sae_serve.engines.vllm_offline import SteeredLLM
from sae_serve.errors import SaeServeError


class VllmActivations:
    """``ContextActivations`` of ``layer`` on a vLLM engine (no SAE needed: the layer is exposed)."""

    def __init__(self, model: str | os.PathLike[str], layer: int, ctx_len: int, config_dir: Path | None = None,
                 **llm_kwargs: Any) -> None:
        from vllm import SamplingParams

        # Offline use is trusted: the only limit is what one context's states take. States wait on
        # the workers until the whole batch is done, however long it takes.
        config = SaeServeConfig(hidden_states=HiddenStatesConfig(layers=(layer,), stop_after=layer),
                                limits=LimitsConfig(max_hidden_state_bytes=2**31, readout_ttl_s=3600))
        llm_kwargs.setdefault("max_model_len", ctx_len + 1)  # the context, and the one token sampled
        # Compiled on the V1 runner (CUDA graphs help decoding, not this prefill; torch.compile fuses
        # the layers' pointwise work: 1.2x eager on 2 CPU cores), in steps of 4,096 tokens (1.03x
        # vLLM's CPU default of more; bench/harvest_engines.py).
        llm_kwargs.setdefault("enforce_eager", False)
        llm_kwargs.setdefault("max_num_batched_tokens", max(4096, ctx_len + 1))
        llm_kwargs.setdefault("enable_prefix_caching", False)  # (a reader's prompt is never shared anyway)
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        # The model stops after ``layer``: a compiled forward cached on disk must not serve a whole-model run.
        os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
        self.llm = SteeredLLM(model, config, config_dir=config_dir, **llm_kwargs)
        self.layer = layer
        self.spec = {"return_hidden_states": {"layers": [layer], "positions": "all"}}
        self.params = SamplingParams(max_tokens=1, temperature=0)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        outputs = self.llm.generate([row.tolist() for row in ids], [self.spec] * len(ids), self.params)
        for out in outputs:
            got = out.hidden_states.get(self.layer, ([], None))[0]
            if got != list(range(ids.shape[1])):
                raise SaeServeError(f"vLLM returned hidden states at {len(got)} of the {ids.shape[1]} positions")
        return torch.stack([out.hidden_states[self.layer][1] for out in outputs])
