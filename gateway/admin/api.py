"""The console's JSON API under `/admin/api/`: what the pages show, for scripts (the admin key as a
bearer token) and for the pages' own scripts (a session cookie and its CSRF token)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from icgate.gateway.admin.deps import Admin, AdminChange, CurrentAdmin, DbInt, GatewayDep, auth_of
from icgate.gateway.admin.explain import explain
from icgate.gateway.admin.overview import Summary, summarize, window
from icgate.gateway.admin.tenants import EDITABLE_NAME, TenantView, limit_changes, tenant_views
from icgate.gateway.errors import GatewayError
from icgate.gateway.live_policy import PolicyRejected
from icgate.gateway.records import ANONYMOUS, Tenant, namespace_for
from icgate.gateway.store import admin_keys, keys, length_samples, request_log, tables
from icgate.gateway.store.admin_keys import AdminKeyInfo
from icgate.gateway.store.cache_entries import CacheEntries, StoredEntry, list_entries
from icgate.gateway.store.keys import KeyInfo
from icgate.gateway.store.length_learning import RefitReport
from icgate.gateway.store.request_log import LogFilter, LogRow, Overview, get_request, list_requests
from icgate.gateway.wiring import Gateway

router = APIRouter(prefix="/admin/api", tags=["admin"])

PAGE = 50


def row_json(row: LogRow) -> dict[str, Any]:
    out = asdict(row)
    out.pop("bodies", None)  # shown once, as the explanation's facts (`bodies.prompt`, `bodies.answer`)
    out["created_at"] = row.created_at.isoformat()
    return out


def verifier_threshold(gw: Gateway) -> float | None:
    """The probability a semantic hit's verifier score must reach (the calibrated verifier's), if any."""
    entries = gw.cache_entries
    threshold = getattr(entries.verifier, "probability_threshold", None) if entries is not None else None
    return float(threshold) if isinstance(threshold, int | float) else None


Listed = TypeVar("Listed", LogRow, StoredEntry)


def one_page(found: list[Listed], limit: int) -> tuple[list[Listed], int | None]:
    """A page of `limit` rows out of the `limit + 1` fetched, and the next page's cursor (None: no more)."""
    page = found[:limit]
    return page, (page[-1].id if len(found) > limit and page else None)


async def page_of(
    gw: Gateway, where: LogFilter, limit: int, before: int | None
) -> tuple[list[LogRow], int | None]:
    rows = await asyncio.to_thread(list_requests, engine_of(gw), where, limit + 1, before)
    return one_page(rows, limit)


def log_filter(
    tenant: str | None = None,
    route: str | None = None,
    backend: str | None = None,
    status: DbInt | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    q: str | None = None,
) -> LogFilter:
    def blank(v: str | None) -> str | None:
        return v if v else None

    return LogFilter(blank(tenant), blank(route), blank(backend), status, since, until, blank(q))


async def overview_of(gw: Gateway, name: str) -> tuple[Overview, Summary, str]:
    since, until, chosen = window(datetime.now(UTC), name)
    policy = gw.policy
    data = await asyncio.to_thread(request_log.overview, engine_of(gw), since, until, policy.small_tier)
    best = next(iter(policy.tier(policy.best_tier)), None)
    return data, summarize(data, best), chosen


@router.get("/overview")
async def overview(gw: GatewayDep, _admin: CurrentAdmin, range: str = "24h") -> dict[str, Any]:
    """Totals for a time range (`1h`, `24h`, `7d`, `30d`): requests, hit rate, latency, refusals, errors,
    fallbacks, money saved by mechanism against the best tier, and requests by route over time."""
    data, summary, chosen = await overview_of(gw, range)
    return {
        "range": chosen,
        "since": data.since.isoformat(),
        "until": data.until.isoformat(),
        "summary": asdict(summary),
        "buckets": [{"start": b.start.isoformat(), "routes": b.routes} for b in data.buckets],
    }


LogFilterDep = Annotated[LogFilter, Depends(log_filter)]


@router.get("/requests")
async def requests(
    gw: GatewayDep,
    _admin: CurrentAdmin,
    where: LogFilterDep,
    limit: int = Query(PAGE, ge=1, le=500),
    before: Annotated[DbInt | None, Query(description="the `next_before` of the previous page")] = None,
) -> dict[str, Any]:
    """The request log, newest first, one page at a time (keyset pagination)."""
    rows, next_before = await page_of(gw, where, limit, before)
    return {"data": [row_json(r) for r in rows], "next_before": next_before}


@router.get("/requests/{request_id}")
async def request_detail(request_id: str, gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """One request's row and its explanation, stage by stage."""
    row = await asyncio.to_thread(get_request, engine_of(gw), request_id)
    if row is None:
        raise GatewayError(404, f"No request '{request_id}' in the log.", type="not_found_error")
    stages = explain(row, verifier_threshold(gw))
    return {"request": row_json(row), "explanation": [asdict(s) for s in stages]}


# --- tenants' keys -------------------------------------------------------------------------------------


class NewKey(BaseModel):
    tenant: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")


def key_json(info: KeyInfo | AdminKeyInfo) -> dict[str, Any]:
    out = asdict(info)
    for name in ("created_at", "revoked_at", "last_used_at"):
        out[name] = out[name].isoformat() if out[name] is not None else None
    out["active"] = info.active
    return out


def forget_cached_keys(gw: Gateway) -> None:
    """A revoked key stops working at once on this replica, and on every replica sharing its Redis (the
    others within their key cache's few seconds)."""
    gw.keys_revoked()


def engine_of(gw: Gateway) -> sa.Engine:
    if gw.engine is None:
        raise GatewayError(503, "The gateway is starting.", type="server_error")
    return gw.engine


@router.get("/keys")
async def keys_list(gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """Every tenant key, without its secret."""
    found = await asyncio.to_thread(keys.list_keys, engine_of(gw))
    return {"data": [key_json(k) for k in found]}


@router.post("/keys", status_code=201)
async def keys_create(body: NewKey, gw: GatewayDep, _admin: AdminChange) -> dict[str, Any]:
    """A new key for `tenant` (created if new). The key is in this answer and nowhere else, ever."""
    created = await asyncio.to_thread(keys.create_key, engine_of(gw), body.tenant)
    return {"key_id": created.key_id, "tenant": created.tenant_name, "key": created.key}


@router.post("/keys/{key_id}/revoke")
async def keys_revoke(key_id: DbInt, gw: GatewayDep, _admin: AdminChange) -> dict[str, Any]:
    """Revoke a key (again: no change, the first revocation's time is kept)."""
    revoked = await asyncio.to_thread(keys.revoke_key, engine_of(gw), key_id)
    if not revoked:
        raise GatewayError(404, f"No key {key_id}.", type="not_found_error")
    forget_cached_keys(gw)
    return {"key_id": key_id, "revoked": True}


# --- tenants: limits, budgets, spend; edited through the live policy ------------------------------------


class TenantEdit(BaseModel):
    """Fields of a tenant's own policy entry to change: a field sent as null is removed, one not sent
    stays as it is."""

    model_config = ConfigDict(extra="forbid")
    priority: str | None = Field(None, min_length=1, max_length=32)
    requests_per_min: int | None = Field(None, ge=1)
    tokens_per_min: int | None = Field(None, ge=1)
    budget_usd: float | None = Field(None, ge=0, allow_inf_nan=False)
    budget_window: Literal["day", "month", "total"] | None = None
    note: str = Field("", max_length=500)


def tenant_json(view: TenantView) -> dict[str, Any]:
    out = {name: getattr(view, name) for name in view.__dataclass_fields__}
    out["spend_since"] = view.spend_since.isoformat()
    out["own"] = view.own.model_dump() if view.own is not None else None
    return out


async def tenants_of(gw: Gateway) -> list[TenantView]:
    return await asyncio.to_thread(tenant_views, engine_of(gw), gw.policy.admission, datetime.now(UTC))


async def edit_tenant(
    gw: Gateway, name: str, edit: dict[str, object], admin: Admin, note: str
) -> dict[str, object]:
    """Apply an edit of `name`'s own limits through the live policy (a new policy version by this admin,
    in force at once here and on the other replicas at their next poll); the changes made (none: nothing
    differed, nothing applied). A refused change is a 400 naming the policy's first issue."""
    if not EDITABLE_NAME.match(name):
        raise GatewayError(
            400,
            f"The console edits tenants named with letters, digits and _ @ - (or '*'), not '{name}' "
            "(a dot separates a policy path's parts): edit the policy file for this one.",
            param="tenant",
        )
    changes = limit_changes(name, gw.policy.admission.tenants.get(name), edit)
    if not changes:
        return changes
    if not gw.ready:  # the live policy starts with the gateway
        raise GatewayError(503, "The gateway is starting.", type="server_error")
    try:
        await gw.live_policy.apply_changes(
            changes, author=admin.who, source="console", note=note or f"limits of tenant {name}"
        )
    except PolicyRejected as exc:
        first = next((i.key for i in exc.issues if i.key), None)
        raise GatewayError(
            400, f"The policy refused the change: {exc}", param=first, code="policy_rejected"
        ) from None
    return changes


@router.get("/tenants")
async def tenants_list(gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """Every tenant (in the tenants table or named in the policy): its priority class, requests and tokens
    per minute, budget and its window, spend to date in that window, and its live keys. `every_other` is
    the policy's `*` entry, for tenants it does not list."""
    admission = gw.policy.admission
    found = await tenants_of(gw)
    every_other = admission.tenants.get("*")
    return {
        "data": [tenant_json(v) for v in found],
        "every_other": every_other.model_dump() if every_other is not None else None,
        "default_class": admission.default_class,
        "classes": sorted(admission.classes),
        "enforced": admission.enabled,
    }


@router.post("/tenants/{name}")
async def tenants_edit(name: str, body: TenantEdit, gw: GatewayDep, admin: AdminChange) -> dict[str, Any]:
    """Change a tenant's own limits in the policy, live, recorded as a policy version by this admin.
    Only the fields sent change (null removes one); `*` is the entry for tenants the policy does not list."""
    edit = body.model_dump(include=body.model_fields_set - {"note"})
    changes = await edit_tenant(gw, name, edit, admin, body.note)
    view = next((v for v in await tenants_of(gw) if v.name == name), None)
    return {"tenant": name, "changes": changes, "data": tenant_json(view) if view is not None else None}


# --- admin keys (made with `icgate admin create-key`) -------------------------------------------------


@router.get("/admin-keys")
async def admin_keys_list(gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """Every stored admin key, without its secret (the environment's key is not stored, so not listed)."""
    found = await asyncio.to_thread(admin_keys.list_admin_keys, engine_of(gw))
    return {"data": [key_json(k) for k in found]}


@router.post("/admin-keys/{key_id}/revoke")
async def admin_keys_revoke(
    key_id: DbInt, gw: GatewayDep, request: Request, _admin: AdminChange
) -> dict[str, Any]:
    """Revoke an admin key and end its sessions: at once on this replica, within 5 s on the others."""
    if not await asyncio.to_thread(admin_keys.revoke_admin_key, engine_of(gw), key_id):
        raise GatewayError(404, f"No admin key {key_id}.", type="not_found_error")
    auth_of(request).drop_stored(key_id)
    return {"key_id": key_id, "revoked": True}


# --- the cache -----------------------------------------------------------------------------------------


class DeleteEntries(BaseModel):
    ids: list[DbInt] = Field(min_length=1, max_length=1000)


def namespace_of(engine: sa.Engine, tenant: str | None) -> str | None:
    """The cache namespace of a tenant by name ("anonymous" for callers without a key); None: every tenant.
    An unknown tenant has a namespace no entry is in."""
    if not tenant:
        return None
    if tenant == ANONYMOUS.name:
        return namespace_for(ANONYMOUS)
    with engine.connect() as conn:
        found = conn.execute(sa.select(tables.TenantRow.id).where(tables.TenantRow.name == tenant)).scalar()
    return namespace_for(Tenant(id=found if found is not None else -1, name=tenant))


def entry_json(entry: StoredEntry) -> dict[str, Any]:
    out = asdict(entry)
    for name in ("created_at", "last_used_at", "expires_at"):
        out[name] = out[name].isoformat() if out[name] is not None else None
    return out


def entries_of(gw: Gateway) -> CacheEntries:
    if gw.cache_entries is None:
        raise GatewayError(404, "The cache is off in this gateway's policy.", type="not_found_error")
    return gw.cache_entries


async def cache_page_of(
    gw: Gateway, tenant: str | None, q: str | None, limit: int, before: int | None
) -> tuple[list[StoredEntry], int | None]:
    engine = engine_of(gw)
    entries_of(gw)
    namespace = await asyncio.to_thread(namespace_of, engine, tenant)
    found = await asyncio.to_thread(list_entries, engine, namespace, q or None, limit + 1, before)
    return one_page(found, limit)


@router.get("/cache")
async def cache_list(
    gw: GatewayDep,
    _admin: CurrentAdmin,
    tenant: str | None = None,
    q: str | None = None,
    limit: int = Query(PAGE, ge=1, le=500),
    before: DbInt | None = None,
) -> dict[str, Any]:
    """Live cache entries, newest first: one tenant's (`tenant`) or all, those whose question or answer holds
    `q`; with utility, hits, uses as an example, who produced them, age and expiry."""
    found, next_before = await cache_page_of(gw, tenant, q, limit, before)
    return {"data": [entry_json(e) for e in found], "next_before": next_before}


@router.post("/cache/delete")
async def cache_delete(body: DeleteEntries, gw: GatewayDep, _admin: AdminChange) -> dict[str, Any]:
    """Delete entries: gone from this replica's answers at once, from the others' at their next sync."""
    deleted = await entries_of(gw).delete(sorted(set(body.ids)))
    return {"deleted": deleted}


def refit_json(report: RefitReport) -> dict[str, Any]:
    return {
        "ran": report.ran,
        "asked": report.asked,
        "at": report.at.isoformat() if report.at is not None else None,
        "backends": [asdict(b) for b in report.backends],
    }


@router.get("/lengths")
async def lengths_state(gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """Each backend's length predictor in force (its version and the answers it was fitted on, 0 for the
    shared one), the answers kept for its next refit, and what this replica's last refit did."""
    kept = {c.backend: c.rows for c in await asyncio.to_thread(length_samples.counts, engine_of(gw))}
    learning = gw.length_learning
    config = gw.policy.lengths
    return {
        "learn": config.learn,
        "min_rows": config.min_rows,
        "min_new_rows": config.min_new_rows,
        "refit_interval_s": config.refit_interval_s,
        "backends": [
            {
                "backend": name,
                "version": version,
                "fitted_answers": answers,
                "kept_answers": kept.get(name, 0),
            }
            for name, (version, answers) in gw.lengths_in_force().items()
        ],
        "last_refit": refit_json(learning.last) if learning is not None and learning.last else None,
    }


@router.post("/lengths/refit")
async def lengths_refit(gw: GatewayDep, _admin: AdminChange) -> dict[str, Any]:
    """Refit every backend's length predictor now, on this replica (docs/lengths.md): what each backend's
    refit did, `published` with the new version where it had enough answers, and new ones since the last."""
    learning = gw.length_learning
    if learning is None:
        raise GatewayError(
            409,
            "Length learning is off (lengths.learn: false): there is nothing to refit.",
            type="invalid_request_error",
            code="length_learning_off",
        )
    try:
        report = await learning.refit_now()
    except sa.exc.SQLAlchemyError:  # the lease could not be taken: nothing was fitted
        raise GatewayError(
            503, "The database is not reachable: the refit did not run.", type="server_error"
        ) from None
    return refit_json(report)
