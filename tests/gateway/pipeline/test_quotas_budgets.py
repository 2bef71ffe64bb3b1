"""Per-tenant rate limits and budgets against the real database (the HTTP path: api/test_admission_api.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from icgate.gateway.config import AdmissionConfig
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.quotas import TenantLimiter, window_start
from icgate.gateway.store import keys
from icgate.gateway.store.request_log import insert_records
from tests.gateway.store.test_request_log import record


def limiter(tenants: dict[str, Any], engine: sa.Engine | None = None) -> TenantLimiter:
    return TenantLimiter(AdmissionConfig.model_validate({"tenants": tenants}), engine)


async def test_requests_per_minute_refuses_the_next_request_with_openai_headers() -> None:
    lim = limiter({"team-a": {"requests_per_min": 3}})
    for _ in range(3):
        await lim.check("team-a", prompt_tokens=5)
    with pytest.raises(GatewayError) as info:
        await lim.check("team-a", prompt_tokens=5)
    err = info.value
    assert (err.status_code, err.type, err.code) == (429, "requests", "rate_limit_exceeded")
    assert "Limit 3" in err.message and "team-a" in err.message
    assert 1 <= int(err.headers["retry-after"]) <= 60
    assert err.headers["x-ratelimit-limit-requests"] == "3"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    await lim.check("team-b", prompt_tokens=5)  # unlisted tenants are not limited


async def test_tokens_per_minute_counts_prompts_at_arrival_and_completions_when_known() -> None:
    lim = limiter({"team-a": {"tokens_per_min": 100}})
    await lim.check("team-a", prompt_tokens=40)
    await lim.check("team-a", prompt_tokens=40)  # 80 used
    with pytest.raises(GatewayError) as info:
        await lim.check("team-a", prompt_tokens=40)
    assert (info.value.type, info.value.code) == ("tokens", "rate_limit_exceeded")
    assert info.value.headers["x-ratelimit-limit-tokens"] == "100"

    other = limiter({"team-a": {"tokens_per_min": 100}})
    await other.check("team-a", prompt_tokens=10)
    await other.charge("team-a", completion_tokens=85, cost_usd=0.0)  # 95 used, the answer counted
    with pytest.raises(GatewayError):
        await other.check("team-a", prompt_tokens=10)


async def test_default_entry_applies_to_unlisted_tenants_each_on_its_own_counter() -> None:
    lim = limiter({"*": {"requests_per_min": 1}, "vip": {}})
    await lim.check("x", 1)
    await lim.check("y", 1)  # own counter
    with pytest.raises(GatewayError):
        await lim.check("x", 1)
    for _ in range(5):
        await lim.check("vip", 1)  # listed without limits


async def test_budget_refuses_once_spent_with_insufficient_quota() -> None:
    lim = limiter({"team-a": {"budget_usd": 0.05, "budget_window": "day"}})
    await lim.check("team-a", 1)
    await lim.charge("team-a", completion_tokens=10, cost_usd=0.03)
    await lim.check("team-a", 1)
    await lim.charge("team-a", completion_tokens=10, cost_usd=0.03)
    with pytest.raises(GatewayError) as info:
        await lim.check("team-a", 1)
    err = info.value
    assert (err.status_code, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    assert "$0.05" in err.message


def test_window_start() -> None:
    now = datetime(2026, 11, 24, 15, 30, tzinfo=UTC)
    assert window_start("day", now) == datetime(2026, 11, 24, tzinfo=UTC)
    assert window_start("month", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert window_start("total", now).year == 1970


async def test_spend_is_read_from_the_request_log_within_the_window(engine: sa.Engine) -> None:
    team = keys.create_key(engine, "team-a").tenant_id
    other = keys.create_key(engine, "team-b").tenant_id
    last_month = window_start("month", datetime.now(UTC)) - timedelta(days=2)
    insert_records(
        engine,
        [
            record(1, tenant_id=team, cost_usd=0.25),
            record(2, tenant_id=team, cost_usd=0.5),
            record(3, tenant_id=team, cost_usd=9.0, created_at=last_month),  # an earlier window
            record(4, tenant_id=other, cost_usd=7.0),
        ],
    )
    lim = limiter({"team-a": {"budget_usd": 1.0, "budget_window": "month"}}, engine)
    lim.refresh_spend()
    limits = lim.config.tenants["team-a"]
    assert lim.spent("team-a", limits) == pytest.approx(0.75)
    await lim.check("team-a", 1)
    await lim.charge("team-a", completion_tokens=1, cost_usd=0.3)  # this replica's own, since
    with pytest.raises(GatewayError):
        await lim.check("team-a", 1)
    insert_records(engine, [record(5, tenant_id=team, cost_usd=0.3)])  # the same request, now logged
    lim.refresh_spend()
    assert lim.spent("team-a", limits) == pytest.approx(1.05)
