"""Who may use the console: the holder of the admin key, never a tenant.

The key comes from the gateway's environment (`admin.key_env`, default `ICGATE_ADMIN_KEY`). Scripts send it
as a bearer token. Browsers log in once with it and then carry a session cookie: the cookie holds an
expiry, a random nonce and an HMAC over both, keyed by a hash of the admin key. So a session survives a
restart and works on every replica that has the same key, needs no table, and dies when the key changes.
The CSRF token of a session is a second HMAC over its nonce: pages send it back on every change.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "icgate_admin"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int


class AdminAuth:
    def __init__(self, key: str | None, session_s: float, clock: Callable[[], float] = time.time) -> None:
        self._key_digest = _digest(key) if key else None
        self._secret = (
            hashlib.sha256(b"icgate-admin-session\0" + key.encode("utf-8")).digest() if key else b""
        )
        self.session_s = session_s
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self._key_digest is not None

    def is_admin_key(self, presented: str) -> bool:
        """Compared as digests, in constant time: the key's length leaks nothing either."""
        return self._key_digest is not None and hmac.compare_digest(_digest(presented), self._key_digest)

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        """A cookie value for a browser that just logged in."""
        expires = int(self.clock() + self.session_s)
        payload = f"{expires}.{secrets.token_urlsafe(18)}"
        return f"{payload}.{self._sign(payload)}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie proves, if it is ours and unexpired."""
        if not self.enabled or not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{expires}.{nonce}")):
            return None
        try:
            until = int(expires)
        except ValueError:
            return None
        return Session(nonce, until) if until > self.clock() else None

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.nonce}")

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf_token(session))
