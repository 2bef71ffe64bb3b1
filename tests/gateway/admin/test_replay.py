"""Cache replay started from the console: the run asks the large tier again for an entry the small tier
answered, the gateway then serves the large tier's answer from the cache, and the run's progress and
result are readable; the page's form needs the CSRF token."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.gateway.admin.conftest import ADMIN_KEY, StartGateway, ask, logged_in
from tests.gateway.conftest import RunningGateway, Standins, settle_cache, standin_policy

BEARER = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def cached(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> RunningGateway:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    return start_gateway(standin_policy(standins, "http", cache={"enabled": True, "sync_interval_s": 0.2}))


def finished(gw: RunningGateway, run_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        run: dict[str, Any] = httpx.get(f"{gw.url}/admin/api/cache/replay/{run_id}", headers=BEARER).json()
        if run["status"] != "running":
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


def answer(gw: RunningGateway, question: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": question}]},
        timeout=30,
    )


def test_a_run_replaces_a_small_tier_answer_with_the_large_tiers(
    cached: RunningGateway, standins: Standins
) -> None:
    question = "Why is the sky blue?"
    ask(cached, question)  # the rule router: a short prompt goes to the small tier
    settle_cache(cached.gateway)
    assert answer(cached, question).json()["choices"][0]["message"]["content"].startswith("small-model")
    started = httpx.post(cached.url + "/admin/api/cache/replay", json={"budget_usd": 1.0}, headers=BEARER)
    assert started.status_code == 202 and started.json()["status"] == "running"
    assert started.json()["author"] == "environment key"
    run = finished(cached, started.json()["id"])
    assert run["status"] == "done" and run["error"] is None
    assert run["summary"]["planned"] == 1 and run["summary"]["replayed"] == 1
    assert standins.large.received[-1]["body"]["messages"] == [{"role": "user", "content": question}]
    deadline = time.monotonic() + 10  # the replica takes the new row at its next sync
    while not answer(cached, question).json()["choices"][0]["message"]["content"].startswith("large-model"):
        assert time.monotonic() < deadline, "the replayed answer is never served"
        time.sleep(0.1)
    listed = httpx.get(cached.url + "/admin/api/cache/replay", headers=BEARER).json()["data"]
    assert [r["id"] for r in listed] == [run["id"]]


def test_one_tenants_run_leaves_other_tenants_entries(cached: RunningGateway, standins: Standins) -> None:
    ask(cached, "Why is the sky blue?")  # the anonymous tenant's
    settle_cache(cached.gateway)
    started = httpx.post(
        cached.url + "/admin/api/cache/replay", json={"budget_usd": 1.0, "tenant": "acme"}, headers=BEARER
    )
    run = finished(cached, started.json()["id"])
    assert run["status"] == "done" and run["tenant"] == "acme" and run["summary"]["planned"] == 0
    assert not standins.large.received


def test_bad_input_and_a_missing_run_are_clear_errors(cached: RunningGateway) -> None:
    bad = httpx.post(cached.url + "/admin/api/cache/replay", json={"budget_usd": -1}, headers=BEARER)
    assert bad.status_code == 400 and "budget_usd" in bad.text
    assert httpx.get(cached.url + "/admin/api/cache/replay/42", headers=BEARER).status_code == 404


def test_the_cache_page_starts_a_run_with_its_csrf_token(cached: RunningGateway) -> None:
    ask(cached, "Why is the sky blue?")
    settle_cache(cached.gateway)
    client = logged_in(cached)
    assert client.post("/admin/cache/replay", data={"budget_usd": "1"}).status_code == 403
    page = client.get("/admin/cache")
    assert "No replay run yet." in page.text
    token = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    refused = client.post("/admin/cache/replay", data={"budget_usd": "lots", "csrf": token})
    assert refused.status_code == 303 and "replay_error=budget_usd" in refused.headers["location"]
    shown = client.get(refused.headers["location"])
    assert 'id="replay-error"' in shown.text and "budget_usd" in shown.text
    started = client.post("/admin/cache/replay", data={"budget_usd": "1", "csrf": token})
    assert started.status_code == 303 and started.headers["location"] == "/admin/cache"
    run_id = httpx.get(cached.url + "/admin/api/cache/replay", headers=BEARER).json()["data"][0]["id"]
    assert finished(cached, run_id)["summary"]["replayed"] == 1
    assert 'class="replayed">1<' in client.get("/admin/cache").text


def test_with_the_cache_off_there_is_nothing_to_replay(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(standin_policy(standins, "http"))
    resp = httpx.post(gw.url + "/admin/api/cache/replay", json={"budget_usd": 1.0}, headers=BEARER)
    assert resp.status_code == 404 and "cache is off" in resp.json()["error"]["message"]
