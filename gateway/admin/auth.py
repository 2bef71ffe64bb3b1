"""Who may use the console: the holder of an admin key, never a tenant.

Admin keys are the key in the gateway's environment (`admin.key_env`, default `ICGATE_ADMIN_KEY`) and
the unrevoked keys made by `icgate admin create-key` (stored as SHA-256 digests, `store.admin_keys`).
This module is plain logic: it holds the stored keys' digests in memory, handed in by whoever reads the
database (`deps`), and says when they are old enough to re-read (`stored_ttl_s`, 5 s), so no admin
request waits on the database for them more than once per that time.

Scripts send a key as a bearer token. Browsers log in once with one and then carry a session cookie
naming the key that opened it: `<key id>.<expiry>.<nonce>.<hmac>`, the id `env` for the environment key.
The HMAC is keyed by a hash of that key's digest. So a session survives a restart and works on every
replica that knows the same key, needs no table, and dies when its key goes: a revoked stored key
ends its sessions, a changed environment key ends the environment key's sessions. The CSRF token of a
session is a second HMAC over its nonce: pages send it back on every change.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SESSION_COOKIE = "icgate_admin"
ENV_KEY_ID = "env"
STORED_TTL_S = 5.0  # how stale the stored keys may be on a replica that did not revoke one
TOUCH_EVERY_S = 60.0  # a stored key's `last_used_at`: once a minute is precise enough


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _session_secret(digest: bytes) -> bytes:
    return hashlib.sha256(b"icgate-admin-session\0" + digest).digest()


@dataclass(frozen=True)
class Credential:
    """A key the console accepts: its id (`env` or a stored key's id), the name changes are recorded
    under, and its digest, never the key."""

    id: str
    who: str
    digest: bytes = field(repr=False)

    @classmethod
    def from_env(cls, key: str) -> Credential:
        return cls(ENV_KEY_ID, "environment key", _digest(key))

    @classmethod
    def stored(cls, key_id: int, name: str, key_hash: str) -> Credential:
        """A stored key, from its row: `key_hash` is the hex SHA-256 `store.admin_keys` keeps."""
        return cls(str(key_id), f"{name} (admin key #{key_id})", bytes.fromhex(key_hash))

    @property
    def stored_id(self) -> int | None:
        return None if self.id == ENV_KEY_ID else int(self.id)


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int
    credential: str  # the id of the key that opened it
    who: str


class AdminAuth:
    def __init__(
        self,
        key: str | None,
        session_s: float,
        clock: Callable[[], float] = time.time,
        stored_ttl_s: float = STORED_TTL_S,
    ) -> None:
        self._env = Credential.from_env(key) if key else None
        self._stored: dict[str, Credential] = {}
        self._stored_at: float | None = None  # when the stored keys were last handed in
        self._touched: dict[str, float] = {}
        self.session_s = session_s
        self.clock = clock
        self.stored_ttl_s = stored_ttl_s

    @property
    def enabled(self) -> bool:
        """On with the environment key or any unrevoked stored key (as last read)."""
        return self._env is not None or bool(self._stored)

    # --- the stored keys, as read by the caller ---------------------------------------------------------

    def stored_stale(self) -> bool:
        """Whether the stored keys should be read again (never read, or read `stored_ttl_s` ago)."""
        now = self.clock()
        return self._stored_at is None or not (self._stored_at <= now < self._stored_at + self.stored_ttl_s)

    def set_stored(self, credentials: Iterable[Credential]) -> None:
        self._stored = {c.id: c for c in credentials if c.id != ENV_KEY_ID}
        self._stored_at = self.clock()

    def keep_stored(self) -> None:
        """The stored keys could not be read: keep the last ones until the next try."""
        self._stored_at = self.clock()

    def drop_stored(self, key_id: int) -> None:
        """A key revoked on this replica stops working here at once (others: within `stored_ttl_s`)."""
        self._stored.pop(str(key_id), None)

    def should_touch(self, credential: Credential) -> bool:
        """Whether to record a stored key's use now (at most once a minute per key and process)."""
        if credential.stored_id is None:
            return False
        now = self.clock()
        last = self._touched.get(credential.id)
        if last is not None and last <= now < last + TOUCH_EVERY_S:
            return False
        self._touched[credential.id] = now
        return True

    # --- keys and sessions ------------------------------------------------------------------------------

    def _credentials(self) -> list[Credential]:
        return ([self._env] if self._env is not None else []) + list(self._stored.values())

    def credential(self, presented: str) -> Credential | None:
        """The key `presented` is, if any. Compared as digests, each in constant time and all of them
        every time: neither the key's length nor which key it nearly matched leaks."""
        digest = _digest(presented)
        found = None
        for candidate in self._credentials():
            if hmac.compare_digest(digest, candidate.digest):
                found = candidate
        return found

    def is_admin_key(self, presented: str) -> bool:
        return self.credential(presented) is not None

    def _by_id(self, credential_id: str) -> Credential | None:
        if credential_id == ENV_KEY_ID:
            return self._env
        return self._stored.get(credential_id)

    @staticmethod
    def _sign(credential: Credential, text: str) -> str:
        return hmac.new(_session_secret(credential.digest), text.encode("utf-8"), hashlib.sha256).hexdigest()

    def new_session(self, credential: Credential) -> str:
        """A cookie value for a browser that just logged in with `credential`."""
        expires = int(self.clock() + self.session_s)
        payload = f"{credential.id}.{expires}.{secrets.token_urlsafe(18)}"
        return f"{payload}.{self._sign(credential, payload)}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie proves, if its key is still an admin key and it is unexpired."""
        if not cookie or cookie.count(".") != 3:
            return None
        credential_id, expires, nonce, signature = cookie.split(".")
        credential = self._by_id(credential_id)
        if credential is None:
            return None
        if not hmac.compare_digest(signature, self._sign(credential, f"{credential_id}.{expires}.{nonce}")):
            return None
        try:
            until = int(expires)
        except ValueError:
            return None
        return Session(nonce, until, credential.id, credential.who) if until > self.clock() else None

    def csrf_token(self, session: Session) -> str:
        credential = self._by_id(session.credential)
        # A session whose key went meanwhile gets a token nothing matches.
        return self._sign(credential, f"csrf:{session.nonce}") if credential else ""

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        expected = self.csrf_token(session)
        return bool(token) and bool(expected) and hmac.compare_digest(token or "", expected)
