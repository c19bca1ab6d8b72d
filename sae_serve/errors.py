"""One exception hierarchy for sae_serve.

Every message names the file or field at fault. Servers map these classes to HTTP and gRPC
status codes in one place (``server/``); nothing below the servers knows about status codes.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError


def field_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location in the notation of our own errors: ``steering.interventions[0].value``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def first_field_error(exc: ValidationError) -> str:
    """A file's first schema error, naming the field: ``field saes[0].path: Field required``."""
    err = exc.errors()[0]
    return f"field {field_path(err['loc']) or '(top level)'}: {err['msg']}"


class SaeServeError(Exception):
    """Base class of every error sae_serve raises on purpose."""


class SaeFormatError(SaeServeError):
    """An SAE file or folder is missing, corrupt, or in a layout we do not support."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class SaeMismatchError(SaeServeError):
    """An SAE does not fit the model it is attached to (width, layer count)."""


class ModelUnavailableError(SaeServeError):
    """The embedded default model cannot be prepared (package missing, checksum mismatch)."""


class SpecError(SaeServeError):
    """A steering or readout request is invalid. ``field`` is a dotted path into the request."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class PolicyError(SpecError):
    """A request is well formed but the server's policy refuses it: ``forbidden`` when it asks
    for something not permitted (HTTP 403), otherwise a limit it exceeds (HTTP 400)."""

    def __init__(self, field: str, problem: str, forbidden: bool = False) -> None:
        super().__init__(field, problem)
        self.forbidden = forbidden


class WorkerError(SaeServeError):
    """A worker could not serve a request the service had admitted (HTTP 500, gRPC INTERNAL)."""
