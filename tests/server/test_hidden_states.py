"""return_hidden_states through `sae-serve serve`: HTTP (whole and streamed), chat and gRPC give
transformers' residual stream after the layers asked for; limits and unexposed layers are a 400 /
INVALID_ARGUMENT naming the field. The shared server exposes layers 14 (config) and 15 (its SAE's),
and holds at most 3 MiB of states per request."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from tests.server.harness import FRENCH

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]
PROMPT = "The weather today is"
READ = {"return_hidden_states": {"layers": [14, 15], "positions": "all", "dtype": "float16"}}  # 2.25 MiB at most


def decode(states: list[dict]) -> dict[int, tuple[list[int], torch.Tensor]]:
    out = {}
    for h in states:
        dtype = {"float32": "<f4", "float16": "<f2"}[h["dtype"]]
        values = np.frombuffer(base64.b64decode(h["data"]), dtype=dtype).reshape(h["shape"])
        out[h["layer"]] = (h["positions"], torch.from_numpy(values.astype(np.float32)))
    return out


def transformers_states(hf_model, token_ids: list[int]) -> dict[int, torch.Tensor]:
    model, _ = hf_model
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
    return {layer: hidden[layer + 1][0] for layer in (14, 15)}


def test_http_states_equal_transformers_and_streamed_chunks_carry_their_tokens(client, hf_model) -> None:
    c, model = client
    whole = c.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                 extra_body={**READ, **FRENCH})
    got = decode(whole.model_extra["sae"]["hidden_states"])
    prompt_ids = hf_model[1](PROMPT).input_ids
    n = len(prompt_ids)
    assert sorted(got) == [14, 15] and whole.usage.prompt_tokens == n
    generated = whole.usage.completion_tokens
    assert got[14][0] == list(range(n + generated - 1))  # the prompt, then the generated tokens but the last (not fed)
    want = transformers_states(hf_model, prompt_ids)  # (prompt positions: the clamp at 15 comes after both reads)
    for layer in (14, 15):
        scale = want[layer].abs().max()
        assert (got[layer][1][:n] - want[layer]).abs().max() <= 5e-3 * scale, layer
    chunks = list(c.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       extra_body={**READ, **FRENCH}))
    with_states = [ch.model_extra["sae"]["hidden_states"] for ch in chunks
                   if (ch.model_extra or {}).get("sae", {}).get("hidden_states")]
    assert len(with_states) > 2  # spread over the stream (12 tokens: chunks merge when the reader lags)
    streamed = [decode(states)[14] for states in with_states]
    assert [p for positions, _ in streamed for p in positions] == got[14][0]  # each position once, in order
    torch.testing.assert_close(torch.cat([values for _, values in streamed]), got[14][1], atol=1e-3, rtol=1e-3)


def test_chat_reads_the_last_prompt_token(client) -> None:
    c, model = client
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=3,
                                    temperature=0, extra_body={"return_hidden_states": {"layers": [15]}})
    [h] = out.model_extra["sae"]["hidden_states"]
    assert h["dtype"] == "float32" and h["shape"] == [1, 576] and len(h["positions"]) == 1
    assert h["positions"][0] == out.usage.prompt_tokens - 1
    assert len(base64.b64decode(h["data"])) == 576 * 4


@pytest.mark.parametrize(("states", "param"), [
    ({"layers": [14, 15], "positions": "all"}, "return_hidden_states"),  # float32: 2 x 1024 x 576 x 4 bytes > 3 MiB
    ({"layers": [14, 20]}, "return_hidden_states.layers[1]"),
    ({"layers": [14, 14]}, "return_hidden_states.layers"),
    ({"layers": [14], "dtype": "bfloat16"}, "return_hidden_states.dtype"),
])
def test_http_refusals_name_the_field(client, states: dict, param: str) -> None:
    from openai import BadRequestError

    c, model = client
    with pytest.raises(BadRequestError) as info:
        c.completions.create(model=model, prompt=PROMPT, max_tokens=2, extra_body={"return_hidden_states": states})
    assert info.value.body["param"] == param, info.value.body


def test_grpc_returns_the_same_bytes_as_http(grpc_stub, client) -> None:
    import grpc

    pb, stub, _ = grpc_stub
    c, model = client
    asked = {"layers": [14], "positions": [0, 2, 6]}
    http = c.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                extra_body={"return_hidden_states": asked})
    [want] = http.model_extra["sae"]["hidden_states"]
    messages = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=4, temperature=0,
                                                     return_hidden_states=pb.HiddenStatesRequest(
                                                         layers=[14], position_list=[0, 2, 6])), timeout=120))
    got = [h for m in messages for h in m.hidden_states]
    assert [p for h in got for p in h.positions] == want["positions"] == [0, 2, 6]
    values = np.concatenate([np.frombuffer(h.data, dtype="<f4").reshape(list(h.shape)) for h in got])
    np.testing.assert_allclose(values, decode([want])[14][1].numpy(), atol=1e-3, rtol=1e-3)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=2, return_hidden_states=pb.HiddenStatesRequest(
            layers=[3])), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "return_hidden_states.layers[0]" in (
        info.value.details())
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=2, return_hidden_states=pb.HiddenStatesRequest(
            layers=[14], positions="all", position_list=[1])), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "position_list" in info.value.details()
