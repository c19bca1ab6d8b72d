"""Our errors as an OpenAI client reads them: the status code and vLLM's ``ErrorResponse`` body."""

from __future__ import annotations

from typing import Any

from sae_serve.errors import PolicyError, SpecError

ERROR_TYPES = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError",
               500: "InternalServerError"}


def error_body(status: int, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES[status], "param": param, "code": status}}


def spec_status(error: SpecError) -> int:
    """403 for what the policy forbids, 400 for the rest (invalid, or over a limit)."""
    return 403 if isinstance(error, PolicyError) and error.forbidden else 400
