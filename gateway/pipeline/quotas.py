"""Stage 2, quotas: per-tenant rate limits (requests and tokens per minute) and spend budgets.

Counters live in the `limits` library's storage: `memory://` counts per replica, `redis://...` is
shared by every replica. Tokens are charged as they are known: the prompt's estimate at arrival,
the completion's true count when the answer ends (so a request is never refused for tokens it
might not use, and the next one sees what this one really used, as OpenAI's limits do).

Spend is what the request log says the tenant's requests cost in the budget's window (re-read
every `spend_refresh_s`, so replicas converge), plus what this replica recorded since.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from limits import RateLimitItemPerMinute
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from icgate.gateway.config import AdmissionConfig, TenantLimits
from icgate.gateway.errors import GatewayError
from icgate.gateway.store import tables


def window_start(window: str, now: datetime) -> datetime:
    if window == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class _Spend:
    window: str
    since: datetime
    recorded: float = 0.0  # from the request log at the last refresh
    local: float = 0.0  # recorded by this replica since


class TenantLimiter:
    """Checks a tenant's limits at arrival and charges what its requests use."""

    def __init__(self, config: AdmissionConfig, engine: sa.Engine | None = None) -> None:
        self.config = config
        self.engine = engine
        uri = config.rate_limit_storage
        # The asyncio flavour of the same storage (`async+memory://`, `async+redis://...`).
        storage = storage_from_string(uri if uri.startswith("async+") else f"async+{uri}")
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._spend: dict[str, _Spend] = {}
        self._refreshed = -math.inf

    def _limits(self, tenant: str) -> TenantLimits | None:
        return self.config.tenant(tenant) if self.config.enabled else None

    def tracks(self, tenant: str) -> bool:
        """Whether the tenant has any limit or budget to charge (most requests need no charge task)."""
        return self._limits(tenant) is not None

    async def check(self, tenant: str, prompt_tokens: int) -> None:
        """Raise a 429 (OpenAI's codes and headers) if the tenant is over a limit or its budget."""
        limits = self._limits(tenant)
        if limits is None:
            return
        if limits.budget_usd is not None:
            spent = self.spent(tenant, limits)
            if spent >= limits.budget_usd:
                raise GatewayError(
                    429,
                    f"You exceeded your current quota: tenant '{tenant}' has spent ${spent:.4f} of its "
                    f"${limits.budget_usd:.2f} {limits.budget_window} budget.",
                    type="insufficient_quota",
                    code="insufficient_quota",
                )
        if limits.requests_per_min is not None:
            item = RateLimitItemPerMinute(limits.requests_per_min)
            if not await self._limiter.hit(item, "requests", tenant):
                raise await self._refusal(item, tenant, "requests", "requests per min (RPM)", 1)
        if limits.tokens_per_min is not None:
            item = RateLimitItemPerMinute(limits.tokens_per_min)
            cost = min(prompt_tokens, limits.tokens_per_min)
            if not await self._limiter.hit(item, "tokens", tenant, cost=cost):
                raise await self._refusal(item, tenant, "tokens", "tokens per min (TPM)", cost)

    async def _refusal(
        self, item: RateLimitItemPerMinute, tenant: str, kind: str, what: str, requested: int
    ) -> GatewayError:
        stats = await self._limiter.get_window_stats(item, kind, tenant)
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        used = item.amount - stats.remaining
        return GatewayError(
            429,
            f"Rate limit reached for tenant '{tenant}' on {what}: Limit {item.amount}, Used {used}, "
            f"Requested {requested}. Please try again in {retry}s.",
            type=kind,
            code="rate_limit_exceeded",
            headers={
                "retry-after": str(retry),
                f"x-ratelimit-limit-{kind}": str(item.amount),
                f"x-ratelimit-remaining-{kind}": str(stats.remaining),
                f"x-ratelimit-reset-{kind}": f"{retry}s",
            },
        )

    async def charge(self, tenant: str, completion_tokens: int, cost_usd: float) -> None:
        """What a finished request used: its completion tokens and its cost."""
        limits = self._limits(tenant)
        if limits is None:
            return
        if limits.tokens_per_min is not None and completion_tokens > 0:
            item = RateLimitItemPerMinute(limits.tokens_per_min)
            # Recorded even past the limit: the next request is the one refused.
            await self._limiter.hit(item, "tokens", tenant, cost=min(completion_tokens, item.amount))
        if limits.budget_usd is not None and cost_usd > 0:
            self._ledger(tenant, limits).local += cost_usd

    def spent(self, tenant: str, limits: TenantLimits) -> float:
        entry = self._ledger(tenant, limits)
        return entry.recorded + entry.local

    def _ledger(self, tenant: str, limits: TenantLimits) -> _Spend:
        since = window_start(limits.budget_window, datetime.now(UTC))
        entry = self._spend.get(tenant)
        if entry is None or entry.since != since or entry.window != limits.budget_window:
            entry = self._spend[tenant] = _Spend(limits.budget_window, since)
        return entry

    def budgeted_tenants(self) -> list[str]:
        return [name for name, t in self.config.tenants.items() if t.budget_usd is not None and name != "*"]

    def refresh_spend(self) -> None:
        """Re-read budgeted tenants' spend in their windows from the request log (blocking: use a thread)."""
        if self.engine is None:
            return
        tenants = self.budgeted_tenants()
        if not tenants:
            return
        totals: dict[str, float] = {}
        with self.engine.connect() as conn:
            for name in tenants:
                limits = self.config.tenants[name]
                since = window_start(limits.budget_window, datetime.now(UTC))
                query = (
                    sa.select(sa.func.coalesce(sa.func.sum(tables.RequestLog.cost_usd), 0.0))
                    .join(tables.TenantRow, tables.TenantRow.id == tables.RequestLog.tenant_id)
                    .where(tables.TenantRow.name == name, tables.RequestLog.created_at >= since)
                )
                totals[name] = float(conn.execute(query).scalar_one())
        for name, total in totals.items():
            entry = self._ledger(name, self.config.tenants[name])
            entry.recorded, entry.local = total, 0.0
