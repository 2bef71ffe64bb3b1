"""`icgate cache replay`: regenerate valuable answers with the large model while it is idle.

The plan comes from `cache.replay`; this module reads the entries from the
database, asks the large backend, and writes the result as a new entry (and a
tombstone for the old one), so every replica picks the change up by its
ordinary sync.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session

from icgate.cache.replay import plan_replay
from icgate.cache.store import CacheEntry, initial_utility
from icgate.gateway.backends.client import BackendClient, BackendError
from icgate.gateway.backends.local import LocalBackends
from icgate.gateway.config import BackendConfig, Policy
from icgate.gateway.store import db, tables
from icgate.gateway.store.cache_entries import entry_of, row_of, tombstone_rows

log = logging.getLogger("icgate.replay")


@dataclass
class ReplaySummary:
    planned: int = 0
    replayed: int = 0
    failed: int = 0
    skipped_busy: int = 0
    pruned: int = 0
    spent_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "spent_usd": round(self.spent_usd, 6)}


def load_entries(engine: sa.Engine) -> list[CacheEntry]:
    table = tables.CacheEntryRow
    with Session(engine) as session:
        rows = session.scalars(sa.select(table).where(table.deleted_at.is_(None)).order_by(table.id)).all()
        return [entry_of(row) for row in rows]


def cost(backend: BackendConfig, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * backend.cost_per_1k_input + completion_tokens * backend.cost_per_1k_output) / 1000


async def backend_idle(gateway_url: str | None, backend: str) -> bool:
    """Idle = the gateway has no request in flight to `backend` (no gateway given: assume idle)."""
    if gateway_url is None:
        return True
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(gateway_url.rstrip("/") + "/metrics")).text
    match = re.search(rf'^icgate_backend_inflight\{{backend="{re.escape(backend)}"\}} (\S+)$', text, re.M)
    return match is None or float(match.group(1)) == 0.0


async def wait_idle(gateway_url: str | None, backend: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if await backend_idle(gateway_url, backend):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.5)


def replace_entry(
    engine: sa.Engine, old: CacheEntry, backend: BackendConfig, response: dict[str, Any]
) -> int:
    """A new row with the large model's answer, and a tombstone for the old one, in one transaction."""
    usage = response.get("usage") or {}
    now = time.time()
    new = dataclasses.replace(
        old,
        response_text=response["choices"][0]["message"]["content"],
        response=response,
        backend=backend.name,
        tier=backend.tier,
        prompt_tokens=int(usage.get("prompt_tokens") or old.prompt_tokens),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        utility=max(old.utility, initial_utility(best_tier=True)),
        feedback_sum=0.0,
        feedback_count=0,
        created_at=now,
        last_used_at=old.last_used_at or now,
    )
    with Session(engine) as session, session.begin():
        tombstone_rows(session, [old.id])
        row = row_of(new)
        session.add(row)
        session.flush()
        return int(row.id)


async def run_replay(  # noqa: PLR0913 - the command's options, one argument each
    policy: Policy,
    data_dir: Path,
    budget_usd: float,
    *,
    max_entries: int = 100,
    gateway_url: str | None = None,
    idle_wait_s: float = 30.0,
    prune_after_days: float = 7.0,
    dry_run: bool = False,
    launch_local: bool = True,
) -> ReplaySummary:
    url = policy.database_url(data_dir)
    await asyncio.to_thread(db.upgrade, url)
    engine = db.make_engine(url)
    summary = ReplaySummary()
    best_tier = policy.best_tier
    large = policy.tier(best_tier)
    if not large:
        raise ValueError(f"no backend serves the best tier '{best_tier}'")
    backend = large[0]
    try:
        entries = await asyncio.to_thread(load_entries, engine)
        # Only standalone questions: a follow-up's earlier turns are not stored, only digested.
        standalone = [e for e in entries if not e.context_fingerprint]
        plan = plan_replay(
            standalone,
            best_tier,
            time.time(),
            budget_usd,
            lambda e: cost(backend, e.prompt_tokens, e.completion_tokens),
            max_entries,
            prune_after_s=prune_after_days * 86_400.0,
        )
        summary.planned, summary.pruned = len(plan.replay), len(plan.prune)
        if dry_run:
            return summary
        await asyncio.to_thread(tombstone_rows, engine, [e.id for e in plan.prune])
        if not plan.replay:
            return summary
        async with LocalBackends() as local:
            if launch_local and backend.launch is not None and gateway_url is None:
                await local.start_all([backend], data_dir)
            await replay_entries(engine, plan.replay, backend, budget_usd, gateway_url, idle_wait_s, summary)
    finally:
        engine.dispose()
    return summary


async def replay_entries(
    engine: sa.Engine,
    entries: list[CacheEntry],
    backend: BackendConfig,
    budget_usd: float,
    gateway_url: str | None,
    idle_wait_s: float,
    summary: ReplaySummary,
) -> None:
    client = BackendClient()
    try:
        for entry in entries:
            if not await wait_idle(gateway_url, backend.name, idle_wait_s):
                summary.skipped_busy = len(entries) - summary.replayed - summary.failed
                log.info("replay: %s stayed busy; stopping", backend.name)
                return
            body = {
                "model": backend.name,
                "messages": [{"role": "user", "content": entry.prompt_text}],
                "temperature": 0,
            }
            try:
                response = await client.complete(backend, "chat", body)
            except BackendError as exc:
                summary.failed += 1
                log.warning("replay of entry %d failed: %s", entry.id, exc)
                continue
            choice = (response.get("choices") or [{}])[0]
            text = (choice.get("message") or {}).get("content") or ""
            if choice.get("finish_reason") != "stop" or not text.strip():
                summary.failed += 1
                continue
            usage = response.get("usage") or {}
            spent = cost(
                backend, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
            if summary.spent_usd + spent > budget_usd:
                return
            summary.spent_usd += spent
            await asyncio.to_thread(replace_entry, engine, entry, backend, response)
            summary.replayed += 1
    finally:
        await client.aclose()
