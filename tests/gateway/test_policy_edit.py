"""Checking and changing a policy text, as plain data: errors at their line and key, what changed, what
applies at once, and changes that keep the file's comments."""

from __future__ import annotations

import pytest

from icgate.gateway import policy_edit
from icgate.gateway.config import Policy
from icgate.gateway.policy_edit import PolicyTextError

TEXT = """\
# Two servers we run ourselves.
backends:
  - name: small
    tier: small
    model: openai/small
    api_base: http://127.0.0.1:8101/v1
  - name: large   # the good one
    tier: large
    model: openai/large
    api_base: http://127.0.0.1:8102/v1
router:
  threshold: 0.4
auth:
  required: false
"""


def issues_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyTextError) as caught:
        policy_edit.parse(text)
    return [(i.line, i.key, i.message) for i in caught.value.issues]


def test_a_valid_text_parses_to_the_same_policy_as_the_loader() -> None:
    import yaml

    assert policy_edit.parse(TEXT) == Policy.model_validate(yaml.safe_load(TEXT))


def test_a_value_out_of_range_is_reported_at_its_line_and_key() -> None:
    found = issues_of(TEXT.replace("threshold: 0.4", "threshold: 7"))
    assert len(found) == 1
    line, key, message = found[0]
    assert (line, key) == (12, "router.threshold")
    assert "less than or equal to 1" in message


def test_an_unknown_key_in_a_list_item_is_reported_at_its_own_line() -> None:
    text = TEXT.replace("    tier: large\n", "    tier: large\n    colour: blue\n")
    assert issues_of(text) == [(9, "backends.1.colour", "unknown key")]


def test_a_missing_key_is_reported_at_its_parent() -> None:
    text = TEXT.replace("    model: openai/large\n", "")
    assert issues_of(text) == [(7, "backends.1.model", "Field required")]


def test_broken_yaml_is_reported_at_its_line() -> None:
    found = issues_of(TEXT.replace("auth:\n  required: false", "auth:\n  required: [false"))
    assert found[0][0] is not None and found[0][0] >= 14
    assert found[0][2].startswith("not valid YAML")


def test_a_duplicate_key_is_refused_rather_than_silently_overwritten() -> None:
    found = issues_of(TEXT + "router:\n  threshold: 0.9\n")
    assert found[0][2].startswith("not valid YAML") and "duplicate" in found[0][2]


def test_a_model_level_rule_has_no_line_but_says_what_is_wrong() -> None:
    found = issues_of(TEXT.replace("tier: large", "tier: huge"))
    assert found[0][0] is None and "huge" in found[0][2]


def test_changes_are_split_into_live_and_restart() -> None:
    base = policy_edit.parse(TEXT)
    edited = TEXT.replace("threshold: 0.4", "threshold: 0.6").replace(
        "http://127.0.0.1:8102/v1", "http://127.0.0.1:9999/v1"
    )
    checked = policy_edit.check(edited + "admission:\n  tenants:\n    acme: {budget_usd: 5}\n", base)
    assert checked.ok
    assert checked.live == ["admission.tenants.acme", "router.threshold"]
    assert checked.restart == ["backends"]
    assert checked.restart_sections == ["backends"]


def test_no_change_is_no_change() -> None:
    checked = policy_edit.check(TEXT.replace("# Two servers", "# Our two servers"), policy_edit.parse(TEXT))
    assert checked.ok and not checked.changed


def test_merging_live_changes_keeps_what_the_command_line_set() -> None:
    running = policy_edit.parse(TEXT).model_copy(
        update={"server": policy_edit.parse(TEXT).server.model_copy(update={"root_path": "/llm"})}
    )
    new = policy_edit.parse(TEXT.replace("threshold: 0.4", "threshold: 0.7"))
    merged = policy_edit.merged(running, new, ["router.threshold"])
    assert merged.router.threshold == 0.7
    assert merged.server.root_path == "/llm"


def test_merging_a_removed_key_removes_it() -> None:
    with_tenant = policy_edit.parse(TEXT + "admission:\n  tenants:\n    acme: {budget_usd: 5}\n")
    without = policy_edit.parse(TEXT)
    merged = policy_edit.merged(with_tenant, without, ["admission.tenants.acme"])
    assert "acme" not in merged.admission.tenants


def test_with_changes_keeps_comments_and_order() -> None:
    text = policy_edit.with_changes(
        TEXT,
        {"router.threshold": None, "router.strong_share": 0.25, "admission.tenants.acme.budget_usd": 5.0},
    )
    assert "# Two servers we run ourselves." in text and "# the good one" in text
    policy = policy_edit.parse(text)
    assert policy.router.threshold is None and policy.router.strong_share == 0.25
    assert policy.admission.tenants["acme"].budget_usd == 5.0
    assert text.index("backends:") < text.index("router:") < text.index("admission:")


def test_removing_what_is_not_there_changes_nothing() -> None:
    assert policy_edit.with_changes(TEXT, {"cache.tenants.acme": None}) == TEXT


def test_a_policy_given_as_an_object_is_written_out_and_reads_back_the_same() -> None:
    policy = policy_edit.parse(TEXT)
    assert policy_edit.parse(policy_edit.text_of(policy)) == policy


def test_the_diff_names_the_changed_line() -> None:
    out = policy_edit.diff(TEXT, TEXT.replace("threshold: 0.4", "threshold: 0.6"))
    assert "-  threshold: 0.4" in out and "+  threshold: 0.6" in out


def test_a_change_inside_a_list_or_a_value_is_refused_not_made_a_section() -> None:
    with pytest.raises(PolicyTextError) as refused:
        policy_edit.with_changes(TEXT, {"backends.0.timeout_s": 5})
    assert refused.value.issues[0].key == "backends"
    with pytest.raises(PolicyTextError):
        policy_edit.with_changes(TEXT, {"router.threshold.value": 5})
