"""Trained models in the database: publish one, find the newest, swap it in while serving.

`icgate router train` / `icgate length fit` publish a row into `model_artifacts`; every gateway replica
polls for the newest row of each kind and, when its version changed, loads it off the event loop and
hands it to a callback that swaps it in. A request in flight keeps the model it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from icgate.gateway.store import tables
from icgate.gateway.store.tables import utcnow

log = logging.getLogger("icgate.models")

T = TypeVar("T")


@dataclass(frozen=True)
class StoredModel:
    id: int
    kind: str
    version: str
    artifact: bytes
    training: dict[str, Any]
    metrics: dict[str, Any]


def publish(
    engine: sa.Engine,
    kind: str,
    version: str,
    artifact: bytes,
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> int:
    """Store an artifact; from now on it is the newest of its kind, the one every replica loads."""
    row = tables.ModelArtifactRow(
        kind=kind,
        version=version,
        created_at=utcnow(),
        artifact=artifact,
        training=training,
        metrics=metrics,
    )
    with Session(engine) as session, session.begin():
        session.add(row)
        session.flush()
        return int(row.id)


def newest(engine: sa.Engine, kind: str, *, with_artifact: bool = True) -> StoredModel | None:
    table = tables.ModelArtifactRow
    with Session(engine) as session:
        row = session.scalars(
            sa.select(table).where(table.kind == kind).order_by(table.id.desc()).limit(1)
        ).first()
        if row is None:
            return None
        return StoredModel(
            row.id,
            row.kind,
            row.version,
            row.artifact if with_artifact else b"",
            dict(row.training),
            dict(row.metrics),
        )


def newest_id(engine: sa.Engine, kind: str) -> int | None:
    table = tables.ModelArtifactRow
    with Session(engine) as session:
        return session.scalar(sa.select(sa.func.max(table.id)).where(table.kind == kind))


class ModelWatcher(Generic[T]):
    """Polls `model_artifacts` for a newer row of one kind and swaps it in through `on_swap`.

    A row that fails to load is logged and skipped (the model in force stays) until a newer one appears.
    """

    def __init__(
        self,
        engine: sa.Engine,
        kind: str,
        load: Callable[[bytes], T],
        on_swap: Callable[[T, StoredModel], None],
        interval_s: float,
    ) -> None:
        self.engine = engine
        self.kind = kind
        self.load = load
        self.on_swap = on_swap
        self.interval_s = interval_s
        self.current_id: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Load and swap in the newest row if it is new; True when a model was swapped in."""
        latest = await asyncio.to_thread(newest_id, self.engine, self.kind)
        if latest is None or latest == self.current_id:
            return False
        stored = await asyncio.to_thread(newest, self.engine, self.kind)
        if stored is None:
            return False
        self.current_id = stored.id
        try:
            model = await asyncio.to_thread(self.load, stored.artifact)
        except Exception:
            log.exception(
                "%s model %s (row %d) did not load; keeping the current one",
                self.kind,
                stored.version,
                stored.id,
            )
            return False
        self.on_swap(model, stored)
        log.info("%s model %s in force (row %d)", self.kind, stored.version, stored.id)
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"icgate-{self.kind}-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("%s model poll failed; retrying next interval", self.kind)


@dataclass(frozen=True)
class ModelInfo:
    """A published row without its artifact's bytes: what a listing shows."""

    id: int
    kind: str
    version: str
    created_at: datetime
    training: dict[str, Any]
    metrics: dict[str, Any]


def list_models(engine: sa.Engine, kind: str, limit: int = 50) -> list[ModelInfo]:
    """The published rows of a kind, newest (the one in force) first."""
    table = tables.ModelArtifactRow
    query = (
        sa.select(table.id, table.kind, table.version, table.created_at, table.training, table.metrics)
        .where(table.kind == kind)
        .order_by(table.id.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        return [
            ModelInfo(int(r.id), r.kind, r.version, r.created_at, dict(r.training), dict(r.metrics))
            for r in conn.execute(query)
        ]


def stored(engine: sa.Engine, row_id: int) -> StoredModel | None:
    """One published row, with its artifact."""
    with Session(engine) as session:
        row = session.get(tables.ModelArtifactRow, row_id)
        if row is None:
            return None
        return StoredModel(row.id, row.kind, row.version, row.artifact, dict(row.training), dict(row.metrics))


def republish(engine: sa.Engine, row_id: int) -> int:
    """Publish an older row's artifact again, as a new row: the newest row is the one every replica loads,
    so this swaps every replica back to it (and the history of what was in force stays in the table)."""
    old = stored(engine, row_id)
    if old is None:
        raise LookupError(f"no published model in row {row_id}")
    return publish(engine, old.kind, old.version, old.artifact, old.training, old.metrics)
