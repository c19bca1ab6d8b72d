"""Dependencies point one way: sae/, steering/, train/ and the config never import an engine or a server."""

import subprocess
import sys

import pytest

FORBIDDEN = ("vllm", "fastapi", "grpc", "uvicorn", "sae_serve.engines", "sae_serve.server")


@pytest.mark.parametrize("package", ["sae_serve.sae.formats", "sae_serve.steering.hook", "sae_serve.steering.policy",
                                     "sae_serve.train.pipeline", "sae_serve.train.evaluate", "sae_serve.config"])
def test_lower_packages_import_alone(package: str) -> None:
    code = (f"import sys, {package}\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith({FORBIDDEN!r}))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} pulls in {out.stdout.strip()}"
