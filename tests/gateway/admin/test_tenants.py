"""The tenants table of the keys page over real HTTP: limits and priority classes from the policy, spend to
date after priced requests, live keys; and an edit of a tenant's limits handed to the live policy."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from icgate.gateway.admin.tenants import tenant_views
from icgate.gateway.config import AdmissionConfig, Policy
from icgate.gateway.store import keys, tables
from tests.gateway.admin.conftest import ADMIN_KEY, logged_in, wait_logged
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[..., RunningGateway]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PRICES = {"small": (1.0, 2.0), "large": (10.0, 20.0)}


def priced_policy(standins: Standins) -> Policy:
    policy = standin_policy(
        standins,
        "http",
        auth={"required": True},
        admission={
            "classes": {"interactive": {"rank": 0}, "batch": {"rank": 1}},
            "default_class": "interactive",
            "tenants": {
                "acme": {
                    "priority": "batch",
                    "requests_per_min": 100,
                    "tokens_per_min": 50_000,
                    "budget_usd": 5.0,
                    "budget_window": "day",
                },
                "gamma": {"budget_usd": 1.0},  # in the policy, without a key yet
                "*": {"requests_per_min": 30},
            },
        },
    )
    for backend in policy.backends:
        backend.cost_per_1k_input, backend.cost_per_1k_output = PRICES[backend.name]
    return policy


def ask_as(gw: RunningGateway, key: str, content: str) -> str:
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": content}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.headers["x-icgate-request-id"]


@pytest.fixture
def priced(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> RunningGateway:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    return start_gateway(priced_policy(standins))


def cost_of(gw: RunningGateway, request_id: str) -> float:
    row = wait_logged(gw, request_id)["request"]
    assert isinstance(row, dict)
    return float(row["cost_usd"])


def tenants_by_name(gw: RunningGateway) -> dict[str, dict[str, Any]]:
    body = httpx.get(gw.url + "/admin/api/tenants", headers=ADMIN).json()
    return {t["name"]: t for t in body["data"]}


def test_every_tenant_with_its_limits_spend_and_live_keys(priced: RunningGateway) -> None:
    gw = priced
    engine = gw.gateway.engine
    assert engine is not None
    acme = [keys.create_key(engine, "acme") for _ in range(3)]
    keys.revoke_key(engine, acme[2].key_id)
    beta = keys.create_key(engine, "beta")
    asked = [ask_as(gw, acme[0].key, f"Short question {i}?") for i in range(2)]
    asked.append(ask_as(gw, acme[1].key, "Summarise this: " + "the tide comes in and goes out " * 60))
    beta_asked = ask_as(gw, beta.key, "What is the capital of France?")
    acme_cost = sum(cost_of(gw, i) for i in asked)
    beta_cost = cost_of(gw, beta_asked)
    assert acme_cost > 0 and beta_cost > 0

    body = httpx.get(gw.url + "/admin/api/tenants", headers=ADMIN).json()
    assert body["every_other"]["requests_per_min"] == 30
    assert body["classes"] == ["batch", "interactive"] and body["default_class"] == "interactive"
    found = {t["name"]: t for t in body["data"]}
    assert list(found) == ["acme", "beta", "gamma"]  # the tenants table, and names only the policy has
    a, b, g = found["acme"], found["beta"], found["gamma"]
    assert (a["limits_from"], a["priority"], a["requests_per_min"], a["tokens_per_min"]) == (
        "policy",
        "batch",
        100,
        50_000,
    )
    assert (a["budget_usd"], a["budget_window"], a["live_keys"]) == (5.0, "day", 2)
    assert a["spend_since"].endswith("T00:00:00+00:00")  # today, the budget's window
    assert math.isclose(a["spent_usd"], acme_cost)
    # beta is not in the policy: the `*` entry's limits, the default class, a month's spend
    assert (b["limits_from"], b["priority"], b["requests_per_min"], b["budget_usd"]) == (
        "*",
        "interactive",
        30,
        None,
    )
    assert math.isclose(b["spent_usd"], beta_cost) and b["live_keys"] == 1 and b["own"] is None
    assert (g["live_keys"], g["spent_usd"], g["budget_usd"], g["own"]["budget_usd"]) == (0, 0.0, 1.0, 1.0)

    page = logged_in(gw).get("/admin/keys").text
    row = re.search(r'<tr id="tenant-acme">(.*?)</tr>', page, re.S)
    assert row is not None
    assert f"${acme_cost:.4f}" in row.group(1) and "$5.00 / day" in row.group(1) and ">batch<" in row.group(1)
    assert acme[0].key not in page


def versions(engine: sa.Engine) -> list[tuple[str, str, str]]:
    """Who applied each policy version, how, and why (the first: the gateway's start)."""
    table = tables.PolicyVersion
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.author, table.source, table.note).order_by(table.id))
        return [(r.author, r.source, r.note) for r in rows]


def test_editing_a_tenants_limits_goes_through_the_live_policy(priced: RunningGateway) -> None:
    gw = priced
    engine = gw.gateway.engine
    assert engine is not None
    edited = httpx.post(
        gw.url + "/admin/api/tenants/acme",
        json={"budget_usd": 7.5, "requests_per_min": None, "tokens_per_min": 50_000, "note": "more room"},
        headers=ADMIN,
    )
    assert edited.status_code == 200, edited.text
    body = edited.json()
    # only what differs; null removes; fields not sent stay
    assert body["changes"] == {
        "admission.tenants.acme.budget_usd": 7.5,
        "admission.tenants.acme.requests_per_min": None,
    }
    assert versions(engine)[-1] == ("environment key", "console", "more room")
    assert (body["data"]["budget_usd"], body["data"]["requests_per_min"], body["data"]["priority"]) == (
        7.5,
        None,
        "batch",
    )

    # a tenant without an entry gets one holding only what was set
    made = httpx.post(gw.url + "/admin/api/tenants/newco", json={"priority": "batch"}, headers=ADMIN).json()
    assert made["changes"] == {"admission.tenants.newco.priority": "batch"}
    assert tenants_by_name(gw)["newco"]["priority"] == "batch"
    same = httpx.post(gw.url + "/admin/api/tenants/newco", json={"priority": "batch"}, headers=ADMIN).json()
    assert same["changes"] == {} and len(versions(engine)) == 3  # nothing differed: nothing applied

    rejected = httpx.post(gw.url + "/admin/api/tenants/acme", json={"priority": "nope"}, headers=ADMIN)
    assert rejected.status_code == 400 and rejected.json()["error"]["code"] == "policy_rejected"
    assert "nope" in rejected.json()["error"]["message"]
    for bad in (
        {"budget_usd": -1},
        {"requests_per_min": 0},
        {"budget_window": "week"},
        {"rpm": 3},
        {"budget_usd": "inf"},
    ):
        resp = httpx.post(gw.url + "/admin/api/tenants/acme", json=bad, headers=ADMIN)
        assert resp.status_code == 400, bad
    dotted = httpx.post(gw.url + "/admin/api/tenants/a.b", json={"budget_usd": 1}, headers=ADMIN)
    assert dotted.status_code == 400 and dotted.json()["error"]["param"] == "tenant"

    # the page's form: a session, its CSRF token, blank fields for no limit; the author is the key's name
    client = logged_in(gw)
    page = client.get("/admin/keys").text
    assert 'href="/admin/tenants/acme"' in page and 'href="/admin/tenants/%2A"' in page
    form_page = client.get("/admin/tenants/acme").text
    assert 'value="7.5"' in form_page and '<option value="batch" selected>' in form_page
    token = re.search(r'name="csrf" value="([^"]+)"', form_page)
    assert token is not None
    form = {"priority": "", "requests_per_min": "60", "tokens_per_min": "", "budget_usd": "2.5"}
    assert client.post("/admin/tenants/acme", data=form).status_code == 403  # no CSRF token
    saved = client.post(
        "/admin/tenants/acme", data={**form, "budget_window": "month", "csrf": token.group(1)}
    )
    assert saved.status_code == 303 and saved.headers["location"] == "/admin/keys#tenant-acme"
    assert versions(engine)[-1] == ("environment key", "console", "limits of tenant acme")
    acme = tenants_by_name(gw)["acme"]
    assert (acme["priority"], acme["requests_per_min"], acme["tokens_per_min"]) == ("interactive", 60, None)
    assert (acme["budget_usd"], acme["budget_window"]) == (2.5, "month")
    assert gw.gateway.policy.admission.tenants["acme"].requests_per_min == 60  # in force
    refused = client.post("/admin/tenants/acme", data={"requests_per_min": "lots", "csrf": token.group(1)})
    assert refused.status_code == 400 and 'id="tenant-error"' in refused.text
    assert "requests_per_min" in refused.text
    assert "every tenant not listed" in client.get("/admin/tenants/%2A").text.lower()
    assert client.get("/admin/tenants/a.b").status_code == 400


def log_row(tenant_id: int | None, cost: float, at: datetime, n: int) -> dict[str, Any]:
    return {
        "request_id": f"req-{n}",
        "created_at": at,
        "tenant_id": tenant_id,
        "endpoint": "chat",
        "model_requested": "auto",
        "stream": False,
        "status_code": 200,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cost_usd": cost,
        "latency_ms": 1.0,
        "overhead_ms": 0.1,
        "queue_ms": 0.0,
        "decisions": {},
    }


def test_the_tenants_table_reads_both_databases(engine: sa.Engine) -> None:
    """Spend in each tenant's budget window, live keys counted per tenant, policy-only tenants included."""
    now = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
    acme = keys.create_key(engine, "acme")
    keys.create_key(engine, "acme")
    keys.revoke_key(engine, keys.create_key(engine, "acme").key_id)
    idle = keys.create_key(engine, "idle")
    keys.revoke_key(engine, idle.key_id)
    rows = [
        log_row(acme.tenant_id, 0.5, now - timedelta(hours=1), 1),  # today
        log_row(acme.tenant_id, 0.25, now - timedelta(days=3), 2),  # this month, not today
        log_row(acme.tenant_id, 4.0, now - timedelta(days=40), 3),  # last month
        log_row(None, 9.0, now, 4),  # anonymous
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(tables.RequestLog), rows)
    admission = AdmissionConfig.model_validate(
        {"tenants": {"acme": {"budget_usd": 1.0, "budget_window": "day"}, "solo": {"requests_per_min": 5}}}
    )
    views = {v.name: v for v in tenant_views(engine, admission, now)}
    assert list(views) == ["acme", "idle", "solo"]
    assert (views["acme"].spent_usd, views["acme"].live_keys) == (0.5, 2)
    assert views["acme"].spend_since == datetime(2026, 11, 27, tzinfo=UTC)
    assert (views["idle"].spent_usd, views["idle"].live_keys, views["idle"].limits_from) == (0.0, 0, None)
    assert (views["solo"].requests_per_min, views["solo"].live_keys) == (5, 0)
    month = tenant_views(engine, AdmissionConfig(), now)[0]  # no budget: this month's spend
    assert (month.name, month.spent_usd, month.spend_since.day) == ("acme", 0.75, 1)
