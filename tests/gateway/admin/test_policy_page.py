"""The policy page and its JSON API over real HTTP: check as you type (issues at their line and key),
apply, the diff, versions and rollback; CSRF on every change."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from icgate.gateway import policy_edit
from tests.gateway.admin.conftest import ADMIN_KEY, logged_in
from tests.gateway.conftest import RunningGateway, Standins, standin_policy
from tests.gateway.test_live_policy import StartGateway, policy_file

BEARER = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def editable(
    standins: Standins, start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[RunningGateway, Path]:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    policy = standin_policy(standins, "http")
    path = policy_file(tmp_path, policy)
    return start_gateway(policy, policy_path=path), path


def test_the_api_shows_the_policy_in_force_and_its_versions(editable: tuple[RunningGateway, Path]) -> None:
    gw, path = editable
    body = httpx.get(gw.url + "/admin/api/policy", headers=BEARER).json()
    assert body["text"] == path.read_text() and body["file"] == str(path) and body["file_writable"]
    assert [v["source"] for v in body["versions"]] == ["file"]
    assert body["versions"][0]["in_force"] and "text" not in body["versions"][0]
    assert "router.threshold" in body["live_paths"]


def test_check_reports_issues_at_their_line_and_changes_by_kind(
    editable: tuple[RunningGateway, Path],
) -> None:
    gw, path = editable
    text = path.read_text()
    broken = text.replace("auth:\n  required: false\n", "auth:\n  required: false\n  colour: blue\n")
    assert broken != text
    body = httpx.post(gw.url + "/admin/api/policy/check", json={"text": broken}, headers=BEARER).json()
    line = broken.splitlines().index("  colour: blue") + 1
    assert body["ok"] is False
    assert body["issues"] == [{"line": line, "key": "auth.colour", "message": "unknown key"}]
    fine = policy_edit.with_changes(text, {"auth.required": True, "server.max_messages": 9})
    body = httpx.post(gw.url + "/admin/api/policy/check", json={"text": fine}, headers=BEARER).json()
    assert body["ok"] and body["live"] == ["auth.required"] and body["restart"] == ["server.max_messages"]
    assert body["restart_sections"] == ["server"]
    assert "+  required: true" in body["diff"]


def test_apply_refuses_an_error_at_its_line_and_applies_a_fix(editable: tuple[RunningGateway, Path]) -> None:
    gw, path = editable
    text = path.read_text()
    bad = text.replace("auth:\n  required: false\n", "auth:\n  required: maybe\n")
    resp = httpx.post(gw.url + "/admin/api/policy", json={"text": bad}, headers=BEARER)
    line = bad.splitlines().index("  required: maybe") + 1
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["message"].startswith(f"Policy not applied: line {line}: auth.required:")
    assert error["issues"][0]["line"] == line and error["param"] == "text"
    assert path.read_text() == text
    good = text.replace("auth:\n  required: false\n", "auth:\n  required: true\n")
    resp = httpx.post(gw.url + "/admin/api/policy", json={"text": good, "note": "lock it"}, headers=BEARER)
    assert resp.status_code == 200 and resp.json()["in_force"]
    assert resp.json()["version"]["note"] == "lock it"
    assert (
        httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        ).status_code
        == 401
    )
    first = httpx.get(gw.url + "/admin/api/policy", headers=BEARER).json()["versions"][-1]["id"]
    back = httpx.post(gw.url + f"/admin/api/policy/versions/{first}/rollback", headers=BEARER)
    assert back.status_code == 200 and back.json()["version"]["source"] == "rollback"
    assert path.read_text() == text
    old = httpx.get(gw.url + f"/admin/api/policy/versions/{first}", headers=BEARER).json()
    assert old["text"] == text and not old["in_force"]
    assert httpx.get(gw.url + "/admin/api/policy/versions/999", headers=BEARER).status_code == 404


def test_changes_from_a_session_need_the_csrf_token(editable: tuple[RunningGateway, Path]) -> None:
    gw, path = editable
    client = logged_in(gw)
    good = path.read_text().replace("required: false", "required: true")
    assert client.post("/admin/api/policy", json={"text": good}).status_code == 403
    assert client.post("/admin/policy/apply", data={"text": good}).status_code == 403
    assert client.post("/admin/policy/rollback", data={"version": "1"}).status_code == 403
    assert path.read_text() != good
    page = client.get("/admin/policy")
    token = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    applied = client.post("/admin/policy/apply", data={"text": good, "csrf": token, "note": "from the page"})
    assert applied.status_code == 303 and path.read_text() == good


def test_the_page_checks_without_a_script_and_refuses_at_the_line(
    editable: tuple[RunningGateway, Path],
) -> None:
    gw, path = editable
    client = logged_in(gw)
    page = client.get("/admin/policy")
    assert page.status_code == 200 and 'id="editor"' in page.text and "in force" in page.text
    token = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    bad = path.read_text().replace("auth:\n  required: false\n", "auth:\n  required: false\n  colour: blue\n")
    line = bad.splitlines().index("  colour: blue") + 1
    checked = client.post("/admin/policy/check", data={"text": bad})
    assert (
        checked.status_code == 200 and f"line {line}, <code>auth.colour</code>: unknown key" in checked.text
    )
    refused = client.post("/admin/policy/apply", data={"text": bad, "csrf": token})
    assert refused.status_code == 400 and f'data-line="{line}"' in refused.text
    assert "colour: blue" in refused.text  # the text as edited stays in the editor
    missing = client.post("/admin/policy/rollback", data={"version": "x", "csrf": token})
    assert missing.status_code == 400 and "choose a version" in missing.text


def test_a_tenant_key_is_refused_on_the_policy_api(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(standin_policy(standins, "http"))
    resp = httpx.post(
        gw.url + "/admin/api/policy/check", json={"text": "x"}, headers={"authorization": "Bearer sk-tenant"}
    )
    assert resp.status_code == 401
