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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from limits import RateLimitItemPerMinute
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from icgate.gateway.backends.shared import Outage
from icgate.gateway.config import AdmissionConfig, TenantLimits
from icgate.gateway.errors import GatewayError
from icgate.gateway.store import tables

# KEYS: a tenant's ledger. ARGV: what the request log says it spent, the ledger's lifetime (0: forever).
SEED_LEDGER = """
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > now then redis.call('SET', KEYS[1], ARGV[1]) end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


def window_start(window: str, now: datetime) -> datetime:
    if window == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return datetime(1970, 1, 1, tzinfo=UTC)


def spent_since(conn: sa.Connection, tenant: str, since: datetime) -> float:
    """What the request log says `tenant`'s requests cost since `since`: one range of the log's
    (tenant_id, created_at) index. The limiter's refresh and the console's tenants table both read it."""
    query = (
        sa.select(sa.func.coalesce(sa.func.sum(tables.RequestLog.cost_usd), 0.0))
        .join(tables.TenantRow, tables.TenantRow.id == tables.RequestLog.tenant_id)
        .where(tables.TenantRow.name == tenant, tables.RequestLog.created_at >= since)
    )
    return float(conn.execute(query).scalar_one())


@dataclass
class _Spend:
    window: str
    since: datetime
    recorded: float = 0.0  # from the request log at the last refresh
    local: float = 0.0  # recorded by this replica since


class TenantLimiter:
    """Checks a tenant's limits at arrival and charges what its requests use."""

    def __init__(
        self,
        config: AdmissionConfig,
        engine: sa.Engine | None = None,
        shared_url: str | None = None,
        on_shared_down: Callable[[], None] = lambda: None,
        shared_prefix: str = "icgate",
    ) -> None:
        """`shared_url`: the replicas' Redis (`shared_state`), used when `rate_limit_storage` is left in
        memory, so one window per tenant is shared by every replica; budgets are then charged to one
        ledger per tenant and window there too."""
        self.config = config
        self.engine = engine
        self._ledgers: aioredis.Redis | None = None
        if shared_url is not None:
            self._ledgers = aioredis.Redis.from_url(
                shared_url, socket_timeout=1.0, socket_connect_timeout=1.0
            )
            self._seed = self._ledgers.register_script(SEED_LEDGER)
        self.shared_prefix = shared_prefix
        uri = config.rate_limit_storage
        if shared_url is not None and uri == "memory://":
            uri = shared_url
        # The asyncio flavour of the same storage (`async+memory://`, `async+redis://...`), on redis-py.
        uri = uri if uri.startswith("async+") else f"async+{uri}"
        options: dict[str, float | str | bool] = {}
        if uri.startswith("async+redis"):
            # redis-py (the client the rest of icgate uses); a Redis that does not answer fails in a second.
            options = {
                "implementation": "redispy",
                "wrap_exceptions": True,
                "socket_timeout": 1.0,
                "socket_connect_timeout": 1.0,
                # Under `shared_state.key_prefix`, like every other key icgate keeps in Redis: two
                # deployments sharing one Redis do not share their tenants' windows.
                "key_prefix": f"{shared_prefix}:limits",
            }
        self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(uri, **options))
        self.shared = not uri.startswith("async+memory")
        # Counts on this replica alone while the shared storage does not answer.
        self._local = SlidingWindowCounterRateLimiter(storage_from_string("async+memory://"))
        self.on_shared_down = on_shared_down
        self._outage = Outage("the rate-limit and budget storage")
        self._spend: dict[str, _Spend] = {}
        self._refreshed = -math.inf

    async def _hit(self, item: RateLimitItemPerMinute, kind: str, tenant: str, cost: int = 1) -> bool:
        """One hit on the shared window; on this replica's own while the shared storage is down (and for a
        few seconds after it failed: `Outage`)."""
        if not self.shared or self._outage.up:
            try:
                return bool(await self._limiter.hit(item, kind, tenant, cost=cost))
            except StorageError as exc:
                if not self.shared:
                    raise
                self._outage.failed(exc)
        self.on_shared_down()
        return bool(await self._local.hit(item, kind, tenant, cost=cost))

    def _down(self, exc: BaseException) -> None:
        self.on_shared_down()
        self._outage.failed(exc)

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
            spent = max(self.spent(tenant, limits), await self._shared_spent(tenant, limits))
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
            if not await self._hit(item, "requests", tenant):
                raise await self._refusal(item, tenant, "requests", "requests per min (RPM)", 1)
        if limits.tokens_per_min is not None:
            item = RateLimitItemPerMinute(limits.tokens_per_min)
            cost = min(prompt_tokens, limits.tokens_per_min)
            if not await self._hit(item, "tokens", tenant, cost=cost):
                raise await self._refusal(item, tenant, "tokens", "tokens per min (TPM)", cost)

    async def _refusal(
        self, item: RateLimitItemPerMinute, tenant: str, kind: str, what: str, requested: int
    ) -> GatewayError:
        limiter = self._limiter if not self.shared or self._outage.up else self._local
        try:
            stats = await limiter.get_window_stats(item, kind, tenant)
        except StorageError:
            if not self.shared:
                raise
            stats = await self._local.get_window_stats(item, kind, tenant)
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
            await self._hit(item, "tokens", tenant, cost=min(completion_tokens, item.amount))
        if limits.budget_usd is not None and cost_usd > 0:
            self._ledger(tenant, limits).local += cost_usd
            await self._shared_charge(tenant, limits, cost_usd)

    # --- budgets across replicas: one ledger per tenant and window in Redis --------------------------

    def _ledger_key(self, tenant: str, limits: TenantLimits) -> tuple[str, int]:
        """The ledger's key, and how long it is kept (0: forever, for a `total` budget)."""
        since = window_start(limits.budget_window, datetime.now(UTC))
        ttl = {"day": 2 * 86_400, "month": 40 * 86_400}.get(limits.budget_window, 0)
        return f"{self.shared_prefix}:spend:{tenant}:{limits.budget_window}:{since.date().isoformat()}", ttl

    def _ledgers_up(self) -> aioredis.Redis | None:
        return self._ledgers if self._ledgers is not None and self._outage.up else None

    async def _shared_spent(self, tenant: str, limits: TenantLimits) -> float:
        client = self._ledgers_up()
        if client is None:
            return 0.0
        try:
            return float(await client.get(self._ledger_key(tenant, limits)[0]) or 0.0)
        except (RedisError, OSError) as exc:
            self._down(exc)
            return 0.0

    async def _shared_charge(self, tenant: str, limits: TenantLimits, cost_usd: float) -> None:
        client = self._ledgers_up()
        if client is None:
            return
        key, ttl = self._ledger_key(tenant, limits)
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.incrbyfloat(key, cost_usd)
                if ttl:
                    pipe.expire(key, ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._down(exc)

    async def seed_shared(self) -> None:
        """After the request log was read: no ledger below what the log says (a new ledger, or one Redis
        lost, starts from the log). Charges made since are in both, so taking the larger counts none
        twice."""
        if self._ledgers_up() is None:
            return
        try:
            for name in self.budgeted_tenants():
                limits = self.config.tenants[name]
                key, ttl = self._ledger_key(name, limits)
                await self._seed(keys=[key], args=[self.spent(name, limits), ttl])
        except (RedisError, OSError) as exc:
            self._down(exc)

    async def close(self) -> None:
        if self._ledgers is not None:
            await self._ledgers.aclose()

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
                totals[name] = spent_since(conn, name, since)
        for name, total in totals.items():
            entry = self._ledger(name, self.config.tenants[name])
            entry.recorded, entry.local = total, 0.0
