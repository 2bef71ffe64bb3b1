"""The console's policy page: the policy in force, an editor that checks as you type (errors at their
line and key, in the schema's words), the diff against the policy in force, apply (at once where the
change allows it), and every applied version with who applied it, when, and a rollback.

The work is `gateway.live_policy`; this module is its two faces, the JSON API (`/admin/api/policy`) and
the page (`/admin/policy`).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from icgate.gateway.admin.api import engine_of
from icgate.gateway.admin.deps import Admin, AdminChange, CurrentAdmin, DbInt, GatewayDep, form_of
from icgate.gateway.admin.pages import base, render
from icgate.gateway.errors import GatewayError, error_body
from icgate.gateway.live_policy import Applied, LivePolicy, PolicyRejected
from icgate.gateway.policy_edit import LIVE_PATHS, PolicyCheck, PolicyIssue, diff
from icgate.gateway.store import policy_versions
from icgate.gateway.store.policy_versions import PolicyVersion
from icgate.gateway.wiring import Gateway

api = APIRouter(prefix="/admin/api/policy", tags=["admin"])
pages = APIRouter(prefix="/admin/policy", include_in_schema=False)

MAX_POLICY_CHARS = 256 * 1024
HISTORY = 50


class PolicyText(BaseModel):
    text: str = Field(max_length=MAX_POLICY_CHARS)
    note: str = Field("", max_length=500)


def live_of(gw: Gateway) -> LivePolicy:
    return gw.live_policy


def check_json(live: LivePolicy, text: str) -> dict[str, Any]:
    checked = live.check(text)
    return {
        "ok": checked.ok,
        "issues": [asdict(i) for i in checked.issues],
        "live": checked.live,
        "restart": checked.restart,
        "restart_sections": checked.restart_sections,
        "diff": diff(live.text, text),
    }


def version_json(version: PolicyVersion, in_force_id: int | None, with_text: bool = False) -> dict[str, Any]:
    out = asdict(version)
    out["created_at"] = version.created_at.isoformat()
    out["in_force"] = version.id == in_force_id
    if not with_text:
        out.pop("text")
    return out


def rejected(exc: PolicyRejected) -> JSONResponse:
    """400 in OpenAI's shape, with every issue (line, key, message) beside the first one's words."""
    first = exc.issues[0] if exc.issues else PolicyIssue(None, "", "refused")
    where = f"line {first.line}: " if first.line is not None else ""
    key = f"{first.key}: " if first.key else ""
    body = error_body(f"Policy not applied: {where}{key}{first.message}", "invalid_request_error", "text")
    body["error"]["issues"] = [asdict(i) for i in exc.issues]
    return JSONResponse(body, status_code=400)


def applied_json(applied: Applied) -> dict[str, Any]:
    return {
        "version": version_json(applied.version, applied.version.id if applied.in_force else None),
        "in_force": applied.in_force,
    }


@api.get("")
async def policy_get(gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """The policy text in force (as written), the file it lives in, which settings apply without a
    restart, and the newest versions."""
    live = live_of(gw)
    history = await live.history(HISTORY)
    return {
        "text": live.text,
        "in_force_version": live.in_force_id,
        "file": str(live.path) if live.path is not None else None,
        "file_writable": live.writable,
        "live_paths": list(LIVE_PATHS),
        "versions": [version_json(v, live.in_force_id) for v in history],
    }


@api.post("/check")
async def policy_check(body: PolicyText, gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """Check a policy text without applying it: its issues at their lines, what it would change (at once
    or at the next restart), and its diff against the policy in force."""
    return check_json(live_of(gw), body.text)


@api.post("", response_model=None)
async def policy_apply(body: PolicyText, gw: GatewayDep, admin: AdminChange) -> dict[str, Any] | JSONResponse:
    """Apply a policy text: settings read per request at once, on every replica started from the same
    file; settings read at start written to the policy file for the next restart."""
    try:
        applied = await live_of(gw).apply_text(body.text, admin.who, "console", body.note)
    except PolicyRejected as exc:
        return rejected(exc)
    return applied_json(applied)


@api.get("/versions/{version_id}")
async def policy_version(version_id: DbInt, gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    found = await asyncio.to_thread(policy_versions.get, engine_of(gw), version_id)
    if found is None:
        raise GatewayError(404, f"No policy version {version_id}.", type="not_found_error")
    return version_json(found, live_of(gw).in_force_id, with_text=True)


@api.post("/versions/{version_id}/rollback", response_model=None)
async def policy_rollback(
    version_id: DbInt, gw: GatewayDep, admin: AdminChange
) -> dict[str, Any] | JSONResponse:
    """Apply an earlier version's text again (as a new version)."""
    try:
        applied = await live_of(gw).rollback(version_id, admin.who)
    except PolicyRejected as exc:
        return rejected(exc)
    return applied_json(applied)


# --- the page -------------------------------------------------------------------------------------------


async def page(
    request: Request,
    gw: Gateway,
    admin: Admin,
    text: str | None = None,
    checked: PolicyCheck | None = None,
    message: str | None = None,
    status: int = 200,
) -> Response:
    live = live_of(gw)
    shown = live.text if text is None else text
    return render(
        request,
        "policy.html",
        status,
        admin=admin,
        text=shown,
        checked=checked,
        diff=diff(live.text, shown) if text is not None else "",
        message=message,
        live=live,
        versions=await live.history(HISTORY),
        live_paths=LIVE_PATHS,
    )


@pages.get("")
async def policy_page(request: Request, gw: GatewayDep, admin: CurrentAdmin) -> Response:
    return await page(request, gw, admin)


@pages.post("/check")
async def policy_page_check(request: Request, gw: GatewayDep, admin: CurrentAdmin) -> Response:
    """The editor's check without a script: the same page, with the text as edited and its issues."""
    text = (await form_of(request)).get("text", "")[:MAX_POLICY_CHARS]
    return await page(request, gw, admin, text, live_of(gw).check(text))


@pages.post("/apply")
async def policy_page_apply(request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    form = await form_of(request)
    text = form.get("text", "")[:MAX_POLICY_CHARS]
    live = live_of(gw)
    try:
        applied = await live.apply_text(text, admin.who, "console", form.get("note", "")[:500])
    except PolicyRejected as exc:
        refused = PolicyCheck(exc.issues, None)
        return await page(request, gw, admin, text, refused, "Not applied.", status=400)
    return RedirectResponse(f"{base(request)}/policy?applied={applied.version.id}", status_code=303)


@pages.post("/rollback")
async def policy_page_rollback(request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    raw = (await form_of(request)).get("version", "")
    if not raw.isdigit():
        refused = PolicyCheck([PolicyIssue(None, "version", "choose a version to roll back to")], None)
        return await page(request, gw, admin, None, refused, "Not rolled back.", status=400)
    try:
        applied = await live_of(gw).rollback(int(raw), admin.who)
    except PolicyRejected as exc:
        return await page(request, gw, admin, None, PolicyCheck(exc.issues, None), "Not rolled back.", 400)
    return RedirectResponse(f"{base(request)}/policy?applied={applied.version.id}", status_code=303)
