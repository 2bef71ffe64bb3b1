"""The quotas stage on plain data: per-tenant rate limits in memory, spend budgets from a SQLite log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from icgate.gateway.config import AdmissionConfig
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.quotas import TenantLimiter, window_start
from icgate.gateway.store import tables
from icgate.gateway.store.db import make_engine


def limiter_for(tenants: dict[str, dict[str, Any]], engine: sa.Engine | None = None) -> TenantLimiter:
    return TenantLimiter(AdmissionConfig.model_validate({"tenants": tenants}), engine)


async def refusal(limiter: TenantLimiter, tenant: str, prompt_tokens: int = 1) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await limiter.check(tenant, prompt_tokens)
    return info.value


def test_window_start() -> None:
    now = datetime(2026, 5, 17, 13, 45, 12, 5, tzinfo=UTC)
    assert window_start("day", now) == datetime(2026, 5, 17, tzinfo=UTC)
    assert window_start("month", now) == datetime(2026, 5, 1, tzinfo=UTC)
    assert window_start("total", now) == datetime(1970, 1, 1, tzinfo=UTC)


async def test_requests_per_minute() -> None:
    limiter = limiter_for({"alice": {"requests_per_min": 2}})
    await limiter.check("alice", 1)
    await limiter.check("alice", 1)
    err = await refusal(limiter, "alice")
    assert (err.status_code, err.type, err.code) == (429, "requests", "rate_limit_exceeded")
    assert "Limit 2, Used 2, Requested 1" in err.message
    assert err.headers["x-ratelimit-limit-requests"] == "2"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(err.headers["retry-after"]) <= 60
    await limiter.check("bob", 1)  # limits are per tenant; bob has none


async def test_tokens_per_minute_counts_prompts_then_completions() -> None:
    limiter = limiter_for({"alice": {"tokens_per_min": 100}})
    await limiter.check("alice", 60)
    await limiter.charge("alice", completion_tokens=30, cost_usd=0.0)
    err = await refusal(limiter, "alice", 20)  # 60 + 30 used; 20 more is over
    assert (err.type, err.headers["x-ratelimit-limit-tokens"]) == ("tokens", "100")
    assert "Requested 20" in err.message


async def test_a_prompt_larger_than_the_limit_counts_as_the_limit() -> None:
    limiter = limiter_for({"alice": {"tokens_per_min": 100}})
    await limiter.check("alice", 10_000)  # an empty window takes it; the next request waits
    assert "Requested 1" in (await refusal(limiter, "alice")).message


async def test_budget_counts_what_this_replica_charged() -> None:
    limiter = limiter_for({"alice": {"budget_usd": 1.0, "budget_window": "day"}})
    limits = limiter.config.tenants["alice"]
    await limiter.charge("alice", completion_tokens=0, cost_usd=0.6)
    await limiter.check("alice", 1)
    await limiter.charge("alice", completion_tokens=0, cost_usd=0.5)
    assert limiter.spent("alice", limits) == pytest.approx(1.1)
    err = await refusal(limiter, "alice")
    assert (err.status_code, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    assert "$1.1000 of its $1.00 day budget" in err.message


async def test_the_star_entry_covers_unlisted_tenants_and_disabled_admission_none() -> None:
    limiter = limiter_for({"alice": {"requests_per_min": 5}, "*": {"requests_per_min": 1}})
    assert limiter.tracks("alice") and limiter.tracks("anyone")
    await limiter.check("anyone", 1)
    assert (await refusal(limiter, "anyone")).status_code == 429
    await limiter.check("alice", 1)
    await limiter.check("alice", 1)

    off = TenantLimiter(AdmissionConfig(enabled=False, tenants={"*": {"requests_per_min": 1}}))
    assert not off.tracks("anyone")
    for _ in range(3):
        await off.check("anyone", 1)
    await off.charge("anyone", 10, 1.0)


def log_row(tenant_id: int, cost: float, created_at: datetime, n: int) -> tables.RequestLog:
    return tables.RequestLog(
        request_id=f"req-{n}",
        created_at=created_at,
        tenant_id=tenant_id,
        api_key_id=None,
        endpoint="chat",
        model_requested="auto",
        route="large",
        backend="large",
        fallback_from=None,
        stream=False,
        status_code=200,
        error_type=None,
        prompt_tokens=1,
        completion_tokens=1,
        cost_usd=cost,
        latency_ms=1.0,
        overhead_ms=0.1,
        queue_ms=0.0,
        decisions={},
    )


async def test_refresh_spend_reads_the_budget_window_from_the_request_log() -> None:
    engine = make_engine("sqlite://")
    tables.Base.metadata.create_all(engine)
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        session.add_all([tables.TenantRow(id=1, name="alice"), tables.TenantRow(id=2, name="bob")])
        session.add_all(
            [
                log_row(1, 0.25, now, 1),
                log_row(1, 0.5, now, 2),
                log_row(1, 9.0, window_start("month", now) - timedelta(seconds=1), 3),  # last month
                log_row(2, 7.0, now, 4),  # bob's
            ]
        )
    limiter = limiter_for({"alice": {"budget_usd": 1.0}, "*": {"budget_usd": 5.0}}, engine)
    assert limiter.budgeted_tenants() == ["alice"]
    limits = limiter.config.tenants["alice"]
    await limiter.charge("alice", 0, 0.1)
    limiter.refresh_spend()
    assert limiter.spent("alice", limits) == pytest.approx(0.75)  # the log now holds what was charged
    await limiter.check("alice", 1)
    await limiter.charge("alice", 0, 0.3)
    assert (await refusal(limiter, "alice")).code == "insufficient_quota"


def test_refresh_spend_without_a_database_or_budgets_does_nothing() -> None:
    limiter_for({"alice": {"budget_usd": 1.0}}).refresh_spend()
    engine = make_engine("sqlite://")  # no tables: it must not even be queried
    limiter_for({"alice": {"requests_per_min": 1}}, engine).refresh_spend()
