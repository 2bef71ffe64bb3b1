"""Stored admin keys over real HTTP: they open a console started without ICGATE_ADMIN_KEY, as a bearer
token and at the login page; revoked on this replica, they and their sessions are refused at once; and
no admin key reaches a log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from icgate.gateway.admin.auth import SESSION_COOKIE
from icgate.gateway.cli import main as cli
from icgate.gateway.store import admin_keys
from tests.gateway.admin.conftest import ADMIN_KEY
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[..., RunningGateway]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def eventually(check: Callable[[], bool], within_s: float = 8.0) -> None:
    """Stored keys are re-read every 5 s: what another process changed shows within that."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not within the key cache's few seconds"
        time.sleep(0.2)


@pytest.fixture
def keyless(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningGateway]:
    monkeypatch.delenv("ICGATE_ADMIN_KEY", raising=False)
    yield start_gateway(standin_policy(standins, "http"))


def test_a_stored_key_opens_a_console_started_without_an_environment_key(keyless: RunningGateway) -> None:
    gw = keyless
    assert gw.gateway.engine is not None
    off = httpx.get(gw.url + "/admin/api/requests", headers=bearer("anything"))
    assert off.status_code == 403 and off.json()["error"]["code"] == "admin_disabled"
    created = admin_keys.create_admin_key(gw.gateway.engine, "ops")
    eventually(
        lambda: httpx.get(gw.url + "/admin/api/requests", headers=bearer(created.key)).status_code == 200
    )
    assert httpx.get(gw.url + "/admin/api/requests", headers=bearer("icg-admin-guess")).status_code == 401

    client = httpx.Client(base_url=gw.url, follow_redirects=False)
    assert client.post("/admin/login", data={"key": "icg-admin-guess"}).status_code == 401
    login = client.post("/admin/login", data={"key": created.key, "next": "/admin/keys"})
    assert login.status_code == 303 and login.headers["location"] == "/admin/keys"
    assert client.cookies[SESSION_COOKIE].startswith(f"{created.key_id}.")  # the session names its key
    page = client.get("/admin/keys")
    assert page.status_code == 200 and f'id="admin-key-{created.key_id}"' in page.text
    assert created.key not in page.text
    listed = httpx.get(gw.url + "/admin/api/admin-keys", headers=bearer(created.key)).json()["data"]
    assert [(k["key_id"], k["name"], k["active"]) for k in listed] == [(created.key_id, "ops", True)]
    assert listed[0]["last_used_at"] is not None and created.key not in str(listed)


def test_revoking_a_stored_key_ends_it_and_its_sessions_at_once(keyless: RunningGateway) -> None:
    gw = keyless
    assert gw.gateway.engine is not None
    keep = admin_keys.create_admin_key(gw.gateway.engine, "keep")
    drop = admin_keys.create_admin_key(gw.gateway.engine, "drop")
    eventually(
        lambda: httpx.get(gw.url + "/admin/api/admin-keys", headers=bearer(drop.key)).status_code == 200
    )
    dropped, kept = httpx.Client(base_url=gw.url), httpx.Client(base_url=gw.url)
    assert dropped.post("/admin/login", data={"key": drop.key}, follow_redirects=False).status_code == 303
    assert kept.post("/admin/login", data={"key": keep.key}, follow_redirects=False).status_code == 303
    assert dropped.get("/admin/keys").status_code == 200

    revoked = httpx.post(f"{gw.url}/admin/api/admin-keys/{drop.key_id}/revoke", headers=bearer(keep.key))
    assert revoked.json() == {"key_id": drop.key_id, "revoked": True}
    # at once on this replica: the key, and the session it opened
    refused = httpx.get(gw.url + "/admin/api/admin-keys", headers=bearer(drop.key))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "not_admin"
    assert dropped.get("/admin/keys", follow_redirects=False).status_code == 303  # to the login page
    assert kept.get("/admin/keys").status_code == 200
    assert (
        httpx.post(f"{gw.url}/admin/api/admin-keys/999/revoke", headers=bearer(keep.key)).status_code == 404
    )


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_admin_keys_never_reach_a_log(
    standins: Standins,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Through create-key, login and bearer use, at DEBUG, with uvicorn's access log on."""
    monkeypatch.delenv("ICGATE_DATABASE_URL", raising=False)
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    caplog.set_level(logging.DEBUG)
    access = Captured()
    data = tmp_path / "data"
    gw = start_gateway(standin_policy(standins, "http", server={"access_log": True}), data)
    # uvicorn's own loggers do not propagate to the root, and it configured them as it started: listen to
    # them directly, from now on
    levels = {name: logging.getLogger(name).level for name in ("uvicorn.access", "uvicorn.error")}
    for name in levels:
        logging.getLogger(name).addHandler(access)
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        assert cli.main(["admin", "create-key", "--name", "ops", "--data-dir", str(data)]) == 0
        key = capsys.readouterr().out.splitlines()[-1]
        eventually(lambda: httpx.get(gw.url + "/admin/api/requests", headers=bearer(key)).status_code == 200)
        for secret in (key, ADMIN_KEY):
            client = httpx.Client(base_url=gw.url)
            assert (
                client.post("/admin/login", data={"key": secret}, follow_redirects=False).status_code == 303
            )
            assert client.get("/admin/keys").status_code == 200
            assert httpx.get(gw.url + "/admin/api/tenants", headers=bearer(secret)).status_code == 200
            assert httpx.get(gw.url + "/admin/api/tenants", headers={"x-api-key": secret}).status_code == 200
        assert httpx.post(gw.url + "/admin/login", data={"key": key + "-wrong"}).status_code == 401
    finally:
        for name, level in levels.items():
            logging.getLogger(name).removeHandler(access)
            logging.getLogger(name).setLevel(level)
    logged = "\n".join([caplog.text, *access.lines])
    assert any("/admin/login" in line for line in access.lines)  # the access log did run
    digest = admin_keys.hash_admin_key(key)
    for secret in (key, key[len(admin_keys.ADMIN_KEY_SCHEME) :], ADMIN_KEY, digest):
        assert secret not in logged
