"""API keys: issue, revoke, list, and authenticate.

A key is `icg-` + 43 url-safe characters (256 random bits). Only its SHA-256
is stored, so the database never holds a usable key; the plaintext exists once,
in the value `create_key` returns. Nothing here logs a key or a key hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from icgate.gateway.errors import GatewayError
from icgate.gateway.records import Tenant
from icgate.gateway.store import tables

log = logging.getLogger(__name__)

KEY_SCHEME = "icg-"
KEY_PREFIX_LEN = 8  # "icg-" and 4 characters: enough to tell keys apart in a listing
_MAX_KEY_LEN = 256
# Writing last_used_at on every lookup would turn reads into writes; once a
# minute per key is precise enough to spot unused keys.
_LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class CreatedKey:
    key_id: int
    tenant_id: int
    tenant_name: str
    key: str = field(repr=False)  # the plaintext, shown to the caller once


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed to an operator: everything but the secret."""

    key_id: int
    tenant_id: int
    tenant_name: str
    key_prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _new_id(result: sa.CursorResult[Any]) -> int:
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])


def _tenant_id(conn: sa.Connection, name: str) -> int | None:
    return conn.execute(
        sa.select(tables.TenantRow.id).where(tables.TenantRow.name == name)
    ).scalar_one_or_none()


def _get_or_create_tenant(engine: sa.Engine, name: str) -> int:
    with engine.begin() as conn:
        existing = _tenant_id(conn, name)
        if existing is not None:
            return existing
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.insert(tables.TenantRow).values(name=name, created_at=tables.utcnow()))
            return _new_id(result)
    except IntegrityError:
        # Another process created it between our read and our insert.
        with engine.begin() as conn:
            created = _tenant_id(conn, name)
        if created is None:
            raise
        return created


def tenant_named(engine: sa.Engine, name: str) -> Tenant:
    """The tenant called `name`, created if new: for callers that name their tenant rather than present
    a key (an in-process client wrapped for one tenant)."""
    return Tenant(id=_get_or_create_tenant(engine, name), name=name)


def create_key(engine: sa.Engine, tenant_name: str) -> CreatedKey:
    """Issue a new key for `tenant_name`, creating the tenant if needed."""
    name = tenant_name.strip()
    if not name or len(name) > 128:
        raise ValueError("tenant name must be 1-128 characters")
    tenant_id = _get_or_create_tenant(engine, name)
    plaintext = KEY_SCHEME + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        result = conn.execute(
            sa.insert(tables.ApiKey).values(
                tenant_id=tenant_id,
                key_prefix=plaintext[:KEY_PREFIX_LEN],
                key_hash=hash_key(plaintext),
                created_at=tables.utcnow(),
            )
        )
    return CreatedKey(key_id=_new_id(result), tenant_id=tenant_id, tenant_name=name, key=plaintext)


def revoke_key(engine: sa.Engine, key_id: int) -> bool:
    """Revoke a key; False if no such key. Revoking twice keeps the first time."""
    with engine.begin() as conn:
        found = conn.execute(
            sa.select(tables.ApiKey.revoked_at).where(tables.ApiKey.id == key_id)
        ).one_or_none()
        if found is None:
            return False
        if found.revoked_at is None:
            conn.execute(
                sa.update(tables.ApiKey).where(tables.ApiKey.id == key_id).values(revoked_at=tables.utcnow())
            )
    return True


def list_keys(engine: sa.Engine) -> list[KeyInfo]:
    query = (
        sa.select(
            tables.ApiKey.id,
            tables.ApiKey.tenant_id,
            tables.TenantRow.name,
            tables.ApiKey.key_prefix,
            tables.ApiKey.created_at,
            tables.ApiKey.revoked_at,
            tables.ApiKey.last_used_at,
        )
        .join(tables.TenantRow, tables.TenantRow.id == tables.ApiKey.tenant_id)
        .order_by(tables.ApiKey.id)
    )
    with engine.connect() as conn:
        return [KeyInfo(*row) for row in conn.execute(query)]


@dataclass(frozen=True)
class TenantKeys:
    """A tenant as the console lists it: its name and how many unrevoked keys it has."""

    tenant_id: int
    name: str
    live_keys: int


def tenants_with_live_keys(engine: sa.Engine) -> list[TenantKeys]:
    """Every tenant, by name, with its number of unrevoked keys (one grouped read over `api_keys`)."""
    live = sa.func.count(tables.ApiKey.id)
    query = (
        sa.select(tables.TenantRow.id, tables.TenantRow.name, live)
        .outerjoin(
            tables.ApiKey,
            sa.and_(tables.ApiKey.tenant_id == tables.TenantRow.id, tables.ApiKey.revoked_at.is_(None)),
        )
        .group_by(tables.TenantRow.id, tables.TenantRow.name)
        .order_by(tables.TenantRow.name)
    )
    with engine.connect() as conn:
        return [TenantKeys(int(row[0]), str(row[1]), int(row[2])) for row in conn.execute(query)]


DATABASE_RETRY_AFTER_S = 2  # what a 503 for a key the database could not check tells the client


def database_unavailable(action: str = "check this API key") -> GatewayError:
    """What needs the database and could not have it: OpenAI's 503 with Retry-After, never a 500 (nor,
    for a key, a 401: the key may be fine)."""
    return GatewayError(
        503,
        f"The gateway cannot {action} right now: its database is not answering. Please retry shortly.",
        type="server_error",
        code="database_unavailable",
        headers={"retry-after": str(DATABASE_RETRY_AFTER_S)},
    )


class KeyAuthenticator:
    """Maps a presented key to its tenant without blocking the event loop.

    Answers are cached for `ttl_s` seconds (positive) and `negative_ttl_s`
    (unknown keys, so garbage keys cannot hammer the database), in a cache
    bounded to `max_entries`. A revocation therefore takes effect within
    `ttl_s`. The cache is keyed by the key's hash, never the plaintext.

    While the database does not answer, a key known valid within the last
    `stale_s` seconds stays valid (its tenant is served from memory; a key
    revoked meanwhile is refused once the database is back, or at once when
    another replica announces it through Redis), and any other key gets a 503
    with Retry-After (`database_unavailable`): the gateway cannot tell whose it
    is, and answering it as nobody's would bill and cache it under the wrong
    tenant. After a failed lookup the database is left alone for
    `down_pause_s`, so requests do not each wait on a connection attempt.
    """

    def __init__(
        self,
        engine: sa.Engine,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 10_000,
        stale_s: float = 3_600.0,
        down_pause_s: float = 1.0,
    ) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._negative_ttl_s = min(negative_ttl_s, ttl_s)
        self._max_entries = max_entries
        self._stale_s = stale_s
        self._down_pause_s = down_pause_s
        self._down_until = float("-inf")  # monotonic: no lookups before this after a failure
        self._down_logged = False
        # digest -> (fresh until, tenant or None, last confirmed by the database)
        self._cache: dict[str, tuple[float, Tenant | None, float]] = {}

    async def authenticate(self, plaintext: str) -> Tenant | None:
        if not plaintext.startswith(KEY_SCHEME) or len(plaintext) > _MAX_KEY_LEN:
            return None
        digest = hash_key(plaintext)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        if now < self._down_until:
            return self._while_down(cached, now)
        try:
            tenant = await asyncio.to_thread(self._lookup, digest)
        except SQLAlchemyError as exc:
            # The exception text carries no parameters (hide_parameters).
            self._down_until = time.monotonic() + self._down_pause_s
            if not self._down_logged:
                log.error("API key lookup failed, the database is not answering: %s", type(exc).__name__)
                self._down_logged = True
            return self._while_down(cached, now)
        if self._down_logged:
            log.warning("API key lookups answered by the database again")
            self._down_logged = False
        ttl = self._ttl_s if tenant is not None else self._negative_ttl_s
        now = time.monotonic()
        self._remember(digest, now + ttl, tenant, now)
        return tenant

    def _while_down(self, cached: tuple[float, Tenant | None, float] | None, now: float) -> Tenant | None:
        """A known-good key seen recently stays good; anything else cannot be checked: 503."""
        if cached is not None and self._usable_while_down(cached[1], cached[2], now):
            return cached[1]
        raise database_unavailable()

    def forget(self) -> None:
        """Drop every cached answer (e.g. right after revoking a key in-process)."""
        self._cache.clear()

    def _remember(self, digest: str, expires: float, tenant: Tenant | None, confirmed: float) -> None:
        now = time.monotonic()
        if expires <= now:
            self._cache.pop(digest, None)
            return
        self._cache.pop(digest, None)  # re-inserted last: the eviction order is the confirmation order
        if len(self._cache) >= self._max_entries:
            # Expired answers go first; valid keys are kept while of use should the database go away.
            for k in [
                k
                for k, (exp, who, seen) in self._cache.items()
                if exp <= now and not self._usable_while_down(who, seen, now)
            ]:
                del self._cache[k]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]  # oldest confirmation first
        self._cache[digest] = (expires, tenant, confirmed)

    def _usable_while_down(self, tenant: Tenant | None, confirmed: float, now: float) -> bool:
        """Still of use while the database is away: a valid key confirmed within `stale_s`."""
        return tenant is not None and now - confirmed <= self._stale_s

    def _lookup(self, digest: str) -> Tenant | None:
        query = (
            sa.select(
                tables.ApiKey.id,
                tables.ApiKey.key_hash,
                tables.ApiKey.last_used_at,
                tables.TenantRow.id.label("tenant_id"),
                tables.TenantRow.name,
            )
            .join(tables.TenantRow, tables.TenantRow.id == tables.ApiKey.tenant_id)
            .where(tables.ApiKey.key_hash == digest, tables.ApiKey.revoked_at.is_(None))
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        self._touch(row.id, row.last_used_at)
        return Tenant(id=row.tenant_id, name=row.name, api_key_id=row.id)

    def _touch(self, key_id: int, last_used_at: datetime | None) -> None:
        now = tables.utcnow()
        if last_used_at is not None and now - last_used_at < _LAST_USED_RESOLUTION:
            return
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    sa.update(tables.ApiKey).where(tables.ApiKey.id == key_id).values(last_used_at=now)
                )
        except SQLAlchemyError as exc:
            # Bookkeeping only: a busy database must not turn a valid key away.
            log.warning("could not record API key use: %s", type(exc).__name__)
