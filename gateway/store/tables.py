"""The database schema, as SQLAlchemy models.

Types are portable (SQLite and PostgreSQL); Alembic migrations in
`migrations/` must match these models (a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Explicit constraint names: migrations can then drop or alter them by name on
# every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored in UTC.

    SQLite has no timezone type and hands back naive values; this makes both
    backends return aware UTC datetimes so comparisons never mix the two.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, _dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, _dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class TenantRow(Base):
    """Who a request is billed and isolated for; API keys belong to a tenant."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    priority_class: Mapped[str | None] = mapped_column(String(32))


class ApiKey(Base):
    """An API key. Only its SHA-256 is stored: keys are 256-bit random, so a
    plain hash cannot be brute-forced and lookups stay one indexed read."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # The first characters of the key, shown in listings to tell keys apart.
    key_prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class RequestLog(Base):
    """One row per request, mirroring `gateway.context.RequestRecord`.

    No foreign keys: the log is append-only history and must accept a batch
    even if a tenant or key was deleted meanwhile.
    """

    __tablename__ = "request_log"
    __table_args__ = (
        Index("ix_request_log_tenant_id_created_at", "tenant_id", "created_at"),
        # The admin console's filters, newest first (keyset on id): one index range each.
        Index("ix_request_log_tenant_id_id", "tenant_id", "id"),
        Index("ix_request_log_route_id", "route", "id"),
        Index("ix_request_log_backend_id", "backend", "id"),
        Index("ix_request_log_status_code_id", "status_code", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    tenant_id: Mapped[int | None] = mapped_column(Integer)
    api_key_id: Mapped[int | None] = mapped_column(Integer)
    endpoint: Mapped[str] = mapped_column(String(32))
    model_requested: Mapped[str] = mapped_column(Text)
    route: Mapped[str | None] = mapped_column(String(32))
    backend: Mapped[str | None] = mapped_column(String(128))
    fallback_from: Mapped[str | None] = mapped_column(String(128))
    stream: Mapped[bool]
    status_code: Mapped[int]
    error_type: Mapped[str | None] = mapped_column(String(128))
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    cost_usd: Mapped[float]
    latency_ms: Mapped[float]
    overhead_ms: Mapped[float]
    queue_ms: Mapped[float]
    decisions: Mapped[dict[str, Any]]


class RequestRollup(Base):
    """The request log summed per period (a minute, and an hour), route, mechanism and status, as rows are
    written (in the same transaction): the console's overview reads these, so its cost does not grow with
    the log. A day's overview reads the minutes, a month's the hours.

    `mechanism`: exact | semantic (a cache hit), examples (a backend answered with examples prepended),
    none (a backend answered as asked, or nothing answered).
    """

    __tablename__ = "request_rollup"

    span_s: Mapped[int] = mapped_column(primary_key=True)  # 60 or 3600
    start: Mapped[datetime] = mapped_column(primary_key=True)
    route: Mapped[str] = mapped_column(String(32), primary_key=True)
    mechanism: Mapped[str] = mapped_column(String(16), primary_key=True)
    status_code: Mapped[int] = mapped_column(primary_key=True)
    requests: Mapped[int]
    fallbacks: Mapped[int]
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    cost_usd: Mapped[float]


class CacheEntryRow(Base):
    """One cached request/response pair (see `cache.store.CacheEntry`).

    The vector is stored beside the text, so a replica rebuilds its index at
    start without re-embedding. Deletion is a tombstone (`deleted_at`): other
    replicas learn of it on their next sync.
    """

    __tablename__ = "cache_entries"
    __table_args__ = (Index("ix_cache_entries_namespace_exact_key", "namespace", "exact_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(160), index=True)
    exact_key: Mapped[str] = mapped_column(String(64))
    context_fingerprint: Mapped[str] = mapped_column(String(64))
    embed_text: Mapped[str] = mapped_column(Text)
    prompt_text: Mapped[str] = mapped_column(Text)
    response_text: Mapped[str] = mapped_column(Text)
    response: Mapped[dict[str, Any]]
    backend: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    utility: Mapped[float] = mapped_column(Float)
    feedback_sum: Mapped[float] = mapped_column(Float, default=0.0)
    feedback_count: Mapped[int] = mapped_column(Integer, default=0)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    helped: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None] = mapped_column(index=True)
    # When feedback last moved its utility: the other replicas' sync takes the new values from here.
    feedback_at: Mapped[datetime | None] = mapped_column(index=True)


class ModelArtifactRow(Base):
    """A trained router or length predictor: the artifact's bytes, what it was trained on, how it scored.

    The newest row of a kind is the one in force; every replica polls for it and swaps it in without a
    restart (`gateway.model_store`). Older rows stay, so a bad model can be rolled back by publishing an
    older artifact again.
    """

    __tablename__ = "model_artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)  # router | length
    version: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    artifact: Mapped[bytes] = mapped_column(LargeBinary)
    training: Mapped[dict[str, Any]]  # data files, rows, label rates
    metrics: Mapped[dict[str, Any]]  # held-out numbers


class RouteSampleRow(Base):
    """A routed request's prompt, who answered and how long, and later its quality label.

    The gateway's own training data: labels come from `/v1/feedback` or from the large model grading a
    sampled share of small-model answers (LLM-as-judge); `icgate router train --from-log` and
    `icgate length fit --from-log` read them. The prompt is stored after the cache's PII scrub.
    """

    __tablename__ = "route_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime]
    tenant_id: Mapped[int | None] = mapped_column(Integer)
    prompt_text: Mapped[str] = mapped_column(Text)
    tier: Mapped[str] = mapped_column(String(32))
    backend: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    label: Mapped[float | None] = mapped_column(Float)  # 0..1: was the answer good enough?
    label_source: Mapped[str | None] = mapped_column(String(32))  # feedback | judge


class AdminKey(Base):
    """An admin key made by `icgate admin create-key`: only its SHA-256 is stored, as for tenant keys. The
    key from the environment (`ICGATE_ADMIN_KEY`) is never stored."""

    __tablename__ = "admin_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    key_prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class PolicyVersion(Base):
    """A policy as applied: its full text, who applied it, when and how. The newest row is the policy in
    force; every replica polls for it (`gateway.live_policy`)."""

    __tablename__ = "policy_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    author: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(32))  # file | console | router-knob | rollback
    note: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    # The policy file this version was made from (its own sha256 for a file): a replica started from
    # another file does not take it.
    base_sha256: Mapped[str] = mapped_column(String(64))
    # The dotted paths it changed against the policy then in force: {"live": [...], "restart": [...]}
    changes: Mapped[dict[str, Any]]


class ReplayRun(Base):
    """A cache replay run started from the console: its budget, progress and result."""

    __tablename__ = "replay_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    author: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # running | done | failed
    budget_usd: Mapped[float]
    tenant: Mapped[str | None] = mapped_column(String(128))
    summary: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text)


class RequestBody(Base):
    """A request's prompt and answer, PII-scrubbed, kept only when `request_log.store_bodies` is on."""

    __tablename__ = "request_bodies"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    prompt: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)


class LengthSampleRow(Base):
    """An answered request as a training row of its backend's length predictor: what the route stage read
    (the prompt's feature window, PII-scrubbed; the gateway's token estimate; the embedding, when it had
    one), the backend that answered, and how long the answer was and how it ended. Written for every
    answer a backend gave (routed or named, streamed or not); `gateway.store.length_learning` refits from
    them and keeps a backend's newest `lengths.max_rows`."""

    __tablename__ = "length_samples"
    __table_args__ = (Index("ix_length_samples_backend_id", "backend", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime]
    backend: Mapped[str] = mapped_column(String(128))
    prompt_text: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int]  # the gateway's estimate (icgate.text.estimate_prompt_tokens), as served
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32, as the route stage had it
    completion_tokens: Mapped[int]
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    max_tokens: Mapped[int | None]  # the request's max_tokens (or max_completion_tokens), if it set one


class LeaseRow(Base):
    """A job that one replica at a time runs (the length refit): whoever holds an unexpired row runs it.
    Taken by an UPDATE of an expired row or an INSERT of a new one, so two replicas never both take it
    (gateway.store.leases)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]
