"""Who is calling `/admin`, declared once: an admin key as a bearer token, or a browser's session.

A tenant's API key is never an admin credential: presented on any `/admin` path it is refused (401),
whatever the path. Without any credential, a page sends the browser to the login page and the JSON API
answers 401. Every change made with a session must carry the session's CSRF token (header
`x-csrf-token`, or the form field `csrf`); a bearer key needs none, as no browser sends it on its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated

from annotated_types import Interval
from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError

from icgate.gateway.admin.auth import SESSION_COOKIE, AdminAuth, Credential, Session
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.authenticate import presented_key
from icgate.gateway.store import admin_keys
from icgate.gateway.wiring import Gateway

log = logging.getLogger(__name__)

# An integer a database column holds (SQL BIGINT): every id, cursor and filter the admin API takes. Larger
# ones made the database driver fail (a 500); now they are the caller's 400, and the schema says so.
DbInt = Annotated[int, Interval(ge=-(2**63), le=2**63 - 1)]


class LoginNeeded(Exception):
    """No credential at all: a page redirects to the login page (handled in `pages`)."""


@dataclass(frozen=True)
class Admin:
    session: Session | None  # None: an admin key itself, as a bearer token
    csrf: str | None
    # Named in what an admin changes (policy versions, replay runs): "environment key", or a stored
    # key's name and id; never the key.
    who: str = "admin"


def auth_of(request: Request) -> AdminAuth:
    auth: AdminAuth = request.app.state.admin_auth
    return auth


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def checked_auth(request: Request) -> AdminAuth:
    """The console's credentials, with the stored admin keys at most `stored_ttl_s` old: one read of the
    database per that time and process, made only by admin requests, never by tenants' traffic."""
    auth = auth_of(request)
    engine = request.app.state.gateway.engine
    if auth.stored_stale() and engine is not None:
        try:
            live = await asyncio.to_thread(admin_keys.live_admin_keys, engine)
        except SQLAlchemyError as exc:  # the database may be briefly away: keep the keys last read
            log.warning("could not read the admin keys: %s", type(exc).__name__)
            auth.keep_stored()
        else:
            auth.set_stored(Credential.stored(k.key_id, k.name, k.key_hash) for k in live)
    return auth


async def note_use(request: Request, auth: AdminAuth, credential: Credential) -> None:
    """A stored key's `last_used_at`, written at most once a minute per key: bookkeeping only."""
    engine = request.app.state.gateway.engine
    key_id = credential.stored_id
    if key_id is None or engine is None or not auth.should_touch(credential):
        return
    try:
        await asyncio.to_thread(admin_keys.touch_admin_key, engine, key_id)
    except SQLAlchemyError as exc:
        log.warning("could not record an admin key's use: %s", type(exc).__name__)


async def current_admin(request: Request) -> Admin:
    auth = await checked_auth(request)
    if not auth.enabled:
        raise GatewayError(
            403,
            "The admin console is off: start the gateway with an admin key in its environment "
            "(ICGATE_ADMIN_KEY), or make one with `icgate admin create-key`.",
            type="permission_error",
            code="admin_disabled",
        )
    token = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if token is not None:
        credential = auth.credential(token)
        if credential is not None:
            await note_use(request, auth, credential)
            return Admin(None, None, credential.who)
        raise GatewayError(401, "This is not an admin key.", type="invalid_request_error", code="not_admin")
    session = auth.session(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise LoginNeeded
    return Admin(session, auth.csrf_token(session), session.who)


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
