"""Who is calling `/admin`, declared once: the admin key as a bearer token, or a browser's session.

A tenant's API key is never an admin credential: presented on any `/admin` path it is refused (401),
whatever the path. Without any credential, a page sends the browser to the login page and the JSON API
answers 401. Every change made with a session must carry the session's CSRF token (header
`x-csrf-token`, or the form field `csrf`); a bearer key needs none, as no browser sends it on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from icgate.gateway.admin.auth import SESSION_COOKIE, AdminAuth, Session
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.authenticate import presented_key
from icgate.gateway.wiring import Gateway


class LoginNeeded(Exception):
    """No credential at all: a page redirects to the login page (handled in `pages`)."""


@dataclass(frozen=True)
class Admin:
    session: Session | None  # None: the admin key itself, as a bearer token
    csrf: str | None


def auth_of(request: Request) -> AdminAuth:
    auth: AdminAuth = request.app.state.admin_auth
    return auth


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def current_admin(request: Request) -> Admin:
    auth = auth_of(request)
    if not auth.enabled:
        raise GatewayError(
            403,
            "The admin console is off: start the gateway with an admin key in its environment "
            "(ICGATE_ADMIN_KEY).",
            type="permission_error",
            code="admin_disabled",
        )
    token = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if token is not None:
        if auth.is_admin_key(token):
            return Admin(None, None)
        raise GatewayError(401, "This is not the admin key.", type="invalid_request_error", code="not_admin")
    session = auth.session(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise LoginNeeded
    return Admin(session, auth.csrf_token(session))


CurrentAdmin = Annotated[Admin, Depends(current_admin)]


async def admin_change(request: Request, admin: CurrentAdmin) -> Admin:
    """An admin allowed to change something: with a session, only with its CSRF token."""
    if admin.session is not None:
        token = request.headers.get("x-csrf-token")
        if token is None and request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            token = (await form_of(request)).get("csrf")
        if not auth_of(request).csrf_ok(admin.session, token):
            raise GatewayError(403, "Missing or wrong CSRF token.", type="permission_error", code="csrf")
    return admin


AdminChange = Annotated[Admin, Depends(admin_change)]


async def form_of(request: Request) -> dict[str, str]:
    """A urlencoded form's fields, the first value of each (the console's forms are a field or two)."""
    return {name: values[0] for name, values in (await form_lists(request)).items()}


async def form_lists(request: Request) -> dict[str, list[str]]:
    """Every value of every field (a list of checkboxes), read once per request by the standard library."""
    from urllib.parse import parse_qs

    cached: dict[str, list[str]] | None = getattr(request.state, "admin_form", None)
    if cached is None:
        raw = (await request.body()).decode("utf-8", errors="replace")
        cached = parse_qs(raw, keep_blank_values=True)
        request.state.admin_form = cached
    return cached
