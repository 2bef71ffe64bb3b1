"""The console's credentials as plain logic: sessions, expiry, tampering, CSRF."""

from __future__ import annotations

from icgate.gateway.admin.auth import AdminAuth


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


def test_a_session_lasts_its_time_and_no_longer() -> None:
    clock = Clock()
    auth = AdminAuth("k", 60, clock)
    cookie = auth.new_session()
    assert auth.session(cookie) is not None
    clock.now += 59
    assert auth.session(cookie) is not None
    clock.now += 2
    assert auth.session(cookie) is None


def test_a_tampered_or_foreign_cookie_proves_nothing() -> None:
    auth = AdminAuth("k", 60)
    cookie = auth.new_session()
    expires, nonce, signature = cookie.split(".")
    assert auth.session(f"{int(expires) + 3600}.{nonce}.{signature}") is None  # a longer life, forged
    assert auth.session(AdminAuth("another key", 60).new_session()) is None  # the key changed: sessions die
    for junk in ("", "a.b", "a.b.c.d", "x.y.z"):
        assert auth.session(junk) is None


def test_the_csrf_token_belongs_to_its_session() -> None:
    auth = AdminAuth("k", 60)
    one, two = auth.session(auth.new_session()), auth.session(auth.new_session())
    assert one is not None and two is not None
    assert auth.csrf_ok(one, auth.csrf_token(one))
    assert not auth.csrf_ok(one, auth.csrf_token(two))
    assert not auth.csrf_ok(one, None)
