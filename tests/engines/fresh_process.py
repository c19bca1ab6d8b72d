"""Run a test's engine in a fresh Python process: vLLM caches its environment after the first
engine of a process, and some of its imports (numba, via the n-gram proposer) break later engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]


def in_fresh_process(target: str, out: Path, *args: str | int, env: dict[str, str] | None = None) -> Any:
    """Call ``target`` ("module:function") as function(*args, str(out)) in a new process, with
    ``env`` added to this one's; return the JSON it wrote to ``out``."""
    module, function = target.split(":")
    code = f"from {module} import {function}; {function}(*{[*args, str(out)]!r})"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())
