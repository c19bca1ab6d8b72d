"""Offline steered generation on vLLM: ``SteeredLLM`` wraps ``vllm.LLM`` with the plugin.

Offline use in the caller's own process is trusted: specs are checked here against the same
config the workers load (not against the serving policy), then admitted (signed with the secret
this process makes and vLLM's workers inherit, ``protocol.py``). Each steered request gets a
cache salt keyed on its spec, so prompts steered differently never share prefix-cache blocks; a
request that reads features gets a unique salt, so its prompt is computed and read.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_serve.config import SaeServeConfig, load_config, write_config
from sae_serve.engines.protocol import (
    CAPABILITIES,
    POP_READOUTS,
    WorkerCapabilities,
    WorkerReply,
    admit,
    ensure_secret,
    merge_replies,
)
from sae_serve.errors import SpecError, WorkerError
from sae_serve.sae.registry import build_registry
from sae_serve.steering.guardrails import Firing
from sae_serve.steering.hook import FeatureActivations
from sae_serve.steering.spec import AppliedIntervention, RequestSpec, ResolvedRequest, resolve


@dataclass(frozen=True)
class SteeredOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    features: FeatureActivations | None
    """The ``return_features`` readout, by position (as the reference engine reports it)."""
    applied: tuple[AppliedIntervention, ...]
    finish_reason: str | None = None
    """vLLM's, or ``content_filter`` when a guardrail aborted the request."""
    guardrails: tuple[Firing, ...] = ()
    """The guardrails that fired."""
    hidden_states: dict[int, tuple[list[int], torch.Tensor]] | None = None
    """``return_hidden_states``: by layer, the positions read and their (positions, d_model) states."""


def _features(reply: WorkerReply, sae: str | None) -> FeatureActivations | None:
    if reply.error:
        raise WorkerError(f"the engine could not serve a request as admitted: {reply.error}")
    got = reply.features.get(sae) if sae else None
    if not got:
        return None
    return FeatureActivations(torch.tensor(got.positions), torch.tensor(got.indices), torch.tensor(got.values))


class SteeredLLM:
    """``vllm.LLM`` with per-request SAE steering and feature readout."""

    def __init__(self, model: str | os.PathLike[str], config: SaeServeConfig | str | os.PathLike[str],
                 config_dir: Path | None = None, **llm_kwargs: Any) -> None:
        from vllm import LLM

        if isinstance(config, SaeServeConfig):
            folder = config_dir or Path(os.environ.get("TMPDIR", "/tmp"))
            config = write_config(config, folder / f"sae_serve-{uuid.uuid4().hex[:8]}.json")
        os.environ["SAE_SERVE_CONFIG"] = str(config)  # every vLLM process reads it
        ensure_secret()  # before vLLM starts its workers: they inherit it
        loaded = load_config(config)
        self.registry, self.limits, self.server_rules = build_registry(loaded), loaded.limits, list(loaded.guardrails)
        self.llm = LLM(model=str(model), **llm_kwargs)
        caps = WorkerCapabilities.from_workers(self.llm.collective_rpc(CAPABILITIES))
        if caps is None:
            raise WorkerError("vLLM's workers loaded no SAEs: is the sae_serve general plugin disabled (VLLM_PLUGINS)?")
        self.capabilities = caps

    def validate(self, spec: RequestSpec | dict | None) -> tuple[RequestSpec, ResolvedRequest]:
        """Parse and resolve ``spec`` (raises SpecError / ValidationError naming the field)."""
        parsed = spec if isinstance(spec, RequestSpec) else RequestSpec.model_validate(spec or {})
        if self.server_rules:  # the workers run them on every request; here they decide how it may stop
            parsed = parsed.model_copy(update={"server_guardrails": self.server_rules})
        resolved = resolve(parsed, self.registry)
        self.capabilities.check(resolved, self.limits)
        return parsed, resolved

    def generate(self, prompts: Sequence[str | list[int]], specs: Sequence[RequestSpec | dict | None],
                 sampling_params: Any, lora_request: Any = None) -> list[SteeredOutput]:
        """Generate ``prompts[i]`` (text or token ids) under ``specs[i]`` (and vLLM's
        ``lora_request``, one or a list); every spec is checked before any is sent. With ``n`` > 1,
        one output per completion, prompt-major: each runs as its own request (its own readout and
        rules; seeded ``seed + j`` as vLLM seeds its children)."""
        n = sampling_params.n
        checked = [got for got in (self.validate(s) for s in specs) for _ in range(n)]
        engine = [admit(spec) for spec, _ in checked]
        items, params = [], []
        for i, (prompt, req, (_, resolved)) in enumerate(zip(
                [p for p in prompts for _ in range(n)], engine, checked, strict=True)):
            items.append(req.prompt(prompt))
            p = sampling_params.clone()
            p.n = 1
            if p.seed is not None:
                p.seed += i % n
            p.extra_args = {**(p.extra_args or {}), **req.extra_args}
            if p.structured_outputs is not None and any(rule.action == "abort" for rule in resolved.guardrails):
                raise SpecError("structured_outputs", "cannot be combined with guardrails that abort (the grammar "
                                "would refuse the end of sequence an abort emits)")
            params.append(p)
        if isinstance(lora_request, list):
            lora_request = [r for r in lora_request for _ in range(n)]
        outputs = self.llm.generate(items, params, use_tqdm=False, lora_request=lora_request)
        keys = [r.key for r in engine]
        readouts = merge_replies(self.llm.collective_rpc(POP_READOUTS, args=(keys,)), keys)
        results = []
        for out, (spec, resolved), req in zip(outputs, checked, engine, strict=True):
            completion, reply = out.outputs[0], readouts[req.key]
            sae = spec.return_features.sae if spec.return_features else None
            fired = tuple(Firing(**f) for f in reply.guardrails)
            reason = completion.finish_reason
            if self.capabilities.ended_by_guardrail(any(f.action == "abort" for f in fired), reason,
                                                    completion.stop_reason):
                reason = "content_filter"
            results.append(SteeredOutput(
                list(out.prompt_token_ids), list(completion.token_ids), completion.text,
                _features(reply, sae), resolved.applied, reason, fired,
                {h.layer: (h.positions, h.tensor()) for h in reply.hidden_states} if resolved.hidden else None))
        return results

