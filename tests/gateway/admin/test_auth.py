"""The console's credentials as plain logic: the environment key and stored keys, sessions per key,
expiry, tampering, revocation, CSRF."""

from __future__ import annotations

import hashlib

from icgate.gateway.admin.auth import ENV_KEY_ID, AdminAuth, Credential


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_only_the_admin_key_is_the_admin_key() -> None:
    auth = AdminAuth("s3cret-admin", 60)
    assert auth.enabled
    assert auth.is_admin_key("s3cret-admin")
    assert not auth.is_admin_key("s3cret-admin ")
    assert not auth.is_admin_key("sk-icgate-tenant-key")
    off = AdminAuth(None, 60)
    assert not off.enabled and not off.is_admin_key("")


def env_session(auth: AdminAuth, key: str = "k") -> str:
    credential = auth.credential(key)
    assert credential is not None and credential.id == ENV_KEY_ID
    return auth.new_session(credential)


def stored(key_id: int, name: str, key: str) -> Credential:
    return Credential.stored(key_id, name, hashlib.sha256(key.encode()).hexdigest())


def test_a_session_lasts_its_time_and_no_longer() -> None:
    clock = Clock()
    auth = AdminAuth("k", 60, clock)
    cookie = env_session(auth)
    assert auth.session(cookie) is not None
    clock.now += 59
    assert auth.session(cookie) is not None
    clock.now += 2
    assert auth.session(cookie) is None


def test_a_tampered_or_foreign_cookie_proves_nothing() -> None:
    auth = AdminAuth("k", 60)
    cookie = env_session(auth)
    key_id, expires, nonce, signature = cookie.split(".")
    assert key_id == "env"
    assert auth.session(f"env.{int(expires) + 3600}.{nonce}.{signature}") is None  # a longer life, forged
    other = AdminAuth("another key", 60)
    assert auth.session(env_session(other, "another key")) is None  # the key changed: sessions die
    for junk in ("", "a.b", "a.b.c", "x.y.z.w", "env.x.y.z", "7.1.2.3", "a.b.c.d.e"):
        assert auth.session(junk) is None


def test_the_csrf_token_belongs_to_its_session() -> None:
    auth = AdminAuth("k", 60)
    one, two = auth.session(env_session(auth)), auth.session(env_session(auth))
    assert one is not None and two is not None
    assert auth.csrf_ok(one, auth.csrf_token(one))
    assert not auth.csrf_ok(one, auth.csrf_token(two))
    assert not auth.csrf_ok(one, None)


def test_stored_keys_alone_enable_the_console() -> None:
    auth = AdminAuth(None, 60)
    assert not auth.enabled and auth.credential("icg-admin-one") is None
    auth.set_stored([stored(3, "ops", "icg-admin-one")])
    assert auth.enabled
    found = auth.credential("icg-admin-one")
    assert found is not None and found.id == "3" and found.stored_id == 3
    assert found.who == "ops (admin key #3)"
    assert "icg-admin-one" not in repr(found) and found.digest.hex() not in repr(found)
    assert auth.credential("icg-admin-one ") is None and auth.credential("") is None
    auth.set_stored([])
    assert not auth.enabled


def test_the_environment_key_and_stored_keys_are_told_apart() -> None:
    auth = AdminAuth("env-key", 60)
    auth.set_stored([stored(1, "alice", "icg-admin-a"), stored(2, "bob", "icg-admin-b")])
    got = {key: auth.credential(key) for key in ("env-key", "icg-admin-a", "icg-admin-b")}
    assert {k: (c.id, c.who) if c else None for k, c in got.items()} == {
        "env-key": ("env", "environment key"),
        "icg-admin-a": ("1", "alice (admin key #1)"),
        "icg-admin-b": ("2", "bob (admin key #2)"),
    }


def test_a_session_names_its_key_and_ends_with_it() -> None:
    auth = AdminAuth("env-key", 60)
    alice, bob = stored(1, "alice", "icg-admin-a"), stored(2, "bob", "icg-admin-b")
    auth.set_stored([alice, bob])
    by_env, by_alice, by_bob = (
        auth.new_session(Credential.from_env("env-key")),
        auth.new_session(alice),
        auth.new_session(bob),
    )
    session = auth.session(by_alice)
    assert session is not None and (session.credential, session.who) == ("1", "alice (admin key #1)")
    # the key id is signed: a session cannot be moved onto another key
    _, expires, nonce, signature = by_alice.split(".")
    assert auth.session(f"2.{expires}.{nonce}.{signature}") is None
    assert auth.session(f"env.{expires}.{nonce}.{signature}") is None
    # revoking alice's key on this replica ends her sessions at once, and only hers
    auth.drop_stored(1)
    assert auth.session(by_alice) is None
    assert auth.session(by_bob) is not None and auth.session(by_env) is not None
    # on another replica, at its next read of the keys, which no longer holds bob's
    auth.set_stored([])
    assert auth.session(by_bob) is None and auth.session(by_env) is not None
    # a new environment key ends the environment key's sessions, not the stored keys'
    restarted = AdminAuth("new-env-key", 60)
    restarted.set_stored([alice])
    assert restarted.session(by_env) is None and restarted.session(by_alice) is not None


def test_the_csrf_token_is_per_session_and_dies_with_its_key() -> None:
    auth = AdminAuth("env-key", 60)
    alice = stored(1, "alice", "icg-admin-a")
    auth.set_stored([alice])
    mine, env = auth.session(auth.new_session(alice)), auth.session(env_session(auth, "env-key"))
    assert mine is not None and env is not None
    token = auth.csrf_token(mine)
    assert auth.csrf_ok(mine, token) and not auth.csrf_ok(env, token)
    auth.drop_stored(1)
    assert not auth.csrf_ok(mine, token) and not auth.csrf_ok(mine, "")


def test_stored_keys_are_read_again_after_a_few_seconds() -> None:
    clock = Clock()
    auth = AdminAuth(None, 60, clock, stored_ttl_s=5)
    assert auth.stored_stale()  # never read
    auth.set_stored([stored(1, "a", "icg-admin-a")])
    clock.now += 4.9
    assert not auth.stored_stale()
    clock.now += 0.2
    assert auth.stored_stale()
    auth.keep_stored()  # the database was away: keep the keys, try again later
    assert not auth.stored_stale() and auth.enabled
    clock.now -= 100  # the clock went back: read again rather than trust a stamp from the future
    assert auth.stored_stale()


def test_a_stored_keys_use_is_recorded_once_a_minute() -> None:
    clock = Clock()
    auth = AdminAuth("env-key", 60, clock)
    alice = stored(1, "alice", "icg-admin-a")
    assert auth.should_touch(alice) and not auth.should_touch(alice)
    clock.now += 61
    assert auth.should_touch(alice)
    assert not auth.should_touch(Credential.from_env("env-key"))  # not stored: nothing to record
