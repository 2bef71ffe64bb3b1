"""The gateway's OpenAPI schema, saying what the server really sends.

FastAPI documents a 422 for every route with a body; the gateway answers bad
input with OpenAI's 400 instead, and every error in OpenAI's error shape. The
schema lists, per route, the statuses the gateway can send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


_WHY = {
    400: "Invalid request: bad JSON, a missing or invalid parameter, or a request over the size bounds.",
    401: "Missing or incorrect API key (when the policy requires keys); on /admin, not the admin key.",
    403: "The admin console is off (no admin key in the environment), or a change without its CSRF token.",
    404: "Unknown model, request id, or admin resource (a key, a policy version, a replay run).",
    409: "The change conflicts with the gateway's state: a replay run already going, a router that cannot "
    "be swapped or replayed (a rule, or a file the policy names).",
    413: "Request body larger than the policy's `server.max_body_bytes`.",
    429: "A rate limit, a budget, or no backend can answer within the latency objective; see Retry-After.",
    502: "The backend failed, and so did the fallback.",
    503: "No backend is available (circuit open, shutting down).",
    504: "The backend did not answer in time.",
}
_COMPLETION = (400, 401, 404, 413, 429, 502, 503, 504)
# Statuses per route (method, path); the rest of a route's documentation comes from FastAPI.
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/chat/completions"): _COMPLETION,
    ("post", "/v1/completions"): _COMPLETION,
    ("post", "/v1/embeddings"): (400, 401, 404, 413),
    ("post", "/v1/feedback"): (400, 401, 404, 413),
    ("get", "/v1/models"): (401,),
    ("get", "/admin/api/requests"): (400, 401, 403, 503),
    ("get", "/admin/api/requests/{request_id}"): (401, 403, 404, 503),
}
# Every other route of the admin JSON API: bad input, no or not the admin key, console off or no CSRF token,
# not found, a conflict, starting.
_ADMIN = (400, 401, 403, 404, 409, 503)
_STREAMED = {("post", "/v1/chat/completions"), ("post", "/v1/completions")}


def error_responses(statuses: tuple[int, ...]) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        str(s): {"description": _WHY[s], "content": {"application/json": {"schema": ref}}} for s in statuses
    }


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs"))
    components["ErrorResponse"] = error_schema
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            default = _ADMIN if path.startswith("/admin/api/") else ()
            responses.update(error_responses(ROUTE_ERRORS.get((method, path), default)))
            if (method, path) in _STREAMED:
                responses["200"] = {
                    "description": "The completion; with `stream: true`, server-sent events ending in "
                    "`data: [DONE]`.",
                    "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
                }
    return schema


def install_schema(app: FastAPI) -> None:
    """Serve `build_schema` at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
