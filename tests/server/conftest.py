"""One `sae-serve serve` for every server test module (the lifecycle tests start their own)."""

from __future__ import annotations

import pytest

from sae_serve.config import HiddenStatesConfig, LimitsConfig, MetricsConfig, SaeServeConfig, write_config
from sae_serve.data import DEFAULT_SAE_DIR
from sae_serve.engines.hf import HFEngine
from sae_serve.sae.features import FeatureCatalog
from sae_serve.sae.formats import load_sae
from sae_serve.sae.registry import SaeEntry, registry_of
from sae_serve.steering.policy import FeatureSelector, Policy
from tests.server.harness import API_KEY, Server, WithApiKey, start_server

TEST_POLICY = Policy(steerable={"layer15": FeatureSelector(tags=("language", "topic", "entity", "code"))},
                     max_abs_multiple_of_max=4)


@pytest.fixture(scope="session")
def server(default_model_dir, tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("server")
    config = write_config(SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),),
                                         policy=TEST_POLICY, metrics=MetricsConfig(enabled=True),
                                         limits=LimitsConfig(readout_ttl_s=2, max_hidden_state_bytes=3 * 2**20),
                                         hidden_states=HiddenStatesConfig(layers=(14,))), folder / "config.json")
    running = start_server(config, folder)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    c = OpenAI(base_url=server.base + "/v1", api_key=API_KEY)
    return c, c.models.list().data[0].id


@pytest.fixture(scope="session")
def reference(hf_model) -> HFEngine:
    model, tokenizer = hf_model
    sae = load_sae(DEFAULT_SAE_DIR)
    return HFEngine(model, tokenizer, registry_of({"layer15": sae},
                                                  {"layer15": FeatureCatalog.load(DEFAULT_SAE_DIR, sae.d_sae)}))


@pytest.fixture(scope="session")
def grpc_stub(server):
    import grpc

    from sae_serve.server.grpc_stubs import load

    pb, pb_grpc = load()
    channel = grpc.intercept_channel(grpc.insecure_channel(server.grpc_address), WithApiKey())
    yield pb, pb_grpc.SaeServeStub(channel), channel
    channel.close()
