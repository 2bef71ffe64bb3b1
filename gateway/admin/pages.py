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
from pydantic import ValidationError

from icgate.gateway.admin.api import (
    LogFilterDep,
    NewKey,
    TenantEdit,
    cache_page_of,
    edit_tenant,
    engine_of,
    entries_of,
    forget_cached_keys,
    overview_of,
    page_of,
    tenants_of,
    verifier_threshold,
)
from icgate.gateway.admin.auth import SESSION_COOKIE
from icgate.gateway.admin.deps import (
    Admin,
    AdminChange,
    CurrentAdmin,
    DbInt,
    GatewayDep,
    LoginNeeded,
    auth_of,
    checked_auth,
    form_lists,
    form_of,
    note_use,
)
from icgate.gateway.admin.explain import explain
from icgate.gateway.admin.overview import RANGES, route_chart, savings_chart
from icgate.gateway.admin.tenants import EDITABLE_NAME, LIMIT_FIELDS
from icgate.gateway.config import AdminConfig
from icgate.gateway.errors import GatewayError, error_body
from icgate.gateway.store import admin_keys, keys, replay_runs
from icgate.gateway.store.request_log import get_request
from icgate.gateway.wiring import Gateway

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
    from icgate.gateway.admin.router_page import page as router_page  # it imports this module

    app.include_router(router_page)


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
    auth = await checked_auth(request)
    form = await form_of(request)
    address = request.client.host if request.client else "unknown"
    limiter: LoginLimiter = request.app.state.admin_login_limiter
    if not limiter.allow(address):
        return render(
            request, "login.html", 429, next=form.get("next", ""), error="Too many attempts: wait a minute."
        )
    credential = auth.credential(form.get("key", "")) if auth.enabled else None
    if credential is None:
        return render(
            request, "login.html", 401, next=form.get("next", ""), error="That is not the admin key."
        )
    await note_use(request, auth, credential)
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
        auth.new_session(credential),
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
    request: Request, gw: GatewayDep, admin: CurrentAdmin, where: LogFilterDep, before: DbInt | None = None
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


async def keys_render(
    request: Request, gw: Gateway, admin: Admin, status: int = 200, **shown: Any
) -> HTMLResponse:
    """The keys page: tenants' keys, the tenants table, and stored admin keys (plus what `shown` adds)."""
    engine = engine_of(gw)
    found = await asyncio.to_thread(keys.list_keys, engine)
    tenants = await tenants_of(gw)
    stored = await asyncio.to_thread(admin_keys.list_admin_keys, engine)
    context: dict[str, Any] = {"created": None, "error": None, **shown}
    return render(
        request,
        "keys.html",
        status,
        admin=admin,
        keys=found,
        tenants=tenants,
        admission=gw.policy.admission,
        admin_keys=stored,
        **context,
    )


@router.get("/keys")
async def keys_page(request: Request, gw: GatewayDep, admin: CurrentAdmin) -> Response:
    return await keys_render(request, gw, admin)


@router.post("/keys")
async def keys_create_page(request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    tenant = (await form_of(request)).get("tenant", "").strip()
    try:
        NewKey(tenant=tenant)
    except ValueError:
        error = "A tenant name is letters, digits and . _ @ - (starting with a letter or digit)."
        return await keys_render(request, gw, admin, 400, error=error)
    created = await asyncio.to_thread(keys.create_key, engine_of(gw), tenant)
    return await keys_render(request, gw, admin, 201, created=created)


def tenant_form(form: dict[str, str]) -> dict[str, object]:
    """The limits a tenant's edit form sends (a blank field: no limit), checked as the API checks them."""
    sent = {name: form[name].strip() or None for name in LIMIT_FIELDS if name in form}
    try:
        edit = TenantEdit.model_validate(sent)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "limits"
        raise GatewayError(400, f"{where}: {first['msg']}", param=where) from None
    return edit.model_dump(include=set(sent))


async def tenant_render(
    request: Request, gw: Gateway, admin: Admin, name: str, status: int = 200, error: str | None = None
) -> HTMLResponse:
    """A tenant's limits and their form, prefilled with its own entry in the policy."""
    view = next((v for v in await tenants_of(gw) if v.name == name), None)
    own = gw.policy.admission.tenants.get(name)
    return render(
        request,
        "tenant.html",
        status,
        admin=admin,
        name=name,
        view=view,
        own=own,
        admission=gw.policy.admission,
        error=error,
    )


@router.get("/tenants/{name}")
async def tenant_page(name: str, request: Request, gw: GatewayDep, admin: CurrentAdmin) -> Response:
    if not EDITABLE_NAME.match(name):  # a dot in its name: the policy's paths cannot name it
        error = "This tenant's name cannot be edited from the console: edit the policy file."
        return await tenant_render(request, gw, admin, name, 400, error)
    return await tenant_render(request, gw, admin, name)


@router.post("/tenants/{name}")
async def tenant_edit_page(name: str, request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    try:
        await edit_tenant(gw, name, tenant_form(await form_of(request)), admin, "")
    except GatewayError as exc:
        if exc.status_code >= 500:
            raise
        return await tenant_render(request, gw, admin, name, exc.status_code, exc.message)
    anchor = "every-other" if name == "*" else quote(name)
    return RedirectResponse(f"{base(request)}/keys#tenant-{anchor}", status_code=303)


@router.post("/admin-keys/{key_id}/revoke")
async def admin_key_revoke_page(
    key_id: DbInt, request: Request, gw: GatewayDep, _admin: AdminChange
) -> Response:
    """Revoke a stored admin key: its sessions end at once here (this one too, if it opened it)."""
    if await asyncio.to_thread(admin_keys.revoke_admin_key, engine_of(gw), key_id):
        auth_of(request).drop_stored(key_id)
    return RedirectResponse(f"{base(request)}/keys", status_code=303)


@router.post("/keys/{key_id}/revoke")
async def keys_revoke_page(key_id: DbInt, request: Request, gw: GatewayDep, _admin: AdminChange) -> Response:
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
    before: DbInt | None = None,
    replay_error: str | None = None,
) -> Response:
    found, next_before = await cache_page_of(gw, tenant, q, 50, before)
    runs = await asyncio.to_thread(replay_runs.recent, engine_of(gw), 5)
    filters = {k: v for k, v in {"tenant": tenant, "q": q}.items() if v}
    older = f"?{urlencode({**filters, 'before': next_before})}" if next_before else None
    now = datetime.now(UTC)
    return render(
        request,
        "cache.html",
        admin=admin,
        entries=found,
        filters=filters,
        older=older,
        now=now,
        runs=runs,
        replay_error=replay_error,
        # follow a run while it goes (the runs table is the live part)
        live=any(r.status == "running" for r in runs),
    )


@router.post("/cache/delete")
async def cache_delete_page(request: Request, gw: GatewayDep, _admin: AdminChange) -> Response:
    ids = [int(i) for i in (await form_lists(request)).get("id", []) if i.isdigit()]
    if ids:
        await entries_of(gw).delete(sorted(set(ids)))
    return RedirectResponse(f"{base(request)}/cache", status_code=303)
