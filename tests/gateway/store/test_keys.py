from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa

from icgate.gateway.records import Tenant
from icgate.gateway.store import tables
from icgate.gateway.store.keys import (
    KEY_PREFIX_LEN,
    KeyAuthenticator,
    create_key,
    hash_key,
    list_keys,
    revoke_key,
)


async def test_created_key_authenticates_to_its_tenant(engine: sa.Engine) -> None:
    created = create_key(engine, "acme")
    assert created.key.startswith("icg-") and len(created.key) >= 40
    auth = KeyAuthenticator(engine, ttl_s=0)
    tenant = await auth.authenticate(created.key)
    assert tenant == Tenant(id=created.tenant_id, name="acme", api_key_id=created.key_id)


async def test_keys_of_different_tenants_stay_apart(engine: sa.Engine) -> None:
    a1 = create_key(engine, "a")
    a2 = create_key(engine, "a")
    b = create_key(engine, "b")
    assert a1.tenant_id == a2.tenant_id != b.tenant_id
    auth = KeyAuthenticator(engine, ttl_s=0)
    got = await asyncio.gather(*(auth.authenticate(k.key) for k in (a1, a2, b)))
    assert [t.name if t else None for t in got] == ["a", "a", "b"]
    assert [t.api_key_id if t else None for t in got] == [a1.key_id, a2.key_id, b.key_id]


async def test_wrong_keys_do_not_authenticate(engine: sa.Engine) -> None:
    created = create_key(engine, "acme")
    auth = KeyAuthenticator(engine, ttl_s=0)
    for wrong in [created.key[:-1], created.key + "x", "icg-" + "A" * 43, "", "sk-whatever", "x" * 10_000]:
        assert await auth.authenticate(wrong) is None


async def test_revoked_key_stops_authenticating(engine: sa.Engine) -> None:
    created = create_key(engine, "acme")
    auth = KeyAuthenticator(engine, ttl_s=0)
    assert await auth.authenticate(created.key) is not None
    assert revoke_key(engine, created.key_id) is True
    assert await auth.authenticate(created.key) is None
    assert revoke_key(engine, created.key_id) is True  # already revoked: still known
    assert revoke_key(engine, 999_999) is False


async def test_positive_answers_are_cached_for_the_ttl(engine: sa.Engine) -> None:
    created = create_key(engine, "acme")
    auth = KeyAuthenticator(engine, ttl_s=60)
    assert await auth.authenticate(created.key) is not None
    revoke_key(engine, created.key_id)
    assert await auth.authenticate(created.key) is not None  # within the TTL
    auth.forget()
    assert await auth.authenticate(created.key) is None


async def test_cache_is_bounded(engine: sa.Engine) -> None:
    auth = KeyAuthenticator(engine, ttl_s=60, negative_ttl_s=60, max_entries=5)
    for i in range(20):
        assert await auth.authenticate(f"icg-unknown-{i}") is None
    assert len(auth._cache) <= 5


async def test_database_holds_no_plaintext_key(engine: sa.Engine, db_url: str) -> None:
    created = create_key(engine, "acme")
    auth = KeyAuthenticator(engine, ttl_s=0)
    await auth.authenticate(created.key)
    with engine.connect() as conn:
        dumped = [
            repr(row)
            for table in tables.Base.metadata.sorted_tables
            for row in conn.execute(sa.select(table))
        ]
        stored_hash = conn.execute(sa.select(tables.ApiKey.key_hash)).scalar_one()
    # The prefix is stored on purpose; nothing after it may be.
    secret_part = created.key[KEY_PREFIX_LEN:]
    assert dumped and not any(secret_part in text for text in dumped)
    assert stored_hash == hash_key(created.key)
    if db_url.startswith("sqlite:///"):
        db_file = Path(db_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))  # db, -wal, -shm
        assert created.key.encode() not in raw
    assert created.key not in repr(created)


async def test_list_keys_shows_prefix_not_secret(engine: sa.Engine) -> None:
    created = create_key(engine, "acme")
    revoked = create_key(engine, "acme")
    revoke_key(engine, revoked.key_id)
    await KeyAuthenticator(engine, ttl_s=0).authenticate(created.key)
    keys = list_keys(engine)
    assert [k.key_id for k in keys] == [created.key_id, revoked.key_id]
    first, second = keys
    assert first.key_prefix == created.key[:8] and first.tenant_name == "acme"
    assert first.active and not second.active
    assert first.last_used_at is not None and first.last_used_at.tzinfo is not None
    assert first.created_at.tzinfo is not None
    assert not any(created.key in repr(k) or revoked.key in repr(k) for k in keys)


def test_create_key_rejects_bad_tenant_names(engine: sa.Engine) -> None:
    with pytest.raises(ValueError):
        create_key(engine, "  ")
    with pytest.raises(ValueError):
        create_key(engine, "x" * 200)
