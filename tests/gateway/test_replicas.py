"""Three `icgate serve` processes sharing one PostgreSQL database and the real Redis, as replicas behind a
load balancer: together they never send a backend more than its `max_concurrent`, a tenant's limit holds
for both together, an answer stored through one is an exact hit through the other, and a replica killed
while holding slots gives them back within its lease."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
import yaml

from bench.harness import free_port
from icgate.gateway.config import Policy
from icgate.gateway.store import keys
from icgate.gateway.store.db import make_engine, normalize_url, upgrade
from tests.conftest import POSTGRES_ADMIN_URL
from tests.gateway.conftest import PREPARED_MODELS, RunningGateway, Standins, standin_policy

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@dataclass
class Cluster:
    replicas: list[Replica]
    database_url: str
    prefix: str


def start_replica(policy: Path, folder: Path, env: dict[str, str]) -> Replica:
    folder.mkdir(parents=True)
    if PREPARED_MODELS.is_dir():  # share the exported graphs instead of exporting them again
        (folder / "models").symlink_to(PREPARED_MODELS)
    port = free_port()
    log = folder / "serve.log"
    cmd = [sys.executable, "-m", "icgate.gateway.cli.main", "serve", "--policy", str(policy)]
    cmd += ["--port", str(port), "--data-dir", str(folder), "--no-launch"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Replica(proc, f"http://127.0.0.1:{port}", log)


def wait_ready(replica: Replica) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert replica.proc.poll() is None, replica.log.read_text()[-3000:]
        try:
            if httpx.get(replica.url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, replica.log.read_text()[-3000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(
    standin_servers: Standins, postgres_admin: sa.Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    name = f"icgate_test_{secrets.token_hex(6)}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    database_url = normalize_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(database_url)
    prefix = f"icgate-test-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("replicas")
    policy = {
        "backends": [
            {"name": "small", "tier": "small", "model": "openai/small-model", "client": "http",
             "api_base": standin_servers.small_url + "/v1", "max_concurrent": 2,
             "cost_per_1k_input": 1000.0},  # a few dollars a request: budgets run out fast
            {"name": "large", "tier": "large", "model": "openai/large-model", "client": "http",
             "api_base": standin_servers.large_url + "/v1"},
        ],
        "router": {"kind": "rule", "large_if_prompt_tokens_over": 200},
        "cache": {"semantic": False, "examples": False},
        "admission": {"ttft_slo_ms": 1500, "tenants": {"acme": {"requests_per_min": 3},
                                                        "beta": {"budget_usd": 8.0}}},
        "shared_state": {"key_prefix": prefix, "lease_s": 1.0},
    }  # fmt: skip
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    env = {**os.environ, "ICGATE_DATABASE_URL": database_url, "ICGATE_REDIS_URL": REDIS_URL}
    replicas = [start_replica(path, folder / f"r{i}", env) for i in range(3)]
    try:
        for replica in replicas:
            wait_ready(replica)
        yield Cluster(replicas, database_url, prefix)
    finally:
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        for replica in replicas:
            try:
                replica.proc.wait(30)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
        with postgres_admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def chat(url: str, content: str, key: str | None = None, **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_a_flood_on_all_never_exceeds_the_backends_slots(cluster: Cluster, standin_servers: Standins) -> None:
    small = standin_servers.small
    small.delay_s, small.peak_in_flight = 0.3, 0
    urls = [r.url for r in cluster.replicas]
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: chat(urls[i % 3], f"flood question {i}"), range(36)))
    finally:
        small.delay_s = 0.0
    statuses = [a.status_code for a in answers]
    assert small.peak_in_flight == 2  # all replicas together: never more than max_concurrent
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 4
    refused = [a for a in answers if a.status_code == 429]
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)


def key_for(cluster: Cluster, tenant: str) -> str:
    engine = make_engine(cluster.database_url)
    try:
        return keys.create_key(engine, tenant).key
    finally:
        engine.dispose()


def test_a_tenants_limit_holds_for_all_replicas_together(cluster: Cluster) -> None:
    key = key_for(cluster, "acme")
    urls = [r.url for r in cluster.replicas]
    statuses = [chat(urls[i % 3], f"acme question {i}", key).status_code for i in range(8)]
    assert statuses.count(200) == 3 and statuses.count(429) == 5  # 3 a minute in all, not per replica


def test_a_tenants_budget_is_charged_once_for_all_replicas(cluster: Cluster) -> None:
    key = key_for(cluster, "beta")
    ledger = redis.Redis.from_url(REDIS_URL)
    month = datetime.now(UTC).date().replace(day=1).isoformat()
    ledger_key = f"{cluster.prefix}:spend:beta:month:{month}"
    statuses = []
    for i in range(5):  # A, B, C, A, B; each answer costs $3 (three prompt words at $1 a word)
        statuses.append(chat(cluster.replicas[i % 3].url, f"beta question {i}", key).status_code)
        deadline = time.monotonic() + 5  # the charge is written after the answer
        while statuses[-1] == 200 and float(ledger.get(ledger_key) or 0) < 3.0 * statuses.count(200):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    ledger.close()
    # $8 of budget: spent $9 after three answers, so the fourth and fifth are refused, whichever
    # replica they land on (each replica alone has seen at most $3 of it)
    assert statuses == [200, 200, 200, 429, 429]


def test_an_answer_stored_through_one_replica_is_an_exact_hit_through_the_other(cluster: Cluster) -> None:
    one, two, _ = cluster.replicas
    question = f"What is the boiling point of water? ({uuid.uuid4().hex[:6]})"
    first = chat(one.url, question)
    assert first.status_code == 200 and first.headers["x-icgate-route"] != "cache"
    deadline = time.monotonic() + 3  # the contract: within 3 s
    while True:
        again = chat(two.url, question)
        if again.headers["x-icgate-route"] == "cache":  # semantic hits are off: an exact one
            break
        assert time.monotonic() < deadline, dict(again.headers)
        time.sleep(0.1)
    assert (
        again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    )


def test_a_killed_replicas_slots_come_back_within_its_lease(
    cluster: Cluster, standin_servers: Standins
) -> None:
    one, two, _ = cluster.replicas
    small = standin_servers.small
    small.delay_s = 30.0  # the two calls through `one` hold both slots
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(chat, one.url, f"held {i}") for i in range(2)]
        deadline = time.monotonic() + 10
        while small.in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        one.proc.send_signal(signal.SIGKILL)
        one.proc.wait(10)
        small.delay_s = 0.0
        killed = time.monotonic()
        # Until the dead replica's leases run out the backend is full, and a request that cannot start
        # within its 1.5 s objective is rightly refused (429); one is served once the slots are back.
        statuses: list[int] = []
        while not statuses or statuses[-1] == 429:
            answer = chat(two.url, "after the kill")
            statuses.append(answer.status_code)
        waited = time.monotonic() - killed
        for future in held:
            future.exception()  # the killed replica's clients saw their connection drop
    assert answer.status_code == 200, (statuses, answer.text)
    assert waited < 1.0 + 1.5  # the lease (1 s), plus the request's own wait for the freed slot


def test_with_redis_away_each_replica_counts_alone_and_says_so(
    standins: Standins, start_gateway: Callable[[Policy], RunningGateway]
) -> None:
    policy = standin_policy(
        standins,
        "http",
        shared_state={"redis_url": "redis://127.0.0.1:1/0"},  # nothing listens there
        admission={"tenants": {"*": {"requests_per_min": 2}}},
    )
    gw = start_gateway(policy)
    started = time.monotonic()
    statuses = [chat(gw.url, f"question {i}").status_code for i in range(3)]
    assert statuses == [200, 200, 429]  # the limit still holds, counted by this replica
    assert time.monotonic() - started < 5  # a dead Redis is not waited for on every request
    metrics = httpx.get(gw.url + "/metrics").text
    assert re.search(r'icgate_shared_state_fallbacks_total\{what="slots"\} [1-9]', metrics)
    assert re.search(r'icgate_shared_state_fallbacks_total\{what="limits"\} [1-9]', metrics)


def test_a_key_revoked_from_the_command_line_is_refused_at_once_by_a_replica_sharing_redis(
    standins: Standins, start_gateway: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    from icgate.gateway.cli.main import main

    prefix = f"icgate-test-{uuid.uuid4().hex[:8]}"
    database = f"sqlite:///{tmp_path / 'shared.db'}"
    policy = standin_policy(
        standins,
        "http",
        auth={"required": True},
        database={"url": database},
        shared_state={"redis_url": REDIS_URL, "key_prefix": prefix},
    )
    gw = start_gateway(policy)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json", exclude_defaults=True)))
    assert gw.gateway.engine is not None
    created = keys.create_key(gw.gateway.engine, "acme")
    assert chat(gw.url, "hello", created.key).status_code == 200  # the key is now in the key cache (5 s)
    revoked_at = time.monotonic()
    assert (
        main(["keys", "revoke", str(created.key_id), "--policy", str(path), "--data-dir", str(tmp_path)]) == 0
    )
    while chat(gw.url, "hello again", created.key).status_code != 401:
        # the key cache would keep it 5 s; the message through Redis drops it at once
        assert time.monotonic() - revoked_at < 3.0
        time.sleep(0.05)


def test_redis_down_and_back_the_replica_counts_alone_then_shares_again(
    standins: Standins, start_gateway: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    port = free_port()
    redis_cmd = [
        "redis-server",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp_path),
    ]

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def fallbacks(gw: RunningGateway) -> float:
        found = re.search(
            r'icgate_shared_state_fallbacks_total\{what="slots"\} (\S+)', httpx.get(gw.url + "/metrics").text
        )
        return float(found.group(1)) if found else 0.0

    server = start_redis()
    try:
        policy = standin_policy(
            standins,
            "http",
            shared_state={"redis_url": f"redis://127.0.0.1:{port}/0", "key_prefix": "icgate-back"},
            admission={"tenants": {"*": {"requests_per_min": 1000}}},
        )
        gw = start_gateway(policy)
        assert chat(gw.url, "while Redis is up").status_code == 200 and fallbacks(gw) == 0
        server.kill()
        server.wait(10)
        assert [chat(gw.url, f"while Redis is down {i}").status_code for i in range(3)] == [200] * 3
        assert fallbacks(gw) >= 1  # counted by this replica alone, and said so
        server = start_redis()  # back, empty: the replica asks it again after its 5 s pause
        # The slots and the rate limiter each pause on their own after a failure, so either may come
        # back first: wait for both, a request at a time.
        deadline = time.monotonic() + 15
        while True:
            before = fallbacks(gw)
            assert chat(gw.url, "after Redis is back").status_code == 200
            slots_shared = fallbacks(gw) == before  # this request took its slot from Redis again
            window_shared = any(redis.Redis(port=port).scan_iter("icgate-back:limits*"))  # the RPM window
            if slots_shared and window_shared:
                break
            assert time.monotonic() < deadline, f"never shared (slots {slots_shared}, window {window_shared})"
            time.sleep(0.5)
    finally:
        server.kill()
        server.wait(10)
