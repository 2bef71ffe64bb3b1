"""The tenants table of the keys page: each tenant's priority class, limits, budget, spend to date and
live keys; and what an edit of its limits changes in the policy.

Spend is read the way the limiter reads it (`quotas.spent_since`: one range of the request log's
(tenant_id, created_at) index per tenant), so the page and the 429s agree, up to the log writer's flush.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from icgate.gateway.config import AdmissionConfig, TenantLimits
from icgate.gateway.pipeline.quotas import spent_since, window_start
from icgate.gateway.store import keys

LIMIT_FIELDS = ("priority", "requests_per_min", "tokens_per_min", "budget_usd", "budget_window")
EVERY_OTHER = "*"  # the policy's entry for tenants it does not list
# Tenant names as keys are made for them; no dot, as a dot separates a policy path's parts.
EDITABLE_NAME = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9_@-]*)$")


@dataclass(frozen=True)
class TenantView:
    name: str
    limits_from: str | None  # "policy": its own entry; "*": the entry for tenants not listed; None: none
    priority: str | None  # the class its requests queue in: its own, else the policy's default_class
    requests_per_min: int | None
    tokens_per_min: int | None
    budget_usd: float | None
    budget_window: str
    spend_since: datetime
    spent_usd: float  # in the budget's window (a month when it has no budget)
    live_keys: int
    own: TenantLimits | None  # its own entry in the policy: what the console's form edits


def tenant_views(engine: sa.Engine, admission: AdmissionConfig, now: datetime) -> list[TenantView]:
    """Every tenant in the tenants table or named in the policy, by name (blocking: use a thread)."""
    live = {t.name: t.live_keys for t in keys.tenants_with_live_keys(engine)}
    names = sorted(set(live) | {name for name in admission.tenants if name != EVERY_OTHER})
    views = []
    with engine.connect() as conn:
        for name in names:
            own = admission.tenants.get(name)
            effective = admission.tenant(name)
            limits = effective or TenantLimits()
            since = window_start(limits.budget_window, now)
            views.append(
                TenantView(
                    name=name,
                    limits_from="policy" if own else (EVERY_OTHER if effective else None),
                    priority=admission.priority_of(name)[0],
                    requests_per_min=limits.requests_per_min,
                    tokens_per_min=limits.tokens_per_min,
                    budget_usd=limits.budget_usd,
                    budget_window=limits.budget_window,
                    spend_since=since,
                    spent_usd=spent_since(conn, name, since),
                    live_keys=live.get(name, 0),
                    own=own,
                )
            )
    return views


def limit_changes(name: str, own: TenantLimits | None, edit: dict[str, object]) -> dict[str, object]:
    """The policy changes an edit of `name`'s limits makes: a dotted path per field that differs from the
    tenant's own entry (None removes the field). Fields not in `edit` stay as they are."""
    current = own or TenantLimits()  # a tenant without an entry: only what differs from no limits
    return {
        f"admission.tenants.{name}.{field}": edit[field]
        for field in LIMIT_FIELDS
        if field in edit and edit[field] != getattr(current, field)
    }
