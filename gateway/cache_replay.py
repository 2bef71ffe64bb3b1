"""Cache replay: regenerate valuable answers with the large model while it is idle, and prune entries that
never helped (the plan is `cache.replay`'s). `icgate cache replay` runs it from the command line; the
console starts it inside the gateway (`ReplayRuns`), with a budget, and shows its progress.

A replayed answer is a new row plus a tombstone for the old one, so every replica picks the change up by
its ordinary sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from icgate.cache.replay import plan_replay
from icgate.cache.store import CacheEntry, initial_utility
from icgate.gateway.backends.client import BackendClient, BackendError
from icgate.gateway.config import BackendConfig, Policy
from icgate.gateway.store import replay_runs, tables
from icgate.gateway.store.cache_entries import entry_of, row_of, tombstone_rows

log = logging.getLogger("icgate.replay")

IsIdle = Callable[[str], Awaitable[bool]]
Progress = Callable[["ReplaySummary"], Awaitable[None]]


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


def load_entries(engine: sa.Engine, namespace: str | None = None) -> list[CacheEntry]:
    """Live entries, one tenant's (a namespace) or all."""
    table = tables.CacheEntryRow
    query = sa.select(table).where(table.deleted_at.is_(None)).order_by(table.id)
    if namespace is not None:
        query = query.where(table.namespace == namespace)
    with Session(engine) as session:
        rows = session.scalars(query).all()
        return [entry_of(row) for row in rows]


async def wait_idle(is_idle: IsIdle, backend: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if await is_idle(backend):
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


@dataclass(frozen=True)
class ReplayOptions:
    budget_usd: float
    max_entries: int = 100
    idle_wait_s: float = 30.0
    prune_after_days: float = 7.0
    dry_run: bool = False
    namespace: str | None = None  # one tenant's entries only


async def replay(
    engine: sa.Engine,
    policy: Policy,
    options: ReplayOptions,
    is_idle: IsIdle,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Plan, prune, and regenerate within the budget, on the best tier's first backend."""
    summary = ReplaySummary()
    best_tier = policy.best_tier
    large = policy.tier(best_tier)
    if not large:
        raise ValueError(f"no backend serves the best tier '{best_tier}'")
    backend = large[0]
    entries = await asyncio.to_thread(load_entries, engine, options.namespace)
    # Only standalone questions: a follow-up's earlier turns are not stored, only digested.
    standalone = [e for e in entries if not e.context_fingerprint]
    plan = plan_replay(
        standalone,
        best_tier,
        time.time(),
        options.budget_usd,
        lambda e: backend.cost_usd(e.prompt_tokens, e.completion_tokens),
        options.max_entries,
        prune_after_s=options.prune_after_days * 86_400.0,
    )
    summary.planned, summary.pruned = len(plan.replay), len(plan.prune)
    if progress is not None:
        await progress(summary)
    if options.dry_run:
        return summary
    await asyncio.to_thread(tombstone_rows, engine, [e.id for e in plan.prune])
    if plan.replay:
        await replay_entries(engine, plan.replay, backend, options, is_idle, summary, progress)
    return summary


async def replay_entries(
    engine: sa.Engine,
    entries: list[CacheEntry],
    backend: BackendConfig,
    options: ReplayOptions,
    is_idle: IsIdle,
    summary: ReplaySummary,
    progress: Progress | None,
) -> None:
    client = BackendClient()
    try:
        for entry in entries:
            if not await wait_idle(is_idle, backend.name, options.idle_wait_s):
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
            spent = backend.cost_usd(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
            if summary.spent_usd + spent > options.budget_usd:
                return
            summary.spent_usd += spent
            await asyncio.to_thread(replace_entry, engine, entry, backend, response)
            summary.replayed += 1
            if progress is not None:
                await progress(summary)
    finally:
        await client.aclose()


class ReplayBusy(Exception):
    """A run is already going in this process."""


class ReplayRuns:
    """Replay runs started from the console: one at a time per process, in a task of the gateway's loop,
    its progress written to `replay_runs` after every entry. "Idle" is read from admission directly: no
    request of the gateway's own in flight to the large backend."""

    def __init__(
        self,
        engine: sa.Engine,
        policy: Callable[[], Policy],
        in_flight: Callable[[str], int],
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.in_flight = in_flight
        self._task: asyncio.Task[None] | None = None
        self.current: int | None = None

    async def start(self, options: ReplayOptions, tenant: str | None, author: str) -> int:
        if self._task is not None and not self._task.done():
            raise ReplayBusy(f"replay run {self.current} is still going")
        run_id = await asyncio.to_thread(replay_runs.create, self.engine, author, options.budget_usd, tenant)
        self.current = run_id
        self._task = asyncio.get_running_loop().create_task(
            self._run(run_id, options), name=f"icgate-replay-{run_id}"
        )
        return run_id

    async def _run(self, run_id: int, options: ReplayOptions) -> None:
        async def is_idle(backend: str) -> bool:
            return self.in_flight(backend) == 0

        async def progress(summary: ReplaySummary) -> None:
            await asyncio.to_thread(replay_runs.update, self.engine, run_id, summary.as_dict())

        summary = ReplaySummary()
        try:
            summary = await replay(self.engine, self.policy(), options, is_idle, progress)
        except asyncio.CancelledError:
            await asyncio.to_thread(replay_runs.update, self.engine, run_id, summary.as_dict(), "stopped")
            raise
        except Exception as exc:  # the task's edge: a failed run says why in its row, the gateway goes on
            log.exception("replay run %d failed", run_id)
            await asyncio.to_thread(
                replay_runs.update, self.engine, run_id, summary.as_dict(), "failed", str(exc)[:500]
            )
            return
        await asyncio.to_thread(replay_runs.update, self.engine, run_id, summary.as_dict(), "done")
        log.info("replay run %d done: %s", run_id, summary.as_dict())

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
