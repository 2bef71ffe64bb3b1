"""`icgate admin create-key / list-keys / revoke-key`, called in-process against the database of a running
gateway that was started without ICGATE_ADMIN_KEY."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from icgate.gateway.cli import main as cli
from icgate.gateway.config import Policy
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[..., RunningGateway]


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ICGATE_DATABASE_URL", "ICGATE_DATA_DIR", "ICGATE_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def status_within(check: Callable[[], int], wanted: int, within_s: float = 8.0) -> None:
    """A running gateway re-reads the stored keys every 5 s."""
    deadline = time.monotonic() + within_s
    while (got := check()) != wanted:
        assert time.monotonic() < deadline, f"still {got}, not {wanted}"
        time.sleep(0.2)


def test_create_key_opens_a_running_console_and_revoke_key_closes_it(
    standins: Standins, start_gateway: StartGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    policy: Policy = standin_policy(standins, "http")
    gw = start_gateway(policy, data)
    requests = gw.url + "/admin/api/requests"
    assert httpx.get(requests, headers={"authorization": "Bearer x"}).status_code == 403  # no key yet: off

    code, out, err = run(capsys, "admin", "create-key", "--name", "ops", "--data-dir", str(data))
    assert code == 0, err
    key = out[-1]  # the key is the last line
    assert key.startswith("icg-admin-") and " " not in key and len(key) > 40
    assert out[-2].startswith("admin key id ") and "(ops)" in out[-2]
    key_id = out[-2].split()[3]
    assert key_id.isdigit()

    status_within(lambda: httpx.get(requests, headers={"authorization": f"Bearer {key}"}).status_code, 200)
    client = httpx.Client(base_url=gw.url, follow_redirects=False)
    login = client.post("/admin/login", data={"key": key})
    assert login.status_code == 303 and login.headers["location"] == "/admin"
    assert client.get("/admin/keys").status_code == 200

    code, out, _ = run(capsys, "admin", "list-keys", "--data-dir", str(data))
    assert code == 0 and key not in "\n".join(out)
    assert out[0].split("\t") == ["id", "name", "starts with", "created", "last used", "state"]
    [row] = [line.split("\t") for line in out[1:]]
    assert (row[0], row[1], row[5]) == (key_id, "ops", "active")
    assert key.startswith(row[2]) and len(row[2]) < len(key)
    assert row[4] != "never"  # used to log in

    code, out, _ = run(capsys, "admin", "revoke-key", key_id, "--data-dir", str(data))
    assert code == 0 and out[-1] == f"admin key {key_id} revoked"
    # another process revoked it: refused within the key cache's few seconds, the session too
    status_within(lambda: httpx.get(requests, headers={"authorization": f"Bearer {key}"}).status_code, 403)
    assert (
        client.get("/admin/keys").status_code == 403
    )  # its session too: no admin key left, the console is off
    assert client.post("/admin/login", data={"key": key}).status_code == 401
    code, out, _ = run(capsys, "admin", "list-keys", "--data-dir", str(data))
    assert out[1].split("\t")[5] == "revoked"


def test_revoke_key_of_an_unknown_id_and_a_bad_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "data")
    code, _, err = run(capsys, "admin", "revoke-key", "999", "--data-dir", data)
    assert code == 1 and "no admin key with id 999" in err
    code, out, err = run(capsys, "admin", "create-key", "--name", "x" * 65, "--data-dir", data)
    assert code == 2 and "name" in err and out == []
