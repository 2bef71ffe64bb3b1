"""Admin keys in the database: only a hash is stored, revocation, the live set the console reads."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from icgate.gateway.store import tables
from icgate.gateway.store.admin_keys import (
    ADMIN_KEY_PREFIX_LEN,
    ADMIN_KEY_SCHEME,
    create_admin_key,
    hash_admin_key,
    list_admin_keys,
    live_admin_keys,
    revoke_admin_key,
    touch_admin_key,
)


def test_a_created_key_is_stored_only_as_its_hash(engine: sa.Engine) -> None:
    created = create_admin_key(engine, "ops")
    assert created.key.startswith(ADMIN_KEY_SCHEME) and len(created.key) >= 50
    assert created.key not in repr(created)
    with engine.connect() as conn:
        [row] = conn.execute(sa.select(tables.AdminKey)).mappings().all()
    assert row["key_hash"] == hashlib.sha256(created.key.encode()).hexdigest() == hash_admin_key(created.key)
    assert row["key_prefix"] == created.key[:ADMIN_KEY_PREFIX_LEN]
    assert all(created.key not in str(value) for value in row.values())
    assert (row["id"], row["name"], row["revoked_at"], row["last_used_at"]) == (
        created.key_id,
        "ops",
        None,
        None,
    )


def test_keys_are_listed_without_secrets_and_revoked(engine: sa.Engine) -> None:
    one, two = create_admin_key(engine, "alice"), create_admin_key(engine, " bob ")
    assert one.key != two.key and two.name == "bob"
    listed = list_admin_keys(engine)
    assert [(k.key_id, k.name, k.active) for k in listed] == [
        (one.key_id, "alice", True),
        (two.key_id, "bob", True),
    ]
    assert all(one.key not in repr(k) and two.key not in repr(k) for k in listed)
    assert {k.key_id for k in live_admin_keys(engine)} == {one.key_id, two.key_id}

    assert revoke_admin_key(engine, one.key_id) is True
    first = list_admin_keys(engine)[0].revoked_at
    assert first is not None
    assert revoke_admin_key(engine, one.key_id) is True  # again: still known, first time kept
    assert list_admin_keys(engine)[0].revoked_at == first
    assert revoke_admin_key(engine, 999_999) is False
    [live] = live_admin_keys(engine)
    assert (live.key_id, live.name, live.key_hash) == (two.key_id, "bob", hash_admin_key(two.key))
    assert live.key_hash not in repr(live)


def test_use_is_recorded(engine: sa.Engine) -> None:
    created = create_admin_key(engine)
    assert created.name == "admin"
    touch_admin_key(engine, created.key_id)
    [info] = list_admin_keys(engine)
    assert info.last_used_at is not None and info.last_used_at >= info.created_at


@pytest.mark.parametrize("name", ["", "   ", "x" * 65])
def test_a_key_needs_a_short_name(engine: sa.Engine, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        create_admin_key(engine, name)
    assert list_admin_keys(engine) == []
