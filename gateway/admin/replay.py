"""Cache replay from the console: start a run with a budget (one tenant's entries or all), and follow its
progress and result. The work is `gateway.cache_replay`; this module is its JSON API
(`/admin/api/cache/replay`) and the cache page's form (`/admin/cache/replay`)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError

from icgate.gateway.admin.api import engine_of, entries_of, namespace_of
from icgate.gateway.admin.deps import Admin, AdminChange, CurrentAdmin, DbInt, GatewayDep, form_of
from icgate.gateway.admin.pages import base
from icgate.gateway.cache_replay import ReplayBusy, ReplayOptions, ReplayRuns
from icgate.gateway.errors import GatewayError
from icgate.gateway.store import replay_runs
from icgate.gateway.store.replay_runs import ReplayRun
from icgate.gateway.wiring import Gateway

api = APIRouter(prefix="/admin/api/cache/replay", tags=["admin"])
pages = APIRouter(prefix="/admin/cache/replay", include_in_schema=False)


class NewReplay(BaseModel):
    budget_usd: float = Field(gt=0, le=10_000)
    max_entries: int = Field(100, ge=1, le=10_000)
    tenant: str | None = Field(None, max_length=128)  # one tenant's entries; none: every tenant's


def run_json(run: ReplayRun) -> dict[str, Any]:
    out = asdict(run)
    out["created_at"] = run.created_at.isoformat()
    out["finished_at"] = run.finished_at.isoformat() if run.finished_at else None
    return out


def runs_of(gw: Gateway) -> ReplayRuns:
    entries_of(gw)  # the cache must be on
    if gw.replays is None:
        raise GatewayError(503, "The gateway is starting.", type="server_error")
    return gw.replays


async def start_run(gw: Gateway, wanted: NewReplay, admin: Admin) -> int:
    runs = runs_of(gw)
    namespace = await asyncio.to_thread(namespace_of, engine_of(gw), wanted.tenant)
    options = ReplayOptions(wanted.budget_usd, wanted.max_entries, namespace=namespace)
    try:
        return await runs.start(options, wanted.tenant or None, admin.who)
    except ReplayBusy as exc:
        raise GatewayError(
            409, f"Not started: {exc}.", type="invalid_request_error", code="replay_busy"
        ) from exc


@api.post("", status_code=202)
async def replay_start(body: NewReplay, gw: GatewayDep, admin: AdminChange) -> dict[str, Any]:
    """Start a replay run: the most valuable entries answered by a cheaper tier are asked again of the
    best tier's backend while it is idle, within the budget; entries that never helped are pruned."""
    run_id = await start_run(gw, body, admin)
    found = await asyncio.to_thread(replay_runs.get, engine_of(gw), run_id)
    assert found is not None
    return run_json(found)


@api.get("")
async def replay_list(gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """The newest runs, with their progress (planned, replayed, failed, pruned, spent) and result."""
    found = await asyncio.to_thread(replay_runs.recent, engine_of(gw), 20)
    return {"data": [run_json(r) for r in found]}


@api.get("/{run_id}")
async def replay_get(run_id: DbInt, gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    found = await asyncio.to_thread(replay_runs.get, engine_of(gw), run_id)
    if found is None:
        raise GatewayError(404, f"No replay run {run_id}.", type="not_found_error")
    return run_json(found)


@pages.post("")
async def replay_start_page(request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    """The cache page's form: start, then back to the cache page, which shows the run (or why not)."""
    form = await form_of(request)
    tenant = form.get("tenant") or None
    back = {"tenant": tenant} if tenant else {}
    try:
        wanted = NewReplay.model_validate(
            {
                "budget_usd": form.get("budget_usd"),
                "max_entries": form.get("max_entries") or 100,
                "tenant": tenant,
            }
        )
        await start_run(gw, wanted, admin)
    except ValidationError as exc:
        first = exc.errors()[0]
        back["replay_error"] = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    except GatewayError as exc:
        back["replay_error"] = exc.message
    query = f"?{urlencode(back)}" if back else ""
    return RedirectResponse(f"{base(request)}/cache{query}", status_code=303)
