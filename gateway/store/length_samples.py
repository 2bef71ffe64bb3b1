"""Answered requests as training rows of each backend's length predictor (`length_samples`).

The record stage hands every answer a backend gave to `LengthSampleWriter` (a write-behind queue, off the
request's path); `gateway.store.length_learning` reads a backend's newest rows back as
`lengths.training.LoggedAnswer`s, deletes what is past its window, and refits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from icgate.gateway.config import RequestLogConfig
from icgate.gateway.store import tables
from icgate.gateway.store.write_behind import RowWriter, StorageEvents, insert_rows
from icgate.lengths.training import LoggedAnswer

FINISHED = "stop"
TRUNCATED = "length"


@dataclass(frozen=True)
class LengthSample:
    backend: str
    prompt_text: str  # the feature window of the prompt, PII-scrubbed
    prompt_tokens: int  # the gateway's estimate, as the route stage read it
    embedding: bytes | None  # float32, as the route stage had it
    completion_tokens: int
    finish_reason: str | None
    max_tokens: int | None


def is_truncated(completion_tokens: int, finish_reason: str | None, max_tokens: int | None) -> bool:
    """Cut short: the backend said so, or the answer reached the request's `max_tokens` (a server that
    says "stop" at exactly the cap cannot tell us whether it would have gone on)."""
    return finish_reason == TRUNCATED or (max_tokens is not None and completion_tokens >= max_tokens)


def usable(finish_reason: str | None) -> bool:
    """Answers that say something about length: finished, or cut by the length limit. Tool calls, content
    filters and streams that ended without a reason do not."""
    return finish_reason in (FINISHED, TRUNCATED)


def insert_samples(engine: sa.Engine, batch: list[LengthSample]) -> None:
    insert_rows(engine, tables.LengthSampleRow, batch)


class LengthSampleWriter(RowWriter[LengthSample]):
    def __init__(
        self, engine: sa.Engine, config: RequestLogConfig, events: StorageEvents | None = None
    ) -> None:
        super().__init__(
            engine,
            tables.LengthSampleRow,
            config,
            name="length samples",
            what="length_samples",
            events=events,
        )


@dataclass(frozen=True)
class BackendCount:
    backend: str
    rows: int
    newest_id: int


def counts(engine: sa.Engine) -> list[BackendCount]:
    """Rows and the newest row id per backend (one indexed scan)."""
    table = tables.LengthSampleRow
    query = sa.select(table.backend, sa.func.count(), sa.func.max(table.id)).group_by(table.backend)
    with engine.connect() as conn:
        return [BackendCount(str(b), int(n), int(top)) for b, n, top in conn.execute(query)]


def rows_since(engine: sa.Engine, backend: str, after_id: int) -> int:
    table = tables.LengthSampleRow
    query = sa.select(sa.func.count()).where(table.backend == backend, table.id > after_id)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def select_samples() -> sa.Select[int, str, str, int, bytes | None, int, str | None, int | None]:
    """The columns a length sample is read back with: by the refit here, and by bench/load.py, which
    scores the predictors on the same rows."""
    table = tables.LengthSampleRow
    return sa.select(
        table.id,
        table.backend,
        table.prompt_text,
        table.prompt_tokens,
        table.embedding,
        table.completion_tokens,
        table.finish_reason,
        table.max_tokens,
    )


def embedding_of(stored: bytes | None) -> npt.NDArray[np.float32] | None:
    """A sample's embedding as the route stage used it (None: it had none)."""
    return None if stored is None else np.frombuffer(stored, dtype=np.float32)


def newest_answers(engine: sa.Engine, backend: str, limit: int) -> tuple[list[LoggedAnswer], int]:
    """A backend's newest `limit` usable answers as training rows, and the newest row id read."""
    table = tables.LengthSampleRow
    query = select_samples().where(table.backend == backend).order_by(table.id.desc()).limit(limit)
    answers: list[LoggedAnswer] = []
    newest = 0
    with engine.connect() as conn:
        for row in conn.execute(query):
            newest = max(newest, int(row.id))
            if not usable(row.finish_reason):
                continue
            answers.append(
                LoggedAnswer(
                    text=row.prompt_text,
                    prompt_tokens=int(row.prompt_tokens),
                    completion_tokens=int(row.completion_tokens),
                    truncated=is_truncated(row.completion_tokens, row.finish_reason, row.max_tokens),
                    embedding=embedding_of(row.embedding),
                )
            )
    answers.reverse()  # oldest first, as logged
    return answers, newest


def prune(engine: sa.Engine, backend: str, keep: int) -> int:
    """Delete a backend's rows older than its newest `keep`; how many went."""
    table = tables.LengthSampleRow
    with engine.begin() as conn:
        cutoff = conn.execute(
            sa.select(table.id)
            .where(table.backend == backend)
            .order_by(table.id.desc())
            .offset(keep)
            .limit(1)
        ).scalar()
        if cutoff is None:
            return 0
        gone = conn.execute(sa.delete(table).where(table.backend == backend, table.id <= cutoff))
        return int(gone.rowcount or 0)
