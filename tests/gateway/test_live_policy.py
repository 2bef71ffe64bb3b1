"""A policy changed while the gateway runs: at once where it is read per request, through the file for
the rest; recorded as versions; taken by another replica started from the same file; and in force again
after a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from icgate.gateway import policy_edit
from icgate.gateway.config import Policy
from icgate.gateway.live_policy import PolicyRejected
from icgate.gateway.store import keys, policy_versions
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[..., RunningGateway]
T = TypeVar("T")


def policy_file(folder: Path, policy: Policy) -> Path:
    """The policy as a file an operator would keep: a comment, and `auth` written out."""
    path = folder / "policy.yaml"
    text = "# our gateway, with comments kept\n" + policy_edit.text_of(policy)
    if "\nauth:" not in text:
        text += "auth:\n  required: false\n"
    path.write_text(text)
    return path


def chat(gw: RunningGateway, model: str = "auto", key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=30,
    )


def on_loop(gw: RunningGateway, coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the gateway's own loop (its server thread's, where its watcher runs)."""
    task = gw.gateway.live_policy._task
    assert task is not None
    return asyncio.run_coroutine_threadsafe(coro, task.get_loop()).result(30)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


@pytest.fixture
def policy(standins: Standins) -> Policy:
    return standin_policy(standins, "http", admin={"policy_poll_s": 0.1})


def test_a_live_change_applies_at_once_and_is_recorded(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    gw = start_gateway(policy, policy_path=path)
    assert chat(gw, "fast").status_code == 404  # not a routed model yet
    live = gw.gateway.live_policy
    applied = on_loop(
        gw, live.apply_changes({"routed_models": ["auto", "fast"]}, "ops", "console", "add fast")
    )
    assert chat(gw, "fast").status_code == 200
    assert applied.in_force and applied.version.live == ["routed_models"] and applied.version.restart == []
    assert "# our gateway, with comments kept" in path.read_text()  # written back, comments and all
    assert policy_edit.parse(path.read_text()).routed_models == ["auto", "fast"]
    history = on_loop(gw, live.history(10))
    assert [(v.source, v.author, v.note) for v in history] == [
        ("console", "ops", "add fast"),
        ("file", str(path), "started with this policy"),
    ]


def test_a_setting_read_at_start_is_written_for_the_restart_and_not_applied(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    gw = start_gateway(policy, policy_path=path)
    live = gw.gateway.live_policy
    applied = on_loop(
        gw, live.apply_changes({"auth.required": True, "server.max_messages": 10}, "ops", "console", "")
    )
    assert not applied.in_force
    assert applied.version.live == ["auth.required"] and applied.version.restart == ["server.max_messages"]
    assert chat(gw).status_code == 401  # the live part is in force
    assert gw.gateway.policy.server.max_messages == policy.server.max_messages  # the rest waits
    assert policy_edit.parse(path.read_text()).server.max_messages == 10
    again = live.check(path.read_text())
    assert again.restart == ["server.max_messages"] and again.live == []  # still waiting, still said


def test_a_read_only_file_refuses_what_needs_a_restart_at_its_line(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    path.chmod(0o444)
    gw = start_gateway(policy, policy_path=path)
    live = gw.gateway.live_policy
    text = path.read_text().replace("- name: small\n", "- name: small\n  max_concurrent: 8\n", 1)
    assert text != path.read_text()
    with pytest.raises(PolicyRejected) as refused:
        on_loop(gw, live.apply_text(text, "ops", "console"))
    issue = refused.value.issues[0]
    assert issue.key == "backends" and "read-only" in issue.message
    assert issue.line == text.splitlines().index("backends:") + 1
    assert on_loop(gw, live.history(10))[0].source == "file"  # nothing recorded
    # A live change is still taken, kept in the database only.
    applied = on_loop(gw, live.apply_changes({"auth.required": True}, "ops", "console", ""))
    assert applied.in_force and chat(gw).status_code == 401
    assert "required: true" not in path.read_text()


def test_an_invalid_change_is_refused_and_nothing_changes(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    before = path.read_text()
    gw = start_gateway(policy, policy_path=path)
    live = gw.gateway.live_policy
    with pytest.raises(PolicyRejected) as refused:
        on_loop(gw, live.apply_changes({"router.threshold": 3}, "ops", "router-knob", ""))
    assert refused.value.issues[0].key == "router.threshold"
    with pytest.raises(PolicyRejected, match="nothing to apply"):
        on_loop(gw, live.apply_text(before, "ops", "console"))
    assert path.read_text() == before and len(on_loop(gw, live.history(10))) == 1


def test_rollback_applies_an_earlier_version_again(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    gw = start_gateway(policy, policy_path=path)
    live = gw.gateway.live_policy
    first = on_loop(gw, live.history(1))[0]
    on_loop(gw, live.apply_changes({"auth.required": True}, "ops", "console", ""))
    assert chat(gw).status_code == 401
    back = on_loop(gw, live.rollback(first.id, "ops"))
    assert back.version.source == "rollback" and back.version.live == ["auth.required"]
    assert chat(gw).status_code == 200 and path.read_text() == first.text
    with pytest.raises(PolicyRejected, match="no policy version 999"):
        on_loop(gw, live.rollback(999, "ops"))


def test_a_read_only_files_live_changes_survive_a_restart_and_a_new_file_wins(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    path.chmod(0o444)
    data = tmp_path / "data"
    gw = start_gateway(policy, data, policy_path=path)
    on_loop(gw, gw.gateway.live_policy.apply_changes({"auth.required": True}, "ops", "console", ""))
    gw.stop()
    again = start_gateway(policy, data, policy_path=path)  # the same read-only file
    assert chat(again).status_code == 401
    assert again.gateway.live_policy.in_force_id == on_loop(again, again.gateway.live_policy.history(1))[0].id
    again.stop()
    path.chmod(0o644)
    path.write_text(path.read_text() + "# edited by hand\n")  # a new file: it is the policy
    third = start_gateway(policy, data, policy_path=path)
    assert chat(third).status_code == 200
    newest = on_loop(third, third.gateway.live_policy.history(1))[0]
    assert newest.source == "file" and newest.text.endswith("# edited by hand\n")


def test_another_replica_of_the_same_file_takes_a_live_change(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    data = tmp_path / "shared"
    one = start_gateway(policy, data, policy_path=path)
    two = start_gateway(policy, data, policy_path=path)
    on_loop(one, one.gateway.live_policy.apply_changes({"auth.required": True}, "ops", "console", ""))
    wait_until(lambda: two.gateway.policy.auth.required, "the other replica takes the change")
    assert chat(two).status_code == 401


def test_a_version_from_another_file_is_not_taken(
    policy: Policy, start_gateway: StartGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, policy)
    gw = start_gateway(policy, policy_path=path)
    engine = gw.gateway.engine
    assert engine is not None
    other = policy_edit.with_changes(path.read_text(), {"auth.required": True})
    policy_versions.record(engine, other, "elsewhere", "file", "", "f" * 64, [], [])
    assert on_loop(gw, gw.gateway.live_policy.poll()) is False
    assert chat(gw).status_code == 200


def test_without_a_file_live_changes_are_kept_and_restart_ones_refused(
    policy: Policy, start_gateway: StartGateway
) -> None:
    gw = start_gateway(policy)
    live = gw.gateway.live_policy
    assert live.path is None and not live.writable
    on_loop(gw, live.apply_changes({"auth.required": True}, "ops", "console", ""))
    assert chat(gw).status_code == 401
    with pytest.raises(PolicyRejected, match="there is no policy file"):
        on_loop(gw, live.apply_changes({"server.max_messages": 5}, "ops", "console", ""))


def test_a_budget_set_live_counts_what_the_tenant_spent_before(
    standins: Standins, start_gateway: StartGateway, tmp_path: Path
) -> None:
    priced = standin_policy(standins, "http", admin={"policy_poll_s": 0.1})
    priced = priced.model_copy(
        update={"backends": [b.model_copy(update={"cost_per_1k_input": 1000.0}) for b in priced.backends]}
    )
    path = policy_file(tmp_path, priced)
    gw = start_gateway(priced, policy_path=path)
    assert gw.gateway.engine is not None
    key = keys.create_key(gw.gateway.engine, "acme").key
    assert chat(gw, key=key).status_code == 200  # costs something: 1000 USD per 1k prompt tokens
    writer = gw.gateway.log_writer
    wait_until(lambda: writer is not None and writer.written == 1, "logged")
    on_loop(
        gw, gw.gateway.live_policy.apply_changes({"admission.tenants.acme.budget_usd": 0.5}, "ops", "", "")
    )
    limiter = gw.gateway.pipeline.limiter
    limits = gw.gateway.policy.admission.tenants["acme"]
    assert limiter is not None
    wait_until(lambda: limiter.spent("acme", limits) >= 0.5, "the spend before the budget is read")
    assert chat(gw, key=key).status_code == 429
