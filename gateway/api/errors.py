"""Every error leaves in OpenAI's format; nothing leaks a traceback.

FastAPI's own answers (422 with `detail`, 404/405 with `detail`, a bare 500) would break OpenAI's
clients, which read `error.message`, `error.type` and `error.param`; so each is rewritten here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from icgate.gateway.errors import GatewayError, error_body

log = logging.getLogger("icgate.api")

_UNION_TAG = re.compile(r"[\[(]|^(str|int|float|bool|list|dict|none)$")


def field_path(loc: Any) -> list[str]:
    """The request field a validation error is about: its location without `body` and without the
    union members pydantic names on the way (`str`, `list[ContentPart]`, ...)."""
    return [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _UNION_TAG.search(p))]


def invalid_request(errors: Sequence[Any]) -> GatewayError:
    """A body that failed validation, as OpenAI says so: one message about the field at fault. Shared
    with the in-process transport, which validates with the same schemas."""
    # A union (`content: str | list[part]`) fails once per member: the deepest error is the telling one.
    first = max(errors, key=lambda e: len(field_path(e.get("loc", ())))) if errors else {}
    param = ".".join(field_path(first.get("loc", ()))) or None
    if first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request."
        param = None
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
    return GatewayError(400, message, "invalid_request_error", param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's format; nothing leaks a traceback."""

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        refusal = invalid_request(exc.errors())
        return JSONResponse(refusal.body(), status_code=refusal.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail) if exc.status_code != 404 else f"Unknown path: {request.url.path}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, _exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(
            error_body("The gateway had an internal error; it has been logged.", "server_error"),
            status_code=500,
        )
