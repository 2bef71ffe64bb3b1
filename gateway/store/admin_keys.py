"""Admin keys made by `icgate admin create-key`: create, revoke, list, and the live set the console checks.

A key is `icg-admin-` + 43 url-safe characters (256 random bits), a prefix apart from tenant keys so a
leaked one is recognised for what it is. Only its SHA-256 is stored; the plaintext exists once, in what
`create_admin_key` returns. The key from the environment (`ICGATE_ADMIN_KEY`) is never stored. Nothing
here logs a key or its hash.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from icgate.gateway.store import tables

ADMIN_KEY_SCHEME = "icg-admin-"
ADMIN_KEY_PREFIX_LEN = 14  # the scheme and 4 characters: enough to tell keys apart in a listing
MAX_NAME_LEN = 64  # the name is part of `who` (an author, 128 characters at most)


@dataclass(frozen=True)
class CreatedAdminKey:
    key_id: int
    name: str
    key: str = field(repr=False)  # the plaintext, shown to the caller once


@dataclass(frozen=True)
class AdminKeyInfo:
    """An admin key as listed: everything but the secret."""

    key_id: int
    name: str
    key_prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class LiveAdminKey:
    """An unrevoked key as the console checks it: its id, its name and its digest (hex SHA-256)."""

    key_id: int
    name: str
    key_hash: str = field(repr=False)


def hash_admin_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_admin_key(engine: sa.Engine, name: str = "admin") -> CreatedAdminKey:
    """A new admin key called `name` (a label for people and for the console's record of who changed
    what; names need not be unique)."""
    label = name.strip()
    if not label or len(label) > MAX_NAME_LEN:
        raise ValueError(f"an admin key's name is 1-{MAX_NAME_LEN} characters")
    plaintext = ADMIN_KEY_SCHEME + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        result = conn.execute(
            sa.insert(tables.AdminKey).values(
                name=label,
                key_prefix=plaintext[:ADMIN_KEY_PREFIX_LEN],
                key_hash=hash_admin_key(plaintext),
                created_at=tables.utcnow(),
            )
        )
        pk = result.inserted_primary_key
    assert pk is not None
    return CreatedAdminKey(key_id=int(pk[0]), name=label, key=plaintext)


def revoke_admin_key(engine: sa.Engine, key_id: int) -> bool:
    """Revoke a key; False if there is no such key. Revoking twice keeps the first time."""
    table = tables.AdminKey
    with engine.begin() as conn:
        found = conn.execute(sa.select(table.revoked_at).where(table.id == key_id)).one_or_none()
        if found is None:
            return False
        if found.revoked_at is None:
            conn.execute(sa.update(table).where(table.id == key_id).values(revoked_at=tables.utcnow()))
    return True


def list_admin_keys(engine: sa.Engine) -> list[AdminKeyInfo]:
    table = tables.AdminKey
    query = sa.select(
        table.id, table.name, table.key_prefix, table.created_at, table.revoked_at, table.last_used_at
    ).order_by(table.id)
    with engine.connect() as conn:
        return [AdminKeyInfo(*row) for row in conn.execute(query)]


def live_admin_keys(engine: sa.Engine) -> list[LiveAdminKey]:
    """Every unrevoked admin key (a handful: the console holds them in memory and re-reads them)."""
    table = tables.AdminKey
    query = sa.select(table.id, table.name, table.key_hash).where(table.revoked_at.is_(None))
    with engine.connect() as conn:
        return [LiveAdminKey(*row) for row in conn.execute(query)]


def touch_admin_key(engine: sa.Engine, key_id: int) -> None:
    """Record that a key was just used (the console calls it at most once a minute per key)."""
    table = tables.AdminKey
    with engine.begin() as conn:
        conn.execute(sa.update(table).where(table.id == key_id).values(last_used_at=tables.utcnow()))
