"""The console over real HTTP: login, sessions, CSRF, tenant keys refused everywhere, the request log
and a request's explanation, sub-path hosting."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from icgate.gateway.api.app import create_app
from icgate.gateway.store import keys, tables
from icgate.gateway.wiring import Gateway
from tests.gateway.admin.conftest import ADMIN_KEY, StartGateway, ask, logged_in, wait_logged
from tests.gateway.conftest import RunningGateway, Standins, standin_policy


def test_without_a_session_the_console_leads_to_a_login_page_with_one_password_field(
    console: RunningGateway,
) -> None:
    resp = httpx.get(console.url + "/admin", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/admin/login")
    page = httpx.get(console.url + resp.headers["location"]).text
    assert len(re.findall(r"<input[^>]*type=\"password\"", page)) == 1
    assert len(re.findall(r"<input(?![^>]*type=\"hidden\")", page)) == 1  # the password field is the only one


def test_logging_in_sets_a_safe_cookie_and_opens_the_console(console: RunningGateway) -> None:
    wrong = httpx.post(console.url + "/admin/login", data={"key": "guess"}, follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    client = logged_in(console)
    cookie = client.cookies.jar
    assert any(c.name == "icgate_admin" for c in cookie)
    raw = httpx.post(console.url + "/admin/login", data={"key": ADMIN_KEY}, follow_redirects=False)
    set_cookie = raw.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/admin" in set_cookie
    assert client.get("/admin").status_code == 200
    assert client.get("/admin/requests").status_code == 200


def test_login_attempts_are_limited(console: RunningGateway) -> None:
    statuses = [
        httpx.post(console.url + "/admin/login", data={"key": f"guess-{i}"}).status_code for i in range(6)
    ]
    assert statuses == [401] * 5 + [429]
    # the right key is refused too while the limit holds: guessing cannot be interleaved with it
    assert httpx.post(console.url + "/admin/login", data={"key": ADMIN_KEY}).status_code == 429


def app_routes(app_gateway: Gateway) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, read from the app (FastAPI keeps included routers as
    `_IncludedRouter`s whose `effective_route_contexts` are the routes as served, prefixes applied)."""
    found = []
    for route in create_app(app_gateway).routes:
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for served in contexts:
            found.extend((method, served.path) for method in sorted(getattr(served, "methods", None) or ()))
    return found


def admin_paths(app_gateway: Gateway) -> list[tuple[str, str]]:
    """Every `/admin` route of the app, with its path parameters filled in."""
    return [
        (method, re.sub(r"\{[^}]+\}", "req-x", path))
        for method, path in app_routes(app_gateway)
        if path.startswith("/admin")
    ]


def test_a_tenant_key_is_refused_on_every_admin_path(console: RunningGateway) -> None:
    assert console.gateway.engine is not None
    tenant_key = keys.create_key(console.gateway.engine, "acme").key
    paths = admin_paths(console.gateway)
    assert ("GET", "/admin/api/requests") in paths and ("POST", "/admin/logout") in paths
    login_routes = {("GET", "/admin/login"), ("POST", "/admin/login")}
    for method, path in paths:
        if (method, path) in login_routes:
            continue  # the login page itself takes no credential
        resp = httpx.request(
            method,
            console.url + path,
            headers={"authorization": f"Bearer {tenant_key}"},
            follow_redirects=False,
        )
        assert resp.status_code == 401, (method, path, resp.status_code)


def test_changes_with_a_session_need_its_csrf_token(console: RunningGateway) -> None:
    client = logged_in(console)
    assert client.post("/admin/logout").status_code == 403
    page = client.get("/admin").text
    token = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert token is not None
    assert client.post("/admin/logout", headers={"x-csrf-token": "forged"}).status_code == 403
    out = client.post("/admin/logout", data={"csrf": token.group(1)})
    assert out.status_code == 303 and out.headers["location"] == "/admin/login"


def test_the_request_log_and_a_requests_explanation(console: RunningGateway) -> None:
    request_id = ask(console)
    body = wait_logged(console, request_id)
    row = body["request"]
    assert isinstance(row, dict)
    assert (row["route"], row["backend"], row["status_code"]) == ("small", "small", 200)
    facts = {f["key"]: f["value"] for stage in body["explanation"] for f in stage["facts"]}  # type: ignore[attr-defined]
    assert facts["admit.decision"] == "admitted at once on small"
    assert facts["route.tier"] == "small"
    assert facts["request.tenant"] == "anonymous"
    client = logged_in(console)
    page = client.get(f"/admin/requests/{request_id}").text
    assert 'data-fact="route.tier">small<' in page and 'data-fact="admit.backend">small<' in page
    listed = client.get("/admin/requests").text
    assert request_id in listed
    assert client.get("/admin/requests/req-nope").status_code == 404


def test_the_log_pages_through_every_row_once(console: RunningGateway) -> None:
    ids = {ask(console, f"Question number {i}?") for i in range(7)}
    wait_logged(console, sorted(ids)[0])
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    seen: list[str] = []
    before = None
    deadline = time.monotonic() + 10
    while True:
        params = {"limit": 3, **({"before": before} if before else {})}
        page = httpx.get(console.url + "/admin/api/requests", params=params, headers=headers).json()
        seen += [r["request_id"] for r in page["data"]]
        before = page["next_before"]
        if before is None:
            if set(seen) >= ids or time.monotonic() > deadline:
                break
            seen, before = [], None  # rows still arriving: read again from the top
            time.sleep(0.05)
    assert len(seen) == len(set(seen)) == 7 and set(seen) == ids
    only_small = httpx.get(
        console.url + "/admin/api/requests", params={"route": "large"}, headers=headers
    ).json()
    assert only_small["data"] == []


def test_the_console_is_off_without_an_admin_key(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ICGATE_ADMIN_KEY", raising=False)
    gw = start_gateway(standin_policy(standins, "http"))
    resp = httpx.get(gw.url + "/admin/api/requests", headers={"authorization": "Bearer anything"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "admin_disabled"
    assert httpx.post(gw.url + "/admin/login", data={"key": ""}).status_code == 401


async def test_the_console_works_under_a_sub_path(
    standins: Standins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a reverse proxy at /llm: links and the login form carry the prefix."""
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gateway = Gateway(standin_policy(standins, "http"), tmp_path, launch_local=False)
    await gateway.start()
    try:
        transport = httpx.ASGITransport(create_app(gateway), root_path="/llm")
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            resp = await client.get("/llm/admin")
            assert resp.status_code == 303 and resp.headers["location"].startswith("/llm/admin/login")
            page = (await client.get("/llm/admin/login")).text
            assert 'action="/llm/admin/login"' in page
            login = await client.post("/llm/admin/login", data={"key": ADMIN_KEY})
            assert login.status_code == 303 and login.headers["location"] == "/llm/admin"
            assert "path=/llm/admin" in login.headers["set-cookie"].lower()
            console = (await client.get("/llm/admin")).text
            assert 'href="/llm/admin/requests"' in console
    finally:
        await gateway.stop()


def test_keys_are_created_once_listed_without_secrets_and_revoked_at_once(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(standin_policy(standins, "http", auth={"required": True}))
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(gw.url + "/admin/api/keys", json={"tenant": "acme"}, headers=admin)
    assert created.status_code == 201
    key = created.json()["key"]
    models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert models.status_code == 200  # the new key works at once
    listed = httpx.get(gw.url + "/admin/api/keys", headers=admin).json()["data"]
    assert [(k["tenant_name"], k["active"]) for k in listed] == [("acme", True)]
    assert key not in str(listed)  # never the secret again
    revoked = httpx.post(f"{gw.url}/admin/api/keys/{created.json()['key_id']}/revoke", headers=admin)
    assert revoked.status_code == 200
    refused = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 401  # at once, though the key was just looked up (and cached)
    again = httpx.post(f"{gw.url}/admin/api/keys/{created.json()['key_id']}/revoke", headers=admin)
    assert again.status_code == 200  # revoking twice changes nothing
    assert httpx.post(f"{gw.url}/admin/api/keys/9999/revoke", headers=admin).status_code == 404
    bad = httpx.post(gw.url + "/admin/api/keys", json={"tenant": "no spaces"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tenant"


def test_a_session_creates_keys_only_with_its_csrf_token(console: RunningGateway) -> None:
    client = logged_in(console)
    assert client.post("/admin/api/keys", json={"tenant": "acme"}).status_code == 403
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/admin").text)
    assert token is not None
    made = client.post("/admin/api/keys", json={"tenant": "acme"}, headers={"x-csrf-token": token.group(1)})
    assert made.status_code == 201


def test_the_overview_matches_the_request_log(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    prices = {"small": (1.0, 2.0), "large": (10.0, 20.0)}
    policy = standin_policy(standins, "http")
    for backend in policy.backends:
        backend.cost_per_1k_input, backend.cost_per_1k_output = prices[backend.name]
    gw = start_gateway(policy)
    ids = [ask(gw, f"Short question {i}?") for i in range(3)]
    ids.append(ask(gw, "Summarise this: " + "the tide comes in and goes out " * 60))  # large
    rows = [wait_logged(gw, i)["request"] for i in ids]
    body = httpx.get(
        gw.url + "/admin/api/overview",
        params={"range": "1h"},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    ).json()
    summary = body["summary"]
    assert summary["requests"] == 4 and summary["refusals"] == 0 and summary["errors"] == 0
    assert sum(sum(b["routes"].values()) for b in body["buckets"]) == 4
    assert sum(b["routes"].get("large", 0) for b in body["buckets"]) == 1
    small_rows = [r for r in rows if r["route"] == "small"]  # type: ignore[index]
    expected = sum(
        (r["prompt_tokens"] * 10.0 + r["completion_tokens"] * 20.0) / 1000 - r["cost_usd"]  # type: ignore[index]
        for r in small_rows
    )
    by = {s["mechanism"]: s for s in summary["savings"]}
    assert by["small"]["requests"] == 3
    assert math.isclose(by["small"]["saved_usd"], expected) and expected > 0
    assert math.isclose(summary["saved_usd"], expected)


def test_deleting_a_cache_entry_takes_it_out_of_the_answers(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.gateway.conftest import settle_cache

    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(standin_policy(standins, "http", cache={"enabled": True, "sync_interval_s": 0.2}))
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    question = "What is the boiling point of water at sea level?"
    ask(gw, question)
    settle_cache(gw.gateway)
    assert route_of(gw, question) == "cache"
    found = httpx.get(gw.url + "/admin/api/cache", params={"q": "boiling"}, headers=admin).json()["data"]
    assert [e["prompt_text"] for e in found] == [question]
    assert found[0]["tier"] == "small" and found[0]["hits"] >= 0
    assert (
        httpx.get(gw.url + "/admin/api/cache", params={"tenant": "nobody"}, headers=admin).json()["data"]
        == []
    )
    # a paraphrase is a semantic hit, explained with the verifier's score against its calibrated threshold
    semantic = ask(gw, "What's the boiling point of water at sea level?")
    explanation = wait_logged(gw, semantic)["explanation"]
    assert isinstance(explanation, list)
    facts = {f["key"]: f["value"] for stage in explanation for f in stage["facts"]}
    assert facts["cache.hit"].startswith("a semantic hit")
    verified = re.fullmatch(r"([0-9.]+) against threshold ([0-9.]+)", facts["cache.verifier"])
    assert verified is not None
    assert float(verified.group(1)) >= float(verified.group(2)) > 0
    deleted = httpx.post(gw.url + "/admin/api/cache/delete", json={"ids": [found[0]["id"]]}, headers=admin)
    assert deleted.json() == {"deleted": 1}
    assert route_of(gw, question) == "small"  # gone from the answers at once
    listed = httpx.get(gw.url + "/admin/api/cache", params={"q": "boiling"}, headers=admin).json()["data"]
    assert found[0]["id"] not in [e["id"] for e in listed]  # (the new answer is stored anew)


def route_of(gw: RunningGateway, content: str) -> str:
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": content}]},
        timeout=30,
    )
    assert resp.status_code == 200
    return str(resp.headers["x-icgate-route"])


# --- the explainer, end to end: what each stage decided -------------------------------------------------


def explained(gw: RunningGateway, request_id: str) -> dict[str, dict[str, Any]]:
    """A logged request's facts by key (each `{"label", "value", "key", "items"}`)."""
    explanation = wait_logged(gw, request_id)["explanation"]
    assert isinstance(explanation, list)
    return {f["key"]: f for stage in explanation for f in stage["facts"]}


def test_a_near_miss_shows_its_candidates_scored_and_the_examples_it_got(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.gateway.conftest import settle_cache

    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(standin_policy(standins, "http", cache={"enabled": True}))
    ask(gw, "What is the boiling point of water at sea level?")
    settle_cache(gw.gateway)
    # close in meaning, but another question: the verifier scores the stored one and turns it down
    facts = explained(gw, ask(gw, "What is the freezing point of water at sea level?"))
    assert facts["cache.hit"]["value"] == "not from the cache: no stored answer was close enough"
    [nearest] = facts["cache.candidates"]["items"]
    scored = re.fullmatch(
        r"#(\d+): similarity (0\.\d{4}), verifier (0\.\d{3}) against threshold (0\.\d{3}): "
        r"not served: the verifier's score is under the threshold",
        nearest,
    )
    assert scored is not None, nearest
    similarity, score, threshold = (float(scored.group(i)) for i in (2, 3, 4))
    assert 0.5 < similarity < 1.0 and score < threshold
    # the small tier answered it, with the stored pair prepended as an example
    assert facts["route.tier"]["value"] == "small"
    assert facts["cache.examples"]["value"] == f"#{scored.group(1)}"
    [example] = facts["cache.examples"]["items"]
    assert re.fullmatch(
        rf"#{scored.group(1)}: relevance \(similarity\) {similarity:.4f}, utility \d\.\d\d", example
    )


def test_a_request_whose_first_backend_fails_shows_both_attempts_and_the_fallback(
    console: RunningGateway, standins: Standins
) -> None:
    standins.small.fail_next = 1
    request_id = ask(console)
    facts = explained(console, request_id)
    first, second = facts["attempts"]["items"]
    assert first.startswith("1. small (first): failed after ") and "failed (500)" in first
    assert second.startswith("2. large (fallback): answered in ")
    assert facts["attempts"]["value"] == "2 attempts"
    assert facts["admit.fallback"]["value"].startswith("small failed (")
    assert facts["admit.backend"]["value"] == "large"
    state = facts["admission.state"]["value"]
    assert re.fullmatch(r"small: 0 of \d+ slots in use, 0 queued", state), state


def test_bodies_are_kept_only_with_store_bodies_and_then_scrubbed(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    question = "Write to ann.lee@example.com <b>now</b>: what is the capital of France?"
    by_default = start_gateway(standin_policy(standins, "http"))
    facts = explained(by_default, ask(by_default, question))
    assert "request_log.store_bodies: true" in facts["bodies.none"]["value"] and "bodies.prompt" not in facts
    assert by_default.gateway.engine is not None
    with by_default.gateway.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.RequestBody)).scalar_one() == 0

    storing = start_gateway(standin_policy(standins, "http", request_log={"store_bodies": True}))
    request_id = ask(storing, question)
    facts = explained(storing, request_id)
    prompt, answer = facts["bodies.prompt"]["value"], facts["bodies.answer"]["value"]
    assert prompt == "user: Write to [email] <b>now</b>: what is the capital of France?"
    assert answer and "ann.lee@example.com" not in answer
    page = logged_in(storing).get(f"/admin/requests/{request_id}").text
    assert "Write to [email] &lt;b&gt;now&lt;/b&gt;" in page and "ann.lee@example.com" not in page
    row = wait_logged(storing, request_id)["request"]
    assert isinstance(row, dict) and "bodies" not in row  # shown once, as the facts above
