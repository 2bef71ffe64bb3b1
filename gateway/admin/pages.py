"""The console's pages: server-rendered HTML (Jinja2), one template per page, no build step.

Links are built from the ASGI `root_path`, so the console works under whatever sub-path a reverse proxy
serves it at (`icgate serve --root-path /llm`).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from markupsafe import Markup

from icgate.gateway.admin.api import (
    LogFilterDep,
    NewKey,
    cache_page_of,
    engine_of,
    entries_of,
    forget_cached_keys,
    overview_of,
    page_of,
    verifier_threshold,
)
from icgate.gateway.admin.auth import SESSION_COOKIE
from icgate.gateway.admin.deps import (
    AdminChange,
    CurrentAdmin,
    GatewayDep,
    LoginNeeded,
    auth_of,
    form_lists,
    form_of,
)
from icgate.gateway.admin.explain import explain
from icgate.gateway.admin.overview import RANGES, route_chart, savings_chart
from icgate.gateway.config import AdminConfig
from icgate.gateway.errors import error_body
from icgate.gateway.store import keys
from icgate.gateway.store.request_log import get_request

router = APIRouter(prefix="/admin", include_in_schema=False)
TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"])
)


class LoginLimiter:
    """Login attempts per client address per minute, failed or not (the `limits` library, in memory:
    per process, which bounds a guesser all the same)."""

    def __init__(self, per_minute: int) -> None:
        self.limit = parse(f"{per_minute}/minute")
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def allow(self, address: str) -> bool:
        return bool(self.limiter.hit(self.limit, "admin-login", address))


def install(app: FastAPI, config: AdminConfig) -> None:
    """The console's state, its one exception handler, and its pages."""
    app.state.admin_login_limiter = LoginLimiter(config.login_attempts_per_minute)

    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, _exc: LoginNeeded) -> Response:
        if request.url.path.startswith(f"{request.scope.get('root_path', '')}/admin/api/"):
            body = error_body("Log in, or send the admin key as a bearer token.", "invalid_request_error")
            return JSONResponse(body, status_code=401)
        target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return RedirectResponse(f"{base(request)}/login?next={target}", status_code=303)

    app.include_router(router)


def base(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}/admin"


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = TEMPLATES.get_template(template).render(base=base(request), **context)
    return HTMLResponse(html, status_code=status, headers={"cache-control": "no-store"})


@router.get("/login")
async def login_page(request: Request, next: str = "") -> Response:
    return render(request, "login.html", next=next, error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    auth = auth_of(request)
    form = await form_of(request)
    address = request.client.host if request.client else "unknown"
    limiter: LoginLimiter = request.app.state.admin_login_limiter
    if not limiter.allow(address):
        return render(
            request, "login.html", 429, next=form.get("next", ""), error="Too many attempts: wait a minute."
        )
    if not auth.enabled or not auth.is_admin_key(form.get("key", "")):
        return render(
            request, "login.html", 401, next=form.get("next", ""), error="That is not the admin key."
        )
    next_path = form.get("next") or ""
    # Only a path of this console, never another site (an open redirect).
    target = (
        next_path
        if next_path.startswith(base(request) + "/") or next_path == base(request)
        else base(request)
    )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        auth.new_session(),
        max_age=int(auth.session_s),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=base(request),
    )
    return response


@router.post("/logout")
async def logout(request: Request, _admin: AdminChange) -> Response:
    response = RedirectResponse(f"{base(request)}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=base(request))
    return response


@router.get("")
async def overview_page(
    request: Request, gw: GatewayDep, admin: CurrentAdmin, range: str = "24h"
) -> Response:
    data, summary, chosen = await overview_of(gw, range)
    totals: dict[str, int] = {}
    for bucket in data.buckets:
        for route, n in bucket.routes.items():
            totals[route] = totals.get(route, 0) + n
    return render(
        request,
        "overview.html",
        admin=admin,
        summary=summary,
        chosen=chosen,
        ranges=list(RANGES),
        routes=sorted(totals.items()),
        route_chart=Markup(route_chart(data.buckets)),
        savings_chart=Markup(savings_chart(summary.savings)),
        live=True,
    )


@router.get("/requests")
async def requests_page(
    request: Request, gw: GatewayDep, admin: CurrentAdmin, where: LogFilterDep, before: int | None = None
) -> Response:
    rows, next_before = await page_of(gw, where, 50, before)
    shown = {"tenant": where.tenant, "route": where.route, "backend": where.backend, "status": where.status}
    filters = {k: v for k, v in {**shown, "q": where.text}.items() if v}
    older = f"?{urlencode({**filters, 'before': next_before})}" if next_before else None
    # The newest page follows the log as it grows; an older page stays as it is.
    live = before is None
    return render(request, "requests.html", admin=admin, rows=rows, filters=filters, older=older, live=live)


@router.get("/requests/{request_id}")
async def request_page(request_id: str, request: Request, gw: GatewayDep, admin: CurrentAdmin) -> Response:
    row = await asyncio.to_thread(get_request, gw.engine, request_id) if gw.engine is not None else None
    if row is None:
        return render(request, "missing.html", 404, admin=admin, request_id=request_id)
    return render(request, "request.html", admin=admin, row=row, stages=explain(row, verifier_threshold(gw)))


@router.get("/keys")
async def keys_page(request: Request, gw: GatewayDep, admin: CurrentAdmin) -> Response:
    found = await asyncio.to_thread(keys.list_keys, engine_of(gw))
    return render(request, "keys.html", admin=admin, keys=found, created=None, error=None)


@router.post("/keys")
async def keys_create_page(request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    tenant = (await form_of(request)).get("tenant", "").strip()
    try:
        NewKey(tenant=tenant)
    except ValueError:
        found = await asyncio.to_thread(keys.list_keys, engine_of(gw))
        error = "A tenant name is letters, digits and . _ @ - (starting with a letter or digit)."
        return render(request, "keys.html", 400, admin=admin, keys=found, created=None, error=error)
    created = await asyncio.to_thread(keys.create_key, engine_of(gw), tenant)
    found = await asyncio.to_thread(keys.list_keys, engine_of(gw))
    return render(request, "keys.html", 201, admin=admin, keys=found, created=created, error=None)


@router.post("/keys/{key_id}/revoke")
async def keys_revoke_page(key_id: int, request: Request, gw: GatewayDep, _admin: AdminChange) -> Response:
    if await asyncio.to_thread(keys.revoke_key, engine_of(gw), key_id):
        forget_cached_keys(gw)
    return RedirectResponse(f"{base(request)}/keys", status_code=303)


@router.get("/cache")
async def cache_page(
    request: Request,
    gw: GatewayDep,
    admin: CurrentAdmin,
    tenant: str | None = None,
    q: str | None = None,
    before: int | None = None,
) -> Response:
    found, next_before = await cache_page_of(gw, tenant, q, 50, before)
    filters = {k: v for k, v in {"tenant": tenant, "q": q}.items() if v}
    older = f"?{urlencode({**filters, 'before': next_before})}" if next_before else None
    now = datetime.now(UTC)
    return render(request, "cache.html", admin=admin, entries=found, filters=filters, older=older, now=now)


@router.post("/cache/delete")
async def cache_delete_page(request: Request, gw: GatewayDep, _admin: AdminChange) -> Response:
    ids = [int(i) for i in (await form_lists(request)).get("id", []) if i.isdigit()]
    if ids:
        await entries_of(gw).delete(sorted(set(ids)))
    return RedirectResponse(f"{base(request)}/cache", status_code=303)
