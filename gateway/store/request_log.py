"""The request log: one row per request, written off the hot path."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import sqlalchemy as sa

from icgate.gateway.config import RequestLogConfig
from icgate.gateway.records import RequestRecord
from icgate.gateway.store import tables
from icgate.gateway.store.write_behind import WriteBehindQueue

_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))


def _jsonable(value: Any) -> Any:
    """A copy of `value` that every JSON column accepts (no NaN, no numpy, no objects)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        try:
            return _jsonable(tolist())
        except Exception:
            pass
    return str(value)


def _row(record: RequestRecord) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in _RECORD_FIELDS}
    row["decisions"] = _jsonable(record.decisions)
    return row


def insert_records(engine: sa.Engine, batch: list[RequestRecord]) -> None:
    rows = [_row(r) for r in batch]
    with engine.begin() as conn:
        conn.execute(sa.insert(tables.RequestLog), rows)


class RequestLogWriter(WriteBehindQueue[RequestRecord]):
    """The write-behind queue in front of the `request_log` table."""

    def __init__(
        self,
        engine: sa.Engine,
        config: RequestLogConfig,
        *,
        max_attempts: int = 3,
        retry_backoff_s: float = 0.5,
    ) -> None:
        super().__init__(
            lambda batch: insert_records(engine, batch),
            config,
            name="request log",
            max_attempts=max_attempts,
            retry_backoff_s=retry_backoff_s,
        )
