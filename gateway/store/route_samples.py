"""Routed requests as training data for the router and the length predictor.

After a routed request is answered by a backend, its (scrubbed) prompt, tier, backend and token counts
go to `route_samples` through a write-behind queue; `POST /v1/feedback` later labels the sample. The
CLI turns the labelled samples into router training rows and the finished ones into length rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from icgate.gateway.config import RequestLogConfig
from icgate.gateway.store import tables
from icgate.gateway.store.write_behind import RowWriter, StorageEvents

GOOD_ENOUGH = 0.5  # a label at or above this says the answer was good enough


@dataclass(frozen=True)
class RouteSample:
    request_id: str
    tenant_id: int | None
    prompt_text: str
    tier: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class RouteSampleWriter(RowWriter[RouteSample]):
    def __init__(
        self, engine: sa.Engine, config: RequestLogConfig, events: StorageEvents | None = None
    ) -> None:
        super().__init__(
            engine, tables.RouteSampleRow, config, name="route samples", what="route_samples", events=events
        )


def label_from_feedback(score: float) -> float:
    """Feedback runs from -1 (bad) to 1 (good); a label from 0 to 1."""
    return min(1.0, max(0.0, (score + 1.0) / 2.0))


def label_sample(
    engine: sa.Engine, request_id: str, tenant_id: int | None, label: float, source: str
) -> bool:
    """Set the label of one of the tenant's samples; False when there is none (a cache hit, an error,
    another tenant's request)."""
    table = tables.RouteSampleRow
    same_tenant = table.tenant_id.is_(None) if tenant_id is None else table.tenant_id == tenant_id
    with engine.begin() as conn:
        updated = conn.execute(
            sa.update(table)
            .where(table.request_id == request_id, same_tenant)
            .values(label=label, label_source=source)
        )
    return bool(updated.rowcount)
