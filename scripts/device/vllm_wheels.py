"""Carry vLLM 0.26.0 to the GPU machine, which has no package index and takes ~38 MiB of extra files a call.

The trip, with N the number of parts `split` prints (4 as below; 3 with `slim --store` and `split --xz`,
which take two minutes here). The machine keeps /tmp only while warm: make each call within 30 s of the last.
  here:  vllm_wheels.py slim vllm-0.26.0-*.whl build/vllm026/wheels      (drops FA2, MoE, vllm-rs)
         vllm_wheels.py deps build/vllm026/wheels                        (vllm026-requirements.txt)
         vllm_wheels.py split build/vllm026/wheels build/vllm026/parts --max-mib 38
  calls 1..N, one part each: carry build/vllm026/parts/part-00K.bin and build/vllm026/parts/manifest.json
         (build/ is git-ignored) and begin with: mkdir -p /tmp/v026 && cp build/vllm026/parts/* /tmp/v026/
  in the last call, after that copy (join names any part missing or corrupt, to carry again):
         python3 scripts/device/vllm_wheels.py join /tmp/v026 /tmp/v026-wheels
         python3 scripts/device/vllm_wheels.py install /tmp/v026-wheels /tmp/site && export PYTHONPATH=/tmp/site
`join` and `install` use the standard library alone, so they run on the bare machine (Python 3.12).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "vllm026-requirements.txt"
MIB = 1 << 20
# Not on our path (a dense model, FA3 on Hopper): FlashAttention 2 (Hopper takes FA3; vLLM falls back
# only where FA3 refuses), the MoE kernels, and the Rust frontend (only with VLLM_RUST_FRONTEND_PATH).
DEFAULT_DROPS = ("vllm/vllm_flash_attn/_vllm_fa2_C*.so", "vllm/_moe_C*", "vllm/vllm-rs")
# The GPU machine: CPython 3.12 on x86-64 Linux; pip matches manylinux_2_N exactly, so name each N.
# Up to 2_31 as llguidance 1.7 ships no older build (its Python 3.12.3 suggests Ubuntu 24.04, glibc 2.39).
PLATFORM_ARGS = ("--python-version", "3.12", "--implementation", "cp",
                 *(a for n in (31, 28, 27, 26, 24, 17, 5) for a in ("--platform", f"manylinux_2_{n}_x86_64")),
                 "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64")
CHUNK = 4 * MIB


class TripError(Exception):
    """A part or wheel is missing or corrupt. Local, not sae_serve.errors: this file runs without sae_serve."""


class Dropped(NamedTuple):
    name: str
    compressed_bytes: int


# ---------------------------------------------------------------- slim


def _rewrite_record(record: str, dropped: set[str]) -> str:
    """RECORD without the dropped files' rows: a wheel's RECORD lists exactly its files with their hashes
    (PEP 427). pip installs a wheel with a stale RECORD; tools that validate wheels do not."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in csv.reader(io.StringIO(record)):
        if row and row[0] not in dropped:
            writer.writerow(row)
    return out.getvalue()


def _copy_info(info: zipfile.ZipInfo, store: bool) -> zipfile.ZipInfo:
    """A fresh entry header (writing fills in offsets, so the source's must stay untouched)."""
    copy = zipfile.ZipInfo(info.filename, info.date_time)
    copy.compress_type = zipfile.ZIP_STORED if store else info.compress_type
    copy.external_attr = info.external_attr
    copy.create_system = info.create_system  # keeps the file modes external_attr holds meaningful
    copy.file_size = info.file_size  # lets zipfile choose zip64 for files past 2 GiB
    return copy


def slim(wheel: Path, out_dir: Path, patterns: tuple[str, ...] = DEFAULT_DROPS,
         store: bool = False) -> tuple[Path, list[Dropped]]:
    """Copy ``wheel`` to ``out_dir`` (same file name, as pip requires) without the files ``patterns`` match.

    Patterns that match nothing are fine: the CPU wheel has none of the CUDA modules. ``store`` writes
    the files uncompressed, for ``split --xz`` to compress better than the wheel's deflate.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src:
        infos = src.infolist()
        drops = [Dropped(i.filename, i.compress_size) for i in infos
                 if any(fnmatch.fnmatchcase(i.filename, p) for p in patterns)]
        if not drops and not store:  # the same wheel: copying skips recompressing every file
            shutil.copyfile(wheel, out)
            return out, drops
        dropped = {d.name for d in drops}
        [record] = [i for i in infos if i.filename.endswith(".dist-info/RECORD")]
        with zipfile.ZipFile(out, "w") as dst:
            for info in infos:
                if info.filename in dropped or info is record:
                    continue
                with src.open(info) as fin, dst.open(_copy_info(info, store), "w") as fout:
                    shutil.copyfileobj(fin, fout, CHUNK)
            # RECORD last, as wheels are written: it describes the files before it.
            dst.writestr(_copy_info(record, store), _rewrite_record(src.read(record).decode(), dropped))
    return out, drops


# ---------------------------------------------------------------- deps


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    """The pinned ``name==version`` lines, comments and blanks left out."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def download_deps(dest: Path, requirements: Path = REQUIREMENTS, python: str = sys.executable) -> None:
    """Each pinned wheel for CPython 3.12 manylinux x86-64; --no-deps, as the list is already the closure."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PLATFORM_ARGS,
           "-d", str(dest), *requirement_lines(requirements)]
    subprocess.run(cmd, check=True)


# ---------------------------------------------------------------- split


class _PartWriter:
    """A write-only stream cut into files of at most ``max_bytes``, hashing each part and the whole."""

    def __init__(self, parts_dir: Path, max_bytes: int) -> None:
        self.parts_dir, self.max_bytes = parts_dir, max_bytes
        self.parts: list[dict[str, object]] = []  # name, bytes, sha256 of each finished part
        self.whole, self.total = hashlib.sha256(), 0
        self._file: BinaryIO | None = None
        self._size, self._hash = 0, hashlib.sha256()

    def _finish_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts.append({"name": Path(self._file.name).name, "bytes": self._size,
                               "sha256": self._hash.hexdigest()})
            self._file = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None:
                self._file = (self.parts_dir / f"part-{len(self.parts):03d}.bin").open("wb")
                self._size, self._hash = 0, hashlib.sha256()
            take = view[: self.max_bytes - self._size]
            self._file.write(take)
            self._hash.update(take)
            self.whole.update(take)
            self._size += len(take)
            self.total += len(take)
            if self._size == self.max_bytes:  # finished now, so a full last part leaves no empty one behind
                self._finish_part()
            view = view[len(take):]
        return len(data)

    def close(self) -> dict[str, object]:
        self._finish_part()
        return {"parts": self.parts, "stream": {"bytes": self.total, "sha256": self.whole.hexdigest()}}


def split(wheel_dir: Path, parts_dir: Path, max_bytes: int, xz: bool = False) -> dict[str, object]:
    """One tar of every wheel, cut into parts; writes manifest.json. Uncompressed unless ``xz``: the wheels
    are zips already; xz pays off on wheels `slim --store` wrote (join reads either: tarfile detects it)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise TripError(f"{wheel_dir}: no wheels to split")
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("part-*.bin"):  # a shorter trip must not leave a stale tail behind
        old.unlink()
    writer = _PartWriter(parts_dir, max_bytes)
    with tarfile.open(fileobj=writer, mode="w|xz" if xz else "w|", format=tarfile.PAX_FORMAT) as tar:
        for wheel in wheels:
            info = tar.gettarinfo(wheel, arcname=wheel.name)
            info.uid = info.gid = info.mtime = 0
            info.uname = info.gname = ""
            with wheel.open("rb") as f:
                tar.addfile(info, f)
    manifest = {**writer.close(), "wheels": {w.name: w.stat().st_size for w in wheels}}
    (parts_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------- join, install (standard library only)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_parts(parts_dir: Path) -> dict[str, object]:
    """The manifest, once every part it lists is present with its size and sha256; else name the bad parts."""
    manifest = json.loads((parts_dir / "manifest.json").read_text())
    missing = [p["name"] for p in manifest["parts"] if not (parts_dir / p["name"]).is_file()]
    if missing:
        raise TripError(f"{parts_dir}: missing {', '.join(missing)} of {len(manifest['parts'])} parts")
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if path.stat().st_size != part["bytes"] or _sha256(path) != part["sha256"]:
            raise TripError(f"{path}: corrupt (size or sha256 differs from manifest.json); carry it again")
    return manifest


def join(parts_dir: Path, out_dir: Path) -> list[Path]:
    """Check the parts, concatenate them, check the whole stream, and unpack the wheels into ``out_dir``."""
    manifest = check_parts(parts_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = out_dir / ".stream.tar"
    whole = hashlib.sha256()
    with stream.open("wb") as dst:
        for part in manifest["parts"]:
            with (parts_dir / part["name"]).open("rb") as src:
                while chunk := src.read(CHUNK):
                    whole.update(chunk)
                    dst.write(chunk)
    try:
        if whole.hexdigest() != manifest["stream"]["sha256"]:
            raise TripError(f"{parts_dir}: the joined stream's sha256 differs from manifest.json")
        with tarfile.open(stream) as tar:
            tar.extractall(out_dir, filter="data")
    finally:
        stream.unlink()
    wheels = [out_dir / name for name in manifest["wheels"]]
    bad = [w.name for w in wheels if not w.is_file() or w.stat().st_size != manifest["wheels"][w.name]]
    if bad:
        raise TripError(f"{out_dir}: unpacked wheels missing or truncated: {', '.join(bad)}")
    return wheels


def install(wheel_dir: Path, target: Path, python: str = sys.executable) -> None:
    """pip, offline and without dependency resolution: the wheels are the whole set; the image has the rest."""
    wheels = sorted(str(w) for w in wheel_dir.glob("*.whl"))
    if not wheels:
        raise TripError(f"{wheel_dir}: no wheels to install")
    cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", str(target), *wheels]
    subprocess.run(cmd, check=True)


# ---------------------------------------------------------------- CLI


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _cmd_slim(args: argparse.Namespace) -> None:
    out, drops = slim(args.wheel, args.out_dir, (*DEFAULT_DROPS, *args.drop), args.store)
    for d in drops:
        print(f"dropped {d.name} ({_mib(d.compressed_bytes)} compressed)")
    if not drops:
        print("nothing to drop: no file matches " + " ".join((*DEFAULT_DROPS, *args.drop)))
    print(f"{out}: {_mib(args.wheel.stat().st_size)} -> {_mib(out.stat().st_size)}")


def _cmd_split(args: argparse.Namespace) -> None:
    manifest = split(args.dir, args.parts_dir, int(args.max_mib * MIB), args.xz)
    print(f"{len(manifest['wheels'])} wheels, {_mib(manifest['stream']['bytes'])} in "
          f"{len(manifest['parts'])} parts of at most {args.max_mib} MiB -> {args.parts_dir}")


def _cmd_join(args: argparse.Namespace) -> None:
    wheels = join(args.parts_dir, args.out_dir)
    print(f"{len(wheels)} wheels checked and unpacked into {args.out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("slim", help="rewrite the vLLM wheel without modules our path does not load")
    p.add_argument("wheel", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--drop", action="append", default=[], help="another glob of wheel paths to leave out")
    p.add_argument("--store", action="store_true", help="write the files uncompressed, for split --xz")
    p.set_defaults(run=_cmd_slim)
    p = sub.add_parser("deps", help="download the wheels of vllm026-requirements.txt for the GPU machine")
    p.add_argument("dir", type=Path)
    p.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    p.set_defaults(run=lambda a: download_deps(a.dir, a.requirements))
    p = sub.add_parser("split", help="pack every wheel in DIR into parts of at most --max-mib")
    p.add_argument("dir", type=Path)
    p.add_argument("parts_dir", type=Path)
    p.add_argument("--max-mib", type=float, default=38.0)
    p.add_argument("--xz", action="store_true", help="xz the stream (slow here, fast to unpack there)")
    p.set_defaults(run=_cmd_split)
    p = sub.add_parser("join", help="check the parts' sha256 and unpack the wheels (standard library only)")
    p.add_argument("parts_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.set_defaults(run=_cmd_join)
    p = sub.add_parser("install", help="pip install the wheels offline into TARGET, for PYTHONPATH=TARGET")
    p.add_argument("out_dir", type=Path)
    p.add_argument("target", type=Path)
    p.set_defaults(run=lambda a: install(a.out_dir, a.target))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TripError as exc:
        sys.exit(f"vllm_wheels {args.command}: {exc}")
    except subprocess.CalledProcessError as exc:
        sys.exit(f"vllm_wheels {args.command}: `{' '.join(exc.cmd[:4])} ...` exited with {exc.returncode} (see above)")


if __name__ == "__main__":
    main()
