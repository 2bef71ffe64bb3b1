"""Per-backend length learning in a real gateway: two stand-in backends answer the same prompts at
systematically different lengths; the refit publishes each backend's own predictor, the gateway swaps it
in, and admission then holds each backend's requests at that backend's predicted size. Two gateways on
one database: only one refits."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa

from bench.harness import ServerThread
from bench.standin_backend import StandinBackend
from icgate.gateway.config import Policy
from icgate.gateway.store import leases
from icgate.gateway.store.length_learning import RefitReport
from tests.gateway.conftest import RunningGateway

T = TypeVar("T")
TOPICS = [
    "tides", "volcanoes", "bread", "bees", "glaciers", "comets", "coral", "rivers", "deserts", "owls",
    "clocks", "bridges", "vaccines", "printing", "sailing", "chess", "silk", "salt", "maps", "ink",
]  # fmt: skip


def essay(topic: str) -> str:
    return f"Write a detailed, thorough essay about the history of {topic}, with examples."


def question(topic: str) -> str:
    return f"In one word: is {topic} a noun?"


class LengthStandin(StandinBackend):
    """Answers an essay request with about 60 words and a one-word question with about 6, times `scale`
    (a word is a token here), cut at the request's max_tokens as a real server would."""

    def __init__(self, name: str, scale: float) -> None:
        super().__init__(name)
        self.scale = scale

    def _answer(self, prompt: str, body: dict[str, Any]) -> str:
        jitter = 0.8 + 0.4 * (int(hashlib.sha1(prompt.encode()).hexdigest()[:4], 16) / 0xFFFF)
        words = round(self.scale * (60 if prompt.startswith("Write") else 6) * jitter)
        limit = body.get("max_tokens")
        return " ".join(["word"] * (min(words, int(limit)) if limit else words))


@pytest.fixture(scope="module")
def length_standins() -> Iterator[dict[str, str]]:
    terse, chatty = LengthStandin("terse-model", 1.0), LengthStandin("chatty-model", 4.0)
    servers = [ServerThread(terse.app).start(), ServerThread(chatty.app).start()]
    yield {"terse": servers[0].url, "chatty": servers[1].url}
    for server in servers:
        server.stop()


def policy_for(urls: dict[str, str], database: Path, **lengths: Any) -> Policy:
    return Policy.model_validate(
        {
            "backends": [
                {"name": name, "tier": tier, "model": f"openai/{name}-model", "api_base": urls[name] + "/v1"}
                for name, tier in (("terse", "small"), ("chatty", "large"))
            ],
            "auth": {"required": False},
            "database": {"url": f"sqlite:///{database}"},
            "router": {"kind": "rule"},
            # Named requests embedded as routed ones are (so their samples carry the embedding), and
            # nothing stored or served from the cache: every request reaches its backend.
            "cache": {"named_backends": "full", "store": False, "exact": False},
            "lengths": {"min_rows": 40, "min_new_rows": 10, "refit_interval_s": 3600, **lengths},
        }
    )


def on_loop(gw: RunningGateway, coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the gateway's own loop (where its refit and watchers run)."""
    learning = gw.gateway.length_learning
    assert learning is not None and learning._task is not None
    return asyncio.run_coroutine_threadsafe(coro, learning._task.get_loop()).result(60)


def ask(gw: RunningGateway, backend: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": backend, "messages": [{"role": "user", "content": prompt}], **extra}
    response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


def held_output_tokens(gw: RunningGateway, backend: str, prompt: str) -> int:
    """The predicted output admission holds a request to `backend` at, read while the request is in
    flight (the stand-in answers after a pause)."""
    done = threading.Event()

    def slow() -> None:
        ask(gw, backend, prompt, x_standin={"delay_ms": 3000})
        done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        state = gw.gateway.admission.states[backend]
        for _ in range(200):
            jobs = list(state.jobs)
            if jobs:
                return jobs[0].ask.output_tokens
            done.wait(0.02)
        raise AssertionError(f"no request in flight on {backend}")
    finally:
        thread.join()


def lengths_metric(gw: RunningGateway) -> dict[str, tuple[str, int]]:
    """`icgate_length_model_answers` from /metrics: per backend, (version in force, answers fitted on)."""
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    line = r'^icgate_length_model_answers\{backend="([^"]+)",version="([^"]+)"\} (\S+)$'
    found = re.findall(line, text, re.M)
    return {backend: (version, int(float(answers))) for backend, version, answers in found}


def test_each_backend_gets_its_own_predictor_and_admission_sizes_its_requests_with_it(
    length_standins: dict[str, str], start_gateway: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = start_gateway(policy_for(length_standins, tmp_path / "one.db"))
    before = {b: held_output_tokens(gw, b, essay("lighthouses")) for b in ("terse", "chatty")}
    assert before["terse"] == before["chatty"]  # the shared predictor sizes both alike
    shared = gw.gateway.pipeline.models.length_version
    assert lengths_metric(gw) == {"terse": (shared, 0), "chatty": (shared, 0)}

    for i, topic in enumerate(TOPICS * 2):
        capped = {"max_tokens": 100} if i % 3 == 0 else {}  # a third are cut at 100 tokens (chatty's essays)
        for backend in ("terse", "chatty"):
            ask(gw, backend, essay(topic) if i % 2 else question(topic), **capped)
    writer = gw.gateway.length_writer
    assert writer is not None and gw.gateway.length_learning is not None
    on_loop(gw, writer.flush(timeout_s=10))
    report: RefitReport = on_loop(gw, gw.gateway.length_learning.refit())
    assert report.ran and sorted(b.backend for b in report.published()) == ["chatty", "terse"]

    in_force = gw.gateway.pipeline.models.backend_lengths  # swapped in by the refit, no restart
    assert sorted(in_force) == ["chatty", "terse"]
    assert all(b.answers == 41 for b in in_force.values())  # 40 answers, and the one sized above
    after = {b: held_output_tokens(gw, b, essay("lighthouses")) for b in ("terse", "chatty")}
    short = {b: held_output_tokens(gw, b, question("lighthouses")) for b in ("terse", "chatty")}
    assert after["chatty"] > 2 * after["terse"]  # the chatty backend's requests are held as longer
    assert after["terse"] > 2 * short["terse"] and after["chatty"] > 2 * short["chatty"]
    # Chatty's essays (about 240 tokens) were cut at 100 a third of the time: read as lower bounds, they
    # do not drag its prediction down to the cap.
    assert after["chatty"] > 150
    # Which predictor is in force, on /metrics; and the size admission used, in the answer's header.
    assert lengths_metric(gw) == {b: (in_force[b].version, 41) for b in ("terse", "chatty")}
    assert {in_force[b].version for b in in_force} & {shared} == set()
    for backend in ("terse", "chatty"):
        served = ask(gw, backend, essay("lighthouses"))
        assert int(served.headers["x-icgate-predicted-tokens"]) == after[backend]


def test_two_gateways_on_one_database_refit_one_at_a_time(
    length_standins: dict[str, str], start_gateway: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    policy = policy_for(length_standins, tmp_path / "shared.db")
    gateways = [start_gateway(policy), start_gateway(policy)]
    reports: list[RefitReport] = []
    start = threading.Barrier(2)

    def refit(gw: RunningGateway) -> None:
        learning = gw.gateway.length_learning
        assert learning is not None
        start.wait()
        reports.append(on_loop(gw, learning.refit()))

    threads = [threading.Thread(target=refit, args=(gw,)) for gw in gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.ran for r in reports) == [False, True]
    ran = next(r for r in reports if r.ran)
    assert {b.outcome for b in ran.backends} == {"too few answers"}


ADMIN_KEY = "admin-key-for-length-tests"


def admin(gw: RunningGateway, method: str, path: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, f"{gw.url}/admin/api{path}", headers=headers, timeout=60)


@pytest.fixture
def admin_gateway(
    length_standins: dict[str, str],
    start_gateway: Callable[..., RunningGateway],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., RunningGateway]:
    """Starts a gateway on the length stand-ins, with its own database and the admin key set."""
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)

    def start(database: str, **lengths: Any) -> RunningGateway:
        return start_gateway(policy_for(length_standins, tmp_path / database, **lengths))

    return start


def test_an_operator_refits_now_through_the_admin_api_though_the_schedule_holds_the_lease(
    admin_gateway: Callable[..., RunningGateway],
) -> None:
    gw = admin_gateway("asked.db")
    learning, writer = gw.gateway.length_learning, gw.gateway.length_writer
    assert learning is not None and writer is not None
    assert on_loop(gw, learning.refit()).ran  # the schedule's refit: nothing to fit, the lease held an hour
    shared = gw.gateway.pipeline.models.length_version
    state = admin(gw, "GET", "/lengths").json()
    assert state["backends"] == [
        {"backend": "terse", "version": shared, "fitted_answers": 0, "kept_answers": 0},
        {"backend": "chatty", "version": shared, "fitted_answers": 0, "kept_answers": 0},
    ]
    assert state["last_refit"]["ran"] and not state["last_refit"]["asked"]

    for i, topic in enumerate(TOPICS * 2):
        ask(gw, "terse", essay(topic) if i % 2 else question(topic))
    on_loop(gw, writer.flush(timeout_s=10))
    assert not on_loop(gw, learning.refit()).ran  # the schedule waits out its lease
    assert httpx.post(gw.url + "/admin/api/lengths/refit", timeout=10).status_code == 401

    asked = admin(gw, "POST", "/lengths/refit")
    assert asked.status_code == 200, asked.text
    report = asked.json()
    assert report["ran"] and report["asked"]
    outcomes = {b["backend"]: b for b in report["backends"]}
    assert (outcomes["terse"]["outcome"], outcomes["terse"]["answers"]) == ("published", 40)
    assert outcomes["chatty"]["outcome"] == "too few answers"
    state = admin(gw, "GET", "/lengths").json()
    assert state["backends"] == [
        {
            "backend": "terse",
            "version": outcomes["terse"]["version"],
            "fitted_answers": 40,
            "kept_answers": 40,
        },
        {"backend": "chatty", "version": shared, "fitted_answers": 0, "kept_answers": 0},
    ]
    assert state["last_refit"] == report
    assert lengths_metric(gw)["terse"] == (outcomes["terse"]["version"], 40)  # in force, no restart


def test_asking_for_a_refit_with_learning_off_is_a_clear_409(
    admin_gateway: Callable[..., RunningGateway],
) -> None:
    gw = admin_gateway("off.db", learn=False)
    refused = admin(gw, "POST", "/lengths/refit")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "length_learning_off"
    state = admin(gw, "GET", "/lengths").json()
    assert not state["learn"] and state["last_refit"] is None


def test_a_refit_asked_for_while_the_database_is_away_is_a_clean_503(
    admin_gateway: Callable[..., RunningGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = admin_gateway("away.db")

    def away(*_args: object) -> None:
        raise sa.exc.OperationalError("UPDATE leases", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(leases, "seize", away)
    refused = admin(gw, "POST", "/lengths/refit")
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["type"] == "server_error" and "did not run" in error["message"]
    assert "Traceback" not in refused.text and "UPDATE" not in refused.text
