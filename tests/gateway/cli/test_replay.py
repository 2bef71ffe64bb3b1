"""`icgate cache replay`: large-model answers replace valuable small ones; unused entries are pruned."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bench.harness import ServerThread
from icgate.cache.store import CacheEntry
from icgate.gateway.cli.main import main
from icgate.gateway.cli.replay import run_replay
from icgate.gateway.store import db, tables
from icgate.gateway.store.cache_entries import row_of
from tests.gateway.conftest import Standins, standin_policy

DAY = 86_400.0


def entry(prompt: str, tier: str, hits: int, age_days: float, fingerprint: str = "") -> CacheEntry:
    now = time.time()
    vector = np.zeros(384, dtype=np.float32)
    vector[0] = 1.0
    return CacheEntry(
        id=0, namespace="anonymous", exact_key=prompt, context_fingerprint=fingerprint, embed_text=prompt,
        prompt_text=prompt, response_text="meh", response={"choices": []}, backend=tier, tier=tier,
        prompt_tokens=10, completion_tokens=10, vector=vector, utility=0.5, hits=hits,
        created_at=now - age_days * DAY, last_used_at=now - age_days * DAY,
    )  # fmt: skip


def seed(url: str, entries: list[CacheEntry]) -> list[int]:
    db.upgrade(url)
    engine = db.make_engine(url)
    with sa.orm.Session(engine) as session, session.begin():
        rows = [row_of(e) for e in entries]
        session.add_all(rows)
        session.flush()
        ids = [r.id for r in rows]
    engine.dispose()
    return ids


def live_rows(url: str) -> dict[int, tables.CacheEntryRow]:
    engine = db.make_engine(url)
    with sa.orm.Session(engine) as session:
        table = tables.CacheEntryRow
        rows = session.scalars(sa.select(table).where(table.deleted_at.is_(None))).all()
        session.expunge_all()
    engine.dispose()
    return {r.id: r for r in rows}


def test_replay_regenerates_within_budget_and_prunes(standins: Standins, tmp_path: Path) -> None:
    policy = standin_policy(standins, "http")
    large = policy.backends[1]
    large.cost_per_1k_input = large.cost_per_1k_output = 10.0  # about 0.2 USD an answer
    url = policy.database_url(tmp_path)
    used, also_used, unused, followup = seed(
        url,
        [
            entry("What is the speed of light?", "small", hits=9, age_days=1),
            entry("How far is the Moon?", "small", hits=2, age_days=1),
            entry("Unpopular question", "small", hits=0, age_days=30),
            entry("What are its types?", "small", hits=50, age_days=1, fingerprint="abc"),
        ],
    )
    summary = asyncio.run(run_replay(policy, tmp_path, budget_usd=0.3, max_entries=10))
    assert summary.pruned == 1 and summary.replayed == 1 and summary.failed == 0
    assert 0 < summary.spent_usd <= 0.3
    rows = live_rows(url)
    assert used not in rows and unused not in rows  # replaced, pruned
    assert also_used in rows and followup in rows  # over budget; follow-ups are never replayed
    replaced = next(r for r in rows.values() if r.prompt_text == "What is the speed of light?")
    assert replaced.tier == "large" and replaced.backend == "large"
    assert replaced.response_text == "large-model says: What is the speed of light?"
    assert replaced.hits == 9 and replaced.utility >= 0.8
    assert standins.large.received[-1]["body"]["messages"] == [
        {"role": "user", "content": "What is the speed of light?"}
    ]


def test_replay_waits_while_the_gateway_is_busy(standins: Standins, tmp_path: Path) -> None:
    metrics = 'icgate_backend_inflight{backend="large"} 3.0\n'
    app = Starlette(routes=[Route("/metrics", lambda request: PlainTextResponse(metrics))])
    policy = standin_policy(standins, "http")
    url = policy.database_url(tmp_path)
    seed(url, [entry("What is the speed of light?", "small", hits=9, age_days=1)])
    with ServerThread(app, ready_path="/metrics") as busy_gateway:
        summary = asyncio.run(
            run_replay(policy, tmp_path, budget_usd=1.0, gateway_url=busy_gateway.url, idle_wait_s=0.5)
        )
    assert summary.replayed == 0 and summary.skipped_busy == 1
    assert not standins.large.received


def test_cli_dry_run_prints_the_plan(tmp_path: Path, capsys: object, monkeypatch: object) -> None:
    import json

    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.delenv("ICGATE_DATABASE_URL", raising=False)
    seed(f"sqlite:///{tmp_path / 'icgate.db'}", [entry("Old unused", "small", hits=0, age_days=30)])
    assert main(["cache", "replay", "--budget", "1", "--dry-run", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]  # type: ignore[attr-defined]
    assert json.loads(out) == {
        "planned": 0, "replayed": 0, "failed": 0, "skipped_busy": 0, "pruned": 1, "spent_usd": 0.0,
    }  # fmt: skip
