"""The reference engine: a transformers causal LM with the steering hook on each SAE's layer.

It exists to be obviously right, not fast: batched generation in which every sequence carries
its own request, with left padding whose rows are never steered or read. Training, evaluation
and the vLLM tests use it as ground truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from sae_serve.architectures import decoder_layers
from sae_serve.sae.registry import LoadedSae, SaeRegistry, registry_of
from sae_serve.steering.guardrails import Firing, aborting, firings
from sae_serve.steering.hook import FeatureActivations, apply_plan, splice
from sae_serve.steering.plan import RequestPlan, RequestRows, build_plan, guard_states, prepare_all
from sae_serve.steering.spec import ResolvedRequest

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class Generation:
    """One sequence's result."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length", "content_filter"]
    features: FeatureActivations | None
    """Activations requested by ``return_features``, by position (prompt and generated tokens
    that were fed to the model; the last generated token never is)."""
    guardrails: tuple[Firing, ...] = ()
    """The guardrails that fired; an abort ends the sequence after the token it fired on."""


@dataclass
class _Step:
    """What the hooks need during one forward call."""

    plans: Sequence[dict[str, RequestPlan]]  # per sequence: its prepared work by SAE name
    layout: Sequence[RequestRows]
    splice: frozenset[str]
    readouts: dict[int, list[FeatureActivations]] = field(default_factory=dict)


def _concat(chunks: list[FeatureActivations]) -> FeatureActivations:
    return FeatureActivations(*(torch.cat(parts) for parts in zip(*chunks, strict=True)))


class HFEngine:
    """Steered generation and scoring with a transformers model."""

    def __init__(self, model: nn.Module, tokenizer: object, registry: SaeRegistry | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.registry = registry or registry_of({})
        self.layers = decoder_layers(model)
        self.registry.check_fits(model.config.get_text_config().hidden_size, len(self.layers))
        self._step: _Step | None = None
        self._handles = [self._install(loaded) for loaded in self.registry.saes.values()]

    @classmethod
    def load(cls, path: str | os.PathLike[str], registry: SaeRegistry | None = None,
             dtype: torch.dtype = torch.float32) -> HFEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, tokenizer, registry)

    # --- the hook -------------------------------------------------------------------------------
    def _edit(self, loaded: LoadedSae, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d_in) -> the same, edited for the current step."""
        step = self._step
        if step is None:
            return hidden
        flat = hidden.reshape(-1, hidden.shape[-1])
        if loaded.name in step.splice:
            return splice(flat, loaded.sae).view_as(hidden)
        plan = build_plan([p.get(loaded.name) for p in step.plans], step.layout)
        result = apply_plan(flat, loaded.sae, plan)
        for request, acts in result.readouts.items():
            step.readouts.setdefault(request, []).append(acts)
        return result.x.view_as(hidden)

    def _install(self, loaded: LoadedSae) -> torch.utils.hooks.RemovableHandle:
        layer = self.layers[loaded.sae.hook_layer]
        if loaded.sae.hook_point == "resid_post":
            def post(module: nn.Module, args: tuple, output: object) -> object:
                if isinstance(output, tuple):
                    return (self._edit(loaded, output[0]), *output[1:])
                return self._edit(loaded, output)
            return layer.register_forward_hook(post)

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (self._edit(loaded, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._edit(loaded, kwargs["hidden_states"])}
        return layer.register_forward_pre_hook(pre, with_kwargs=True)

    @contextmanager
    def _stepping(self, step: _Step) -> Iterator[_Step]:
        self._step = step
        try:
            yield step
        finally:
            self._step = None

    def _prepare(self, requests: Sequence[ResolvedRequest | None]) -> list[dict[str, RequestPlan]]:
        saes = {name: loaded.sae for name, loaded in self.registry.saes.items()}
        return [prepare_all(req, saes, probes=self.registry.probes) for req in requests]

    # --- batching -------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return list(prompt)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p):] = 1
        return ids, mask

    def _forward(self, step: _Step, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: object | None) -> tuple[torch.Tensor, object]:
        with torch.no_grad(), self._stepping(step):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    # --- public API -----------------------------------------------------------------------------
    def logits(self, prompts: Sequence[Prompt], requests: Sequence[ResolvedRequest | None] | None = None,
               splice_saes: Sequence[str] = ()) -> list[torch.Tensor]:
        """Per prompt, (len, vocab) next-token logits under its request (or with SAEs spliced in)."""
        token_lists = [self.tokenize(p) for p in prompts]
        ids, mask = self._left_pad(token_lists)
        width = ids.shape[1]
        layout = [RequestRows(b * width + width - len(p), (b + 1) * width, 0, len(p))
                  for b, p in enumerate(token_lists)]
        step = _Step(self._prepare(requests or [None] * len(prompts)), layout, frozenset(splice_saes))
        logits, _ = self._forward(step, ids, mask, (mask.cumsum(1) - 1).clamp(min=0), None)
        return [logits[b, width - len(p):].float() for b, p in enumerate(token_lists)]

    def generate(
        self,
        prompts: Sequence[Prompt],
        requests: Sequence[ResolvedRequest | None] | None = None,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        seeds: Sequence[int] | None = None,
        stop_at_eos: bool = True,
    ) -> list[Generation]:
        """Generate for a batch; sequence b is steered and read by ``requests[b]`` alone."""
        token_lists = [self.tokenize(p) for p in prompts]
        requests = list(requests or [None] * len(prompts))
        pick = _sampler(temperature, seeds or [0] * len(prompts))
        ids, mask = self._left_pad(token_lists)
        batch, width = ids.shape
        lens = [len(p) for p in token_lists]
        plans = self._prepare(requests)
        step = _Step(plans, [RequestRows(b * width + width - n, (b + 1) * width, 0, n)
                             for b, n in enumerate(lens)], frozenset())
        logits, cache = self._forward(step, ids, mask, (mask.cumsum(1) - 1).clamp(min=0), None)
        out: list[list[int]] = [[] for _ in range(batch)]
        done, aborted = [False] * batch, [False] * batch
        eos = self.tokenizer.eos_token_id
        aborts = [[s for s in guard_states(p) if s.rule.action == "abort"] for p in plans]
        for j in range(max_new_tokens):
            for b in range(batch):
                if not done[b]:
                    aborted[b] = bool(aborts[b]) and bool(aborting(aborts[b]))
                    token = eos if aborted[b] else pick(b, logits[b, -1])
                    out[b].append(token)
                    done[b] = aborted[b] or (stop_at_eos and token == eos) or j + 1 == max_new_tokens
            if all(done):
                break
            # Feed each sequence's newest token; finished sequences are computed but never read.
            new = torch.tensor([[seq[-1]] for seq in out])
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
            positions = torch.tensor([[n + j] for n in lens])
            layout = [RequestRows(b, b if done[b] else b + 1, lens[b] + j, lens[b]) for b in range(batch)]
            logits, cache = self._forward(_Step(plans, layout, frozenset(), step.readouts),
                                          new, mask, positions, cache)
        return [self._result(token_lists[b], out[b], step.readouts.get(b), eos, aborted[b],
                             tuple(firings(guard_states(plans[b])))) for b in range(batch)]

    def _result(self, prompt: list[int], tokens: list[int], chunks: list[FeatureActivations] | None, eos: int,
                aborted: bool, fired: tuple[Firing, ...]) -> Generation:
        reason: Literal["stop", "length", "content_filter"] = (
            "content_filter" if aborted else "stop" if tokens and tokens[-1] == eos else "length")
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(prompt, tokens, text, reason, _concat(chunks) if chunks else None, fired)


def _sampler(temperature: float, seeds: Sequence[int]) -> Callable[[int, torch.Tensor], int]:
    """Greedy at temperature 0; otherwise one generator per sequence, so a sequence's samples do
    not depend on its neighbours."""
    if temperature <= 0:
        return lambda b, logits: int(torch.argmax(logits))
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def sample(b: int, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generators[b]))
    return sample
