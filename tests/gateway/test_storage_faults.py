"""Storage faults provoked for real on loopback, through a real gateway.

- PostgreSQL restarted under load: a private server (initdb and pg_ctl as user postgres, in a temp dir, on
  a free port; the shared one on 5432 is never touched) is stopped and started again while clients send
  requests; every answered request keeps its log row, every answer stored during the outage lands, no
  client sees a 5xx, nothing is dropped, and a key never seen before gets a 503 with Retry-After.
- The write-behind queue full while PostgreSQL is down: requests are answered, what is dropped is counted
  (metric and one log line), and everything not counted lands once it is back.
- SQLite on a real ext4 filesystem (a loop device): full (a filler file takes every block) or read-only (a
  read-only mount; while serving, the kernel's own remount-read-only on a filesystem error): at start a
  one-line error and a non-zero exit, while serving a metric and a log line and answers as usual.

Everything here needs root (mount, losetup, runuser): elsewhere it is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from bench.harness import free_port
from icgate.gateway.errors import GatewayError
from icgate.gateway.store import keys, tables
from icgate.gateway.store.db import make_engine, upgrade
from icgate.gateway.store.keys import KeyAuthenticator
from icgate.gateway.telemetry import Metrics
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

REPO = Path(__file__).resolve().parents[2]
PG_CTLS = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
WRITE_BEHIND_LOG = "icgate.gateway.store.write_behind"

StartGateway = Callable[..., RunningGateway]


def need_root(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount, losetup, runuser)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


# --- a private PostgreSQL --------------------------------------------------------------------------------


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of this module's own: restarting it disturbs nobody."""

    bin: Path
    root: Path  # owned by postgres: the data directory, the socket and the server's log
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.root / "data")]
        subprocess.run([*cmd, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-l", str(self.root / "server.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")  # clients are disconnected, open transactions rolled back

    def new_database(self) -> str:
        """A database of its own for one test, migrated to head."""
        name = f"icgate_{secrets.token_hex(4)}"
        admin = make_engine(self.url("postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        upgrade(self.url(name))
        return self.url(name)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    need_root("runuser")
    if not PG_CTLS:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    bin_dir = PG_CTLS[-1].parent
    root = Path(tempfile.mkdtemp(prefix="icgate-pg-"))
    shutil.chown(root, "postgres")
    initdb = [str(bin_dir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "--no-sync"]
    subprocess.run(["runuser", "-u", "postgres", "--", *initdb], check=True, capture_output=True, timeout=120)
    pg = PrivatePostgres(bin_dir, root, free_port())
    pg.start()
    try:
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already down
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- a real ext4 filesystem ----------------------------------------------------------------------------


@dataclass
class Volume:
    """A small ext4 filesystem on a loop device, mounted with errors=remount-ro and no blocks reserved
    for root (we run as root: a reserve would hide a full disk)."""

    image: Path
    path: Path

    def fill(self) -> None:
        """A filler file takes every free block: the next block anyone needs is refused (ENOSPC)."""
        with (self.path / "filler").open("wb", buffering=0) as out:
            for size in (1 << 20, 4096, 512):
                try:
                    while True:
                        out.write(b"\0" * size)
                except OSError:
                    pass
            with contextlib.suppress(OSError):
                os.fsync(out.fileno())

    def free(self) -> None:
        (self.path / "filler").unlink()

    def remount_read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def fail_to_read_only(self) -> None:
        """What the kernel does on a filesystem error under errors=remount-ro: the filesystem turns
        read-only under its open files, whose next write fails with EROFS (ext4's own test hook)."""
        source = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(self.path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(source).name}/trigger_fs_error").write_text("1")


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    need_root("mount", "umount", "mkfs.ext4", "findmnt")
    image, path = tmp_path / "ext4.img", tmp_path / "mnt"
    path.mkdir()
    with image.open("wb") as f:
        f.truncate(24 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
    mounted = subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    try:
        yield Volume(image, path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- helpers ---------------------------------------------------------------------------------------------


def chat(client: httpx.Client, url: str, content: str, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    return client.post(url + "/v1/chat/completions", json=body, headers=headers)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def dropped_total(metrics: Metrics) -> float:
    return sum(
        s.value
        for family in metrics.registry.collect()
        if family.name == "icgate_storage_dropped"
        for s in family.samples
        if s.name == "icgate_storage_dropped_total"
    )


def logged_ids(engine: sa.Engine, request_ids: list[str]) -> Counter[str]:
    """How many request-log rows each of `request_ids` has."""
    table = tables.RequestLog
    found: Counter[str] = Counter()
    with engine.connect() as conn:
        for first in range(0, len(request_ids), 500):
            part = request_ids[first : first + 500]
            found.update(conn.scalars(sa.select(table.request_id).where(table.request_id.in_(part))))
    return found


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Answer:
    prompt: str
    sent: float
    done: float
    status: int
    request_id: str | None
    route: str | None


def keep_asking(
    url: str, key: str, worker: int, repeats: list[str], stop: threading.Event, out: list[Answer]
) -> None:
    """One client: new questions (each answered by a backend, then stored), and every third request a
    question answered before (an exact cache hit, from memory)."""
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            prompt = (
                repeats[i % len(repeats)]
                if i % 3 == 2
                else f"restart question from client {worker} number {i}"
            )
            sent = time.monotonic()
            try:
                r = chat(client, url, prompt, key)
            except httpx.HTTPError:
                out.append(Answer(prompt, sent, time.monotonic(), 0, None, None))
            else:
                headers = r.headers
                answer = Answer(
                    prompt, sent, time.monotonic(), r.status_code, None, headers.get("x-icgate-route")
                )
                answer.request_id = headers.get("x-icgate-request-id")
                out.append(answer)
            i += 1


# --- PostgreSQL ------------------------------------------------------------------------------------------


def test_postgres_restarted_under_load_loses_nothing_acknowledged(
    private_postgres: PrivatePostgres,
    standins: Standins,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg = private_postgres
    url = pg.new_database()
    engine = make_engine(url)
    key = keys.create_key(engine, "acme").key
    newcomer = keys.create_key(engine, "acme").key  # valid, but never presented before the outage
    policy = standin_policy(
        standins,
        "http",
        database={"url": url},
        auth={"required": True},
        cache={"semantic": False, "examples": False},
        server={"graceful_shutdown_s": 5.0},
    )
    gw = start_gateway(policy)
    gateway, metrics = gw.gateway, gw.gateway.telemetry.metrics
    warm = [f"restart warm-up question {i}" for i in range(3)]
    with httpx.Client(timeout=30) as client:
        for question in warm:
            assert chat(client, gw.url, question, key).status_code == 200

        def all_stored() -> bool:
            return all(chat(client, gw.url, q, key).headers["x-icgate-route"] == "cache" for q in warm)

        wait_for(all_stored, 10, "the warm-up answers to be stored")

    answers: list[Answer] = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=keep_asking, args=(gw.url, key, w, warm, stop, answers)) for w in range(3)
    ]
    caplog.set_level(logging.WARNING, logger=WRITE_BEHIND_LOG)
    try:
        for t in clients:
            t.start()
        time.sleep(1.0)
        pg.stop()
        down_at = time.monotonic()
        time.sleep(0.5)
        with httpx.Client(timeout=30) as client:
            refused = chat(client, gw.url, "a newcomer's question", newcomer)
        time.sleep(2.5)
        up_at = time.monotonic()
        pg.start()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in clients:
            t.join(60)

    # What the clients saw: every request answered, none with a 5xx; the key never seen gets a 503.
    assert Counter(a.status for a in answers) == {200: len(answers)}, Counter(a.status for a in answers)
    during = [a for a in answers if a.sent > down_at and a.done < up_at]
    assert len(during) >= 10, "the outage was not under load"
    assert {"cache", "small"} <= {a.route for a in during}  # from memory and from a backend alike
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "database_unavailable"
    with httpx.Client(timeout=30) as client:
        assert chat(client, gw.url, "a newcomer's question", newcomer).status_code == 200  # the DB is back

    # What the database holds once it is back: every answered request's row, once.
    ids = [a.request_id for a in answers if a.request_id]
    assert len(ids) == len(answers)
    wait_for(lambda: len(logged_ids(engine, ids)) == len(ids), 30, "every answered request's log row")
    assert logged_ids(engine, ids) == Counter(dict.fromkeys(ids, 1))
    # And every answer queued for the cache, once (an answer is not queued when the embedder is too busy
    # to embed it after the response: a store is the first thing shed), those given during the outage too;
    # memory serves exactly what the database holds.
    cache = gateway.cache_entries
    assert cache is not None
    wait_for(lambda: not cache._inserts and cache._writes.pending == 0, 30, "the cache's inserts")
    table = tables.CacheEntryRow
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.id, table.prompt_text).where(table.deleted_at.is_(None))).all()
    stored = Counter(prompt for _, prompt in rows)
    assert (len(rows), cache._writes.dropped) == (cache._writes.written, 0)
    assert set(stored.values()) == {1}
    asked = {a.prompt for a in answers if a.route != "cache"} | {*warm, "a newcomer's question"}
    assert set(stored) <= asked
    assert set(stored) & {a.prompt for a in during if a.route != "cache"}
    assert set(cache.store.entries) == {entry_id for entry_id, _ in rows}

    # The outage was seen and waited out, nothing dropped, and said so in the log.
    assert metric(metrics, "icgate_storage_errors_total", what="request_log", kind="unavailable") > 0
    assert dropped_total(metrics) == 0
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == WRITE_BEHIND_LOG)

    # Nothing leaked: nothing pending, and no connection left once the gateway is stopped.
    gw.stop()
    assert gateway.log_writer is not None and gateway.log_writer.pending == 0
    assert not cache._inserts and not cache._pending and cache._writes.pending == 0
    with engine.connect() as conn:
        others = conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    engine.dispose()
    assert others == 0


def test_a_full_queue_while_postgres_is_down_drops_counted_and_never_fails_a_request(
    private_postgres: PrivatePostgres,
    standins: Standins,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg = private_postgres
    url = pg.new_database()
    engine = make_engine(url)
    policy = standin_policy(
        standins,
        "http",
        database={"url": url},
        request_log={"queue_size": 3, "batch_size": 1, "flush_interval_s": 0.01},
        server={"graceful_shutdown_s": 5.0},
    )
    gw = start_gateway(policy)
    metrics = gw.gateway.telemetry.metrics
    caplog.set_level(logging.WARNING, logger=WRITE_BEHIND_LOG)
    with httpx.Client(timeout=30) as client:
        pg.stop()
        try:
            answers = [chat(client, gw.url, f"asked while the database is away {i}") for i in range(20)]
            # Feedback needs the database (it labels the request's route sample): a 503, not a hang.
            rated = {"request_id": answers[0].headers["x-icgate-request-id"], "score": 1.0}
            feedback = client.post(gw.url + "/v1/feedback", json=rated)
        finally:
            pg.start()
    assert [r.status_code for r in answers] == [200] * 20
    assert (feedback.status_code, feedback.headers["retry-after"]) == (503, "2")
    assert feedback.json()["error"]["code"] == "database_unavailable"
    ids = [r.headers["x-icgate-request-id"] for r in answers]
    writer = gw.gateway.log_writer
    assert writer is not None
    wait_for(lambda: writer.pending == 0, 30, "the request log to catch up")
    landed = logged_ids(engine, ids)
    dropped = metric(metrics, "icgate_storage_dropped_total", what="request_log")
    # The writer held one record (batch_size 1) and the queue three: the other sixteen were dropped,
    # counted, and said so in one log line; every answered request is either in the log or counted.
    assert (len(landed), dropped) == (4, 16)
    assert metric(metrics, "icgate_request_log_dropped_total") == 16
    assert set(landed) == set(ids[:4]) and all(n == 1 for n in landed.values())
    full = [
        r for r in caplog.records if r.name == WRITE_BEHIND_LOG and "request log queue full" in r.getMessage()
    ]
    assert len(full) == 1 and "while the database is not answering" in full[0].getMessage()
    engine.dispose()


async def test_known_keys_stay_valid_while_postgres_is_down_and_unseen_ones_get_a_503(
    private_postgres: PrivatePostgres,
) -> None:
    pg = private_postgres
    engine = make_engine(await asyncio.to_thread(pg.new_database))
    known, unseen = keys.create_key(engine, "acme"), keys.create_key(engine, "beta")
    auth = KeyAuthenticator(engine, ttl_s=0.01, negative_ttl_s=0.01, down_pause_s=0.05)
    tenant = await auth.authenticate(known.key)
    assert tenant is not None and tenant.name == "acme"
    await asyncio.sleep(0.05)  # its cached answer has expired: the next one needs the database
    await asyncio.to_thread(pg.stop)
    try:
        assert await auth.authenticate(known.key) == tenant  # confirmed recently: still valid
        for key in (unseen.key, "icg-" + "x" * 43):  # whose key is it? nobody can tell now
            with pytest.raises(GatewayError) as refused:
                await auth.authenticate(key)
            assert refused.value.status_code == 503 and refused.value.headers == {"retry-after": "2"}
            assert refused.value.body()["error"]["code"] == "database_unavailable"
        assert await auth.authenticate("not-a-key") is None  # no database needed to refuse this one
    finally:
        await asyncio.to_thread(pg.start)
    await asyncio.sleep(0.06)  # past the pause after a failed lookup
    later = await auth.authenticate(unseen.key)
    assert later is not None and later.name == "beta"
    engine.dispose()


# --- SQLite ----------------------------------------------------------------------------------------------


def write_policy(folder: Path) -> Path:
    policy = {
        "backends": [
            {
                "name": "small",
                "tier": "small",
                "model": "openai/small-model",
                "api_base": "http://127.0.0.1:9/v1",
            }
        ],
        "tiers": ["small"],
        "cache": {"enabled": False},
        "embedding": {"preload": False},
        "router": {"kind": "rule"},
    }
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_sqlite_that_cannot_be_written_stops_icgate_serve_with_one_clear_line(
    fault: str, volume: Volume, tmp_path: Path
) -> None:
    data = volume.path / "data"
    upgrade(f"sqlite:///{data / 'icgate.db'}")  # a database that worked yesterday
    if fault == "full":
        volume.fill()
    else:
        volume.remount_read_only()
    env = {k: v for k, v in os.environ.items() if k != "ICGATE_DATABASE_URL"}
    cmd = [sys.executable, "-m", "icgate.gateway.cli.main", "serve", "--policy", str(write_policy(tmp_path))]
    cmd += ["--data-dir", str(data), "--port", str(free_port()), "--no-launch"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    # One line says what is wrong (what precedes it is INFO logging of the imports).
    said = [line for line in lines if line.startswith("icgate serve:")]
    assert said == lines[-1:] and said[0].startswith(f"icgate serve: the database {data / 'icgate.db'}")
    assert not [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    expected = "the disk is full" if fault == "full" else "mounted read-only"
    assert expected in said[0], said[0]
    if fault == "full":
        volume.free()


def test_sqlite_full_then_read_only_while_serving_keeps_answering(
    volume: Volume, standins: Standins, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    data = volume.path / "gw"
    policy = standin_policy(
        standins,
        "http",
        request_log={"flush_interval_s": 0.01},
        router={"kind": "rule", "large_if_prompt_tokens_over": 200},
        server={"graceful_shutdown_s": 0.5},
    )
    gw = start_gateway(policy, data_dir=data)
    metrics, writer = gw.gateway.telemetry.metrics, gw.gateway.log_writer
    assert writer is not None
    # A reader opened before the faults: it still reads once the filesystem is read-only.
    reader = sa.create_engine(f"sqlite:///{data / 'icgate.db'}", poolclass=sa.StaticPool)
    caplog.set_level(logging.WARNING, logger=WRITE_BEHIND_LOG)

    def errors(kind: str) -> float:
        return metric(metrics, "icgate_storage_errors_total", what="request_log", kind=kind)

    def ask_until(kind: str, tag: str) -> list[httpx.Response]:
        """Requests until the log writer has met the fault (SQLite needs a new block only now and then)."""
        answers: list[httpx.Response] = []
        with httpx.Client(timeout=30) as client:
            while errors(kind) == 0:
                assert len(answers) < 300, f"no {kind} error after {len(answers)} requests"
                answers.append(chat(client, gw.url, f"{tag} question {len(answers)}"))
                time.sleep(0.01)
            answers += [chat(client, gw.url, f"{tag} question {len(answers) + i}") for i in range(5)]
        return answers

    try:
        with httpx.Client(timeout=30) as client:
            before = [chat(client, gw.url, f"before question {i}") for i in range(3)]
        volume.fill()
        while_full = ask_until("full", "disk full")
        volume.free()
        answered = before + while_full
        assert [r.status_code for r in answered] == [200] * len(answered)
        ids = [r.headers["x-icgate-request-id"] for r in answered]
        wait_for(
            lambda: len(logged_ids(reader, ids)) == len(ids), 30, "the rows held while the disk was full"
        )
        assert logged_ids(reader, ids) == Counter(dict.fromkeys(ids, 1))
        assert dropped_total(metrics) == 0

        volume.fail_to_read_only()
        while_read_only = ask_until("read_only", "read-only")
        assert [r.status_code for r in while_read_only] == [200] * len(while_read_only)
        held = writer.pending
        assert (
            held == len(while_read_only)
            and metric(metrics, "icgate_storage_dropped_total", what="request_log") == 0
        )

        failures = [
            r.getMessage()
            for r in caplog.records
            if r.name == WRITE_BEHIND_LOG and "request log: write" in r.getMessage()
        ]
        assert any("(full" in m for m in failures) and any("(read-only" in m for m in failures), failures

        # Stopped with the filesystem still read-only: the shutdown grace, then what was held is counted
        # lost (and logged); nothing else was, and the database holds exactly what was answered before.
        gw.stop()
        assert (
            writer.pending == 0
            and metric(metrics, "icgate_storage_dropped_total", what="request_log") == held
        )
        assert any("records lost" in r.getMessage() for r in caplog.records if r.name == WRITE_BEHIND_LOG)
        with reader.connect() as conn:
            logged = set(conn.scalars(sa.select(tables.RequestLog.request_id)))
        assert logged == set(ids)
    finally:
        reader.dispose()
