"""Stage 1, authenticate: the tenant behind the API key, before anything is spent on the request."""

from __future__ import annotations

from typing import Protocol

from icgate.gateway.config import AuthConfig
from icgate.gateway.errors import GatewayError
from icgate.gateway.records import ANONYMOUS, Tenant


class Authenticator(Protocol):
    """Looks a key up (`store.keys.KeyAuthenticator` over the database; a dict in tests)."""

    async def authenticate(self, plaintext: str) -> Tenant | None: ...


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The API key as OpenAI's clients send it (`Authorization: Bearer <key>`), or as `x-api-key`: read the
    same way by the HTTP API, the console and the in-process transport."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return x_api_key or None


async def authenticate(api_key: str | None, auth: AuthConfig, authenticator: Authenticator | None) -> Tenant:
    """The tenant behind an API key. Without `auth.required`, unknown callers are anonymous."""
    tenant = await authenticator.authenticate(api_key) if (api_key and authenticator) else None
    if tenant is not None:
        return tenant
    if auth.required:
        message = (
            "Incorrect API key provided."
            if api_key
            else "Missing API key: send 'Authorization: Bearer <key>'."
        )
        raise GatewayError(401, message, type="invalid_request_error", code="invalid_api_key")
    return ANONYMOUS
