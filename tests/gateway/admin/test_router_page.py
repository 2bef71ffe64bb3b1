"""The router page over real HTTP: the router in force, the knob's projection on the logged requests, applying
and rolling it back through the live policy, swapping published versions, CSRF, and refusals of bad input."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from icgate.gateway.admin.knob import Setting
from icgate.gateway.admin.router_page import knob_history
from icgate.gateway.api.app import create_app
from icgate.gateway.config import Policy
from icgate.gateway.store import artifacts, db, tables
from icgate.gateway.store.policy_versions import PolicyVersion
from icgate.gateway.store.request_log import routed_query, scored_routes
from icgate.gateway.wiring import EmbeddingService, Gateway
from icgate.routers.learned import DEFAULT_ARTIFACT, LearnedRouter
from tests.gateway.admin.conftest import ADMIN_KEY, StartGateway, logged_in, wait_logged
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
EASY = ["What is the capital of France?", "Name a primary colour.", "What colour is the sky on a clear day?"]
HARD = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her "
    "parents. How much more money does Betty need to buy the wallet?",
]


def learned_policy(standins: Standins, **router: Any) -> Policy:
    """The shipped learned router over the stand-ins, a dear large tier; the watcher's own poll is slow, so
    a swap shows at once only because the page runs the check itself."""
    policy = standin_policy(
        standins,
        "http",
        router={"kind": "learned", "reload_interval_s": 600, **router},
        embedding={"preload": True},
    )
    prices = {"small": (1.0, 2.0), "large": (10.0, 20.0)}
    for backend in policy.backends:
        backend.cost_per_1k_input, backend.cost_per_1k_output = prices[backend.name]
    return policy


@pytest.fixture
def learned(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningGateway]:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    yield start_gateway(learned_policy(standins))


@pytest.fixture(scope="module")
def shipped() -> LearnedRouter:
    return LearnedRouter.load(DEFAULT_ARTIFACT)


def chat(gw: RunningGateway, content: str) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp


def send_routed(gw: RunningGateway, prompts: list[str]) -> list[dict[str, Any]]:
    """Send the prompts and wait until every one is in the log; their rows, in the order sent."""
    ids = [chat(gw, p).headers["x-icgate-request-id"] for p in prompts]
    rows = []
    for request_id in ids:
        row = wait_logged(gw, request_id)["request"]
        assert isinstance(row, dict)
        rows.append(row)
    return rows


def projection(gw: RunningGateway, **params: Any) -> httpx.Response:
    return httpx.get(gw.url + "/admin/api/router/projection", params=params, headers=ADMIN)


def csrf_of(client: httpx.Client, path: str = "/admin/router") -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).text)
    assert found is not None
    return found.group(1)


def test_the_page_shows_the_router_in_force_and_its_training(
    learned: RunningGateway, shipped: LearnedRouter
) -> None:
    send_routed(learned, EASY[:1] + HARD[:1])
    body = httpx.get(learned.url + "/admin/api/router", headers=ADMIN).json()
    router = body["router"]
    assert (router["kind"], router["version"], router["row"]) == ("learned", shipped.version, None)
    assert router["source"] == "the artifact shipped with icgate" and router["knob"] == "calibrated"
    assert router["threshold"] == pytest.approx(shipped.threshold) and router["swap_blocked"] is None
    assert body["training"]["held_out"]["all"]["apgr"] == pytest.approx(
        shipped.metadata["held_out"]["all"]["apgr"]
    )
    assert body["training"]["data"]["sources"] == shipped.metadata["training"]["sources"]
    assert body["versions"] == []  # nothing published: the shipped file is in force
    assert [h["in_force"] for h in body["knob_history"]] == [True]  # the policy it started with
    page = logged_in(learned).get("/admin/router")
    assert page.status_code == 200
    assert shipped.version in page.text and 'id="curve-chart"' in page.text
    assert 'class="held-out"' in page.text  # the held-out points training kept
    assert 'id="no-stored-curve"' in page.text  # and, plainly, that no held-out curve is stored
    curve = httpx.get(learned.url + "/admin/api/router/curve", headers=ADMIN).json()
    assert curve["requests"] == 2 and curve["held_out_curve_stored"] is False
    shares = [p["strong_share"] for p in curve["projected"]]
    assert shares[0] == 0.0 and shares[-1] == 1.0


def test_the_projection_replays_the_logged_routed_requests(learned: RunningGateway) -> None:
    rows = send_routed(learned, EASY + HARD)
    logged_large = sum(r["route"] == "large" for r in rows)
    assert 0 < logged_large < len(rows)  # the shipped router splits these
    now = projection(learned).json()
    assert now["requests"] == len(rows)
    assert now["logged"]["large"] == now["current"]["large"] == now["candidate"]["large"] == logged_large
    assert now["current"]["cost_usd"] == pytest.approx(
        now["logged"]["cost_usd"]
    )  # the first backends answered
    assert now["current"]["expected_quality"] == pytest.approx(now["logged"]["expected_quality"], abs=1e-3)
    nothing = projection(learned, threshold=0.0).json()["candidate"]
    everything = projection(learned, threshold=1.0).json()["candidate"]
    assert (nothing["large_share"], everything["large_share"]) == (0.0, 1.0)
    assert nothing["cost_usd"] < now["current"]["cost_usd"] < everything["cost_usd"]
    assert (
        nothing["expected_quality"]
        < now["current"]["expected_quality"]
        < everything["expected_quality"]
        == 1.0
    )
    half = projection(learned, strong_share=0.5).json()["candidate"]
    assert half["large"] == 3 and half["setting"]["strong_share"] == 0.5 and 0 < half["threshold"] < 1
    assert projection(learned, threshold=0.3, n=2).json()["requests"] == 2  # the newest two


BAD_INPUT: list[tuple[dict[str, Any], str]] = [
    ({"threshold": 2}, "threshold"),
    ({"threshold": "abc"}, "threshold"),
    ({"strong_share": -0.1}, "strong_share"),
    ({"threshold": 0.2, "strong_share": 0.2}, "threshold"),
    ({"n": 0}, "n"),
    ({"n": 10_001}, "n"),
]


def test_bad_knob_input_is_refused_plainly(learned: RunningGateway) -> None:
    for params, param in BAD_INPUT:
        resp = projection(learned, **params)
        assert resp.status_code == 400, params
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], params
        assert error["param"].split(".")[-1] == param, params  # `query.n`, as the app names a query field


def test_bad_input_to_the_page_and_its_forms_is_refused_plainly(learned: RunningGateway) -> None:
    client = logged_in(learned)
    page = client.get("/admin/router", params={"mode": "threshold", "value": "lots"})
    assert page.status_code == 400 and "must be a number between 0 and 1" in page.text
    token = csrf_of(client)
    applied = client.post("/admin/router/apply", data={"csrf": token, "mode": "threshold", "value": "7"})
    assert applied.status_code == 400 and "between 0 and 1" in applied.text
    share = client.post("/admin/router/apply", data={"csrf": token, "mode": "strong_share", "value": "0.5"})
    assert share.status_code == 409 and "send routed requests first" in share.text  # nothing logged yet
    body = httpx.post(
        learned.url + "/admin/api/router/apply", json={"threshold": 0.3, "strong_share": 0.3}, headers=ADMIN
    )
    assert body.status_code == 400 and "exactly one" in body.json()["error"]["message"]
    missing = httpx.post(learned.url + "/admin/api/router/rollback", json={"version_id": 999}, headers=ADMIN)
    assert missing.status_code == 400 and "no policy version 999" in missing.json()["error"]["message"]


def test_without_js_the_page_renders_the_projection_it_is_asked_for(learned: RunningGateway) -> None:
    send_routed(learned, EASY + HARD)
    client = logged_in(learned)
    for query, share in (({"threshold": "0"}, "0.0%"), ({"mode": "strong_share", "value": "1"}, "100.0%")):
        page = client.get("/admin/router", params=query).text
        assert f'data-proj="candidate.large_share">{share}<' in page
    default = client.get("/admin/router").text
    shown = re.search(r'data-proj="current.large_share">([^<]+)<', default)
    assert shown is not None and f'data-proj="candidate.large_share">{shown.group(1)}<' in default


def test_applying_the_knob_routes_the_next_request_by_it_and_rolling_back_undoes_it(
    learned: RunningGateway, shipped: LearnedRouter
) -> None:
    send_routed(learned, HARD[:2])
    assert chat(learned, HARD[0]).headers["x-icgate-route"] == "large"
    applied = httpx.post(
        learned.url + "/admin/api/router/apply", json={"threshold": 0.0, "note": "all small"}, headers=ADMIN
    )
    assert applied.status_code == 200, applied.text
    version = applied.json()["version"]
    assert version["source"] == "router-knob" and version["live"] == ["router.threshold"]
    assert "all small" in version["note"] and applied.json()["in_force"] is True
    after = send_routed(learned, HARD[:1])[0]
    assert after["route"] == "small"
    assert after["decisions"]["route"]["reasons"][-1].endswith(
        "threshold 0.000"
    )  # the log shows the new knob
    view = httpx.get(learned.url + "/admin/api/router", headers=ADMIN).json()
    assert (view["router"]["knob"], view["router"]["threshold"]) == ("router.threshold", 0.0)
    history = view["knob_history"]
    assert [h["setting"]["threshold"] for h in history] == [0.0, None] and history[0]["in_force"]
    back = httpx.post(
        learned.url + "/admin/api/router/rollback", json={"version_id": history[1]["id"]}, headers=ADMIN
    )
    assert back.status_code == 200 and back.json()["version"]["source"] == "rollback"
    again = send_routed(learned, HARD[:1])[0]
    assert again["route"] == "large"
    assert again["decisions"]["route"]["reasons"][-1].endswith(f"threshold {shipped.threshold:.3f}")


def test_a_strong_share_is_applied_as_the_threshold_that_sends_that_share_large(
    learned: RunningGateway,
) -> None:
    rows = send_routed(learned, EASY + HARD)
    applied = httpx.post(learned.url + "/admin/api/router/apply", json={"strong_share": 1.0}, headers=ADMIN)
    assert applied.status_code == 200, applied.text
    assert applied.json()["projection"]["candidate"]["large"] == len(rows)
    assert "= threshold" in applied.json()["version"]["note"]
    assert {r["route"] for r in send_routed(learned, EASY)} == {"large"}


def test_a_session_applies_rolls_back_and_swaps_only_with_its_csrf_token(learned: RunningGateway) -> None:
    send_routed(learned, EASY[:1])
    client = logged_in(learned)
    assert client.post("/admin/api/router/apply", json={"threshold": 0.2}).status_code == 403
    form = {"mode": "threshold", "value": "0.2", "n": "1000"}
    assert client.post("/admin/router/apply", data=form).status_code == 403
    assert client.post("/admin/router/apply", data={**form, "csrf": "forged"}).status_code == 403
    assert client.post("/admin/router/rollback/1").status_code == 403
    assert client.post("/admin/api/router/rollback", json={"version_id": 1}).status_code == 403
    assert client.post("/admin/router/versions/1/swap").status_code == 403
    assert client.post("/admin/api/router/versions/1/swap").status_code == 403
    assert learned.gateway.pipeline.policy.router.threshold is None  # nothing changed
    token = csrf_of(client)
    done = client.post("/admin/router/apply", data={**form, "csrf": token})
    assert done.status_code == 303 and "applied=" in done.headers["location"]
    assert learned.gateway.pipeline.policy.router.threshold == 0.2
    page = client.get(done.headers["location"]).text
    assert "Applied as policy version" in page and "threshold 0.2000" in page
    first = re.search(r'action="/admin/router/rollback/(\d+)"', page)
    assert first is not None
    back = client.post(f"/admin/router/rollback/{first.group(1)}", data={"csrf": token})
    assert back.status_code == 303 and learned.gateway.pipeline.policy.router.threshold is None


def publish_copy(gw: RunningGateway, shipped: LearnedRouter, version: str, threshold: float) -> int:
    copy = LearnedRouter.from_bytes(shipped.to_bytes())
    copy.threshold = threshold
    copy.metadata["version"] = version
    assert gw.gateway.engine is not None
    return artifacts.publish(
        gw.gateway.engine, "router", version, copy.to_bytes(), {"sources": [version]}, {}
    )


def test_swapping_to_a_published_version_puts_it_in_force_at_once(
    learned: RunningGateway, shipped: LearnedRouter
) -> None:
    strict = publish_copy(learned, shipped, "test-strict", 1.0)  # everything large
    lenient = publish_copy(learned, shipped, "test-lenient", 0.0)  # everything small
    assert learned.gateway.pipeline.models.router_row is None  # the watcher has not polled yet
    swapped = httpx.post(f"{learned.url}/admin/api/router/versions/{strict}/swap", headers=ADMIN)
    assert swapped.status_code == 200, swapped.text
    body = swapped.json()
    assert body["from_row"] == strict and body["row"] > lenient and body["in_force"] is True
    assert body["router_version"] == "test-strict"
    assert chat(learned, EASY[0]).headers["x-icgate-route"] == "large"
    versions = httpx.get(learned.url + "/admin/api/router", headers=ADMIN).json()["versions"]
    assert [(v["id"], v["version"], v["in_force"]) for v in versions] == [
        (body["row"], "test-strict", True),
        (lenient, "test-lenient", False),
        (strict, "test-strict", False),
    ]
    client = logged_in(learned)
    page = client.get("/admin/router").text
    assert f'action="/admin/router/versions/{lenient}/swap"' in page
    back = client.post(f"/admin/router/versions/{lenient}/swap", data={"csrf": csrf_of(client)})
    assert back.status_code == 303
    assert learned.gateway.pipeline.models.router_version == "test-lenient"
    assert chat(learned, HARD[0]).headers["x-icgate-route"] == "small"


def test_a_swap_is_refused_for_what_cannot_be_swapped_in(learned: RunningGateway) -> None:
    assert learned.gateway.engine is not None
    broken = artifacts.publish(learned.gateway.engine, "router", "garbage", b"not a router", {}, {})
    length = artifacts.publish(learned.gateway.engine, "length", "a-length-model", b"x", {}, {})
    version = learned.gateway.pipeline.models.router_version
    refused = httpx.post(f"{learned.url}/admin/api/router/versions/{broken}/swap", headers=ADMIN)
    assert refused.status_code == 400 and "does not load as a router" in refused.json()["error"]["message"]
    for row in (length, 9999):
        missing = httpx.post(f"{learned.url}/admin/api/router/versions/{row}/swap", headers=ADMIN)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert learned.gateway.pipeline.models.router_version == version
    assert artifacts.newest_id(learned.gateway.engine, "router") == broken  # nothing republished


def test_a_rule_router_has_no_knob_and_no_versions_to_swap(console: RunningGateway) -> None:
    body = httpx.get(console.url + "/admin/api/router", headers=ADMIN).json()
    assert body["router"]["kind"] == "rule" and "router.kind: rule" in body["router"]["swap_blocked"]
    assert projection(console).status_code == 409
    swap = httpx.post(console.url + "/admin/api/router/versions/1/swap", headers=ADMIN)
    assert swap.status_code == 409 and swap.json()["error"]["code"] == "swap_unavailable"
    page = logged_in(console).get("/admin/router")
    assert page.status_code == 200 and 'id="rule-note"' in page.text and 'id="knob-form"' not in page.text


def test_a_router_file_named_by_the_policy_cannot_be_swapped(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(learned_policy(standins, artifact=str(DEFAULT_ARTIFACT)))
    router = httpx.get(gw.url + "/admin/api/router", headers=ADMIN).json()["router"]
    assert router["source"] == f"the policy's file {DEFAULT_ARTIFACT}"
    swap = httpx.post(gw.url + "/admin/api/router/versions/1/swap", headers=ADMIN)
    assert swap.status_code == 409 and "router.artifact" in swap.json()["error"]["message"]


async def test_the_page_and_its_script_work_under_a_sub_path(
    standins: Standins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_embeddings: EmbeddingService
) -> None:
    """Behind a reverse proxy at /llm: the forms, the script's API address and the redirects carry it."""
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gateway = Gateway(learned_policy(standins), tmp_path, launch_local=False, embeddings=shared_embeddings)
    await gateway.start()
    try:
        transport = httpx.ASGITransport(create_app(gateway), root_path="/llm")
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            await client.post("/llm/admin/login", data={"key": ADMIN_KEY})
            page = (await client.get("/llm/admin/router")).text
            assert 'action="/llm/admin/router"' in page and 'action="/llm/admin/router/apply"' in page
            assert '"/llm/admin/api/router/projection"' in page
            token = re.search(r'name="csrf-token" content="([^"]+)"', page)
            assert token is not None
            form = {"csrf": token.group(1), "mode": "threshold", "value": "0.3"}
            applied = await client.post("/llm/admin/router/apply", data=form)
            assert applied.status_code == 303 and applied.headers["location"].startswith("/llm/admin/router?")
    finally:
        await gateway.stop()


# --- the store and the history, as plain functions --------------------------------------------------------


def log_row(i: int, route: str | None, score: float | None) -> dict[str, Any]:
    decisions: dict[str, Any] = (
        {"route": {"tier": route, "score": score, "reasons": []}} if route != "cache" else {}
    )
    return {
        "request_id": f"req-{i:04d}",
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "tenant_id": None,
        "api_key_id": None,
        "endpoint": "chat",
        "model_requested": "auto",
        "route": route,
        "backend": route,
        "fallback_from": None,
        "stream": False,
        "status_code": 200,
        "error_type": None,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "cost_usd": 0.001,
        "latency_ms": 1.0,
        "overhead_ms": 0.1,
        "queue_ms": 0.0,
        "decisions": decisions,
    }


def test_scored_routes_reads_the_newest_scored_rows_of_the_tiers_through_an_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    kinds = [("small", 0.9), ("large", 0.1), ("cache", None), ("small", None), ("medium", 0.5)]
    rows = [log_row(i, *kinds[i % len(kinds)]) for i in range(50)]
    with engine.begin() as conn:
        conn.execute(sa.insert(tables.RequestLog), rows)
    found = scored_routes(engine, ["small", "large"], 7)
    expected = [
        r["request_id"]
        for r in reversed(rows)
        if r["route"] in ("small", "large") and r["decisions"]["route"]["score"] is not None
    ]
    assert [f.request_id for f in found] == expected[:7]
    assert len(scored_routes(engine, ["small", "large"], 1000)) == len(expected) == 20
    assert (
        len(scored_routes(engine, ["small", "large"], 3, scan_limit=3)) < 3
    )  # an unscored row used the budget
    with engine.connect() as conn:
        compiled = routed_query("small", 10, 40).compile(engine, compile_kwargs={"literal_binds": True})
        plan = " ".join(str(r[-1]) for r in conn.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}")))
    assert "ix_request_log_route_id" in plan and "TEMP B-TREE" not in plan
    engine.dispose()


def version(i: int, text: str, source: str = "router-knob") -> PolicyVersion:
    return PolicyVersion(i, datetime(2026, 1, 1, tzinfo=UTC), "admin", source, "", text, "", "", [], [])


def test_the_knob_history_lists_each_change_of_the_knob() -> None:
    versions = [
        version(6, "router:\n  threshold: 0.3\ncache:\n  top_k: 4\n", "console"),
        version(5, "router:\n  threshold: 0.3\n"),
        version(4, "router:\n  strong_share: 0.2\n"),
        version(3, "router: [\n"),
        version(2, "router:\n  kind: learned\n", "file"),
        version(1, "router:\n  kind: learned\n", "file"),
    ]
    listed = knob_history(versions, in_force_id=6)
    assert [(h.version.id, h.setting, h.in_force) for h in listed] == [
        (5, Setting(threshold=0.3), True),  # version 6 left the knob alone
        (4, Setting(strong_share=0.2), False),
        (3, None, False),
        (1, Setting(), False),  # the oldest read; version 2 changed nothing of the knob
    ]
    assert [h.in_force for h in knob_history(versions, in_force_id=4)] == [False, True, False, False]
