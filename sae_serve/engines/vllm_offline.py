"""Offline steered generation on vLLM: ``SteeredLLM`` wraps ``vllm.LLM`` with the plugin.

Specs are validated here against the same config the workers load, so a bad spec is refused
before it reaches the engine. Each steered request gets a ``cache_salt`` derived from its spec,
so prompts steered differently never share prefix-cache blocks; a request that reads features
gets a unique salt, so its prompt is always computed and its prompt activations come back.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_serve.config import SaeServeConfig, load_config, write_config
from sae_serve.engines.vllm_plugin import REQUEST_KEY, SPEC_KEY, WORKER_METHOD
from sae_serve.errors import SaeServeError
from sae_serve.sae.registry import build_registry
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


def cache_salt(spec: RequestSpec) -> str | None:
    """None for plain requests; the spec's hash when it steers; unique when it reads."""
    if spec.return_features is not None:
        return uuid.uuid4().hex
    if spec.steering and (spec.steering.interventions or spec.steering.vectors):
        return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:32]
    return None


@dataclass(frozen=True)
class EngineRequest:
    """What a steered request carries into vLLM, built the same way offline and by the servers."""

    key: str
    """The caller's key for fetching the request's activations from the workers."""
    extra_args: dict[str, str]
    """Flat ``SamplingParams.extra_args`` (also valid as the OpenAI server's ``vllm_xargs``)."""
    cache_salt: str | None

    def prompt(self, text: str) -> dict[str, str]:
        """The prompt as vLLM takes it, with the request's cache salt."""
        return {"prompt": text} if self.cache_salt is None else {"prompt": text, "cache_salt": self.cache_salt}


def engine_request(spec: RequestSpec) -> EngineRequest:
    key = uuid.uuid4().hex
    return EngineRequest(key, {SPEC_KEY: spec.model_dump_json(exclude_none=True), REQUEST_KEY: key},
                         cache_salt(spec))


def _features(raw: dict[str, Any], sae: str | None) -> FeatureActivations | None:
    if raw.get("error"):
        raise SaeServeError(f"the engine rejected a request's spec: {raw['error']}")
    got = raw["features"].get(sae) if sae else None
    if not got:
        return None
    return FeatureActivations(torch.tensor(got["positions"]), torch.tensor(got["indices"]),
                              torch.tensor(got["values"]))


class SteeredLLM:
    """``vllm.LLM`` with per-request SAE steering and feature readout."""

    def __init__(self, model: str | os.PathLike[str], config: SaeServeConfig | str | os.PathLike[str],
                 config_dir: Path | None = None, **llm_kwargs: Any) -> None:
        from vllm import LLM

        if isinstance(config, SaeServeConfig):
            folder = config_dir or Path(os.environ.get("TMPDIR", "/tmp"))
            config = write_config(config, folder / f"sae_serve-{uuid.uuid4().hex[:8]}.json")
        os.environ["SAE_SERVE_CONFIG"] = str(config)  # every vLLM process reads it
        loaded = load_config(config)
        self.registry, self.op = build_registry(loaded), loaded.op
        self.llm = LLM(model=str(model), **llm_kwargs)

    def validate(self, spec: RequestSpec | dict | None) -> tuple[RequestSpec, ResolvedRequest]:
        """Parse and resolve ``spec`` (raises SpecError / ValidationError naming the field)."""
        parsed = spec if isinstance(spec, RequestSpec) else RequestSpec.model_validate(spec or {})
        resolved = resolve(parsed, self.registry)
        self.op.check(resolved)
        return parsed, resolved

    def generate(self, prompts: Sequence[str], specs: Sequence[RequestSpec | dict | None],
                 sampling_params: Any) -> list[SteeredOutput]:
        """Generate ``prompts[i]`` under ``specs[i]``; every spec is checked before any is sent."""
        checked = [self.validate(s) for s in specs]
        engine = [engine_request(spec) for spec, _ in checked]
        items, params = [], []
        for prompt, req in zip(prompts, engine, strict=True):
            items.append(req.prompt(prompt))
            p = sampling_params.clone()
            p.extra_args = {**(p.extra_args or {}), **req.extra_args}
            params.append(p)
        outputs = self.llm.generate(items, params, use_tqdm=False)
        readouts: dict[str, Any] = {}
        for worker in self.llm.collective_rpc(WORKER_METHOD, args=([r.key for r in engine],)):
            readouts.update({k: v for k, v in worker.items() if v["features"] or v["error"]})
        results = []
        for out, (spec, resolved), req in zip(outputs, checked, engine, strict=True):
            completion = out.outputs[0]
            sae = spec.return_features.sae if spec.return_features else None
            results.append(SteeredOutput(
                list(out.prompt_token_ids), list(completion.token_ids), completion.text,
                _features(readouts.get(req.key, {"features": {}}), sae), resolved.applied))
        return results

