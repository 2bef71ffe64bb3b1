"""The policy schema: what it accepts, what it refuses, and how it answers questions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from icgate.gateway.config import DEFAULT_POLICY, Policy, PolicyError, load_policy

MINIMAL = """\
backends:
  - name: small
    tier: small
    model: openai/smollm2-135m
    api_base: http://127.0.0.1:8101/v1
  - name: large
    tier: large
    model: openai/gemma-3-270m
    api_base: http://127.0.0.1:8102/v1
routed_models: [auto]
auth:
  required: false
"""

POLICIES = DEFAULT_POLICY.parent


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def two_backends(**top: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "backends": [
            {"name": "s1", "tier": "small", "model": "openai/s"},
            {"name": "s2", "tier": "small", "model": "openai/s"},
            {"name": "l1", "tier": "large", "model": "openai/l"},
            {"name": "l2", "tier": "large", "model": "openai/l"},
        ]
    }
    raw.update(top)
    return raw


# --- accepted -----------------------------------------------------------------------------------


def test_minimal_policy_is_accepted_as_written(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, MINIMAL))
    assert [(b.name, b.tier, b.model, b.api_base) for b in policy.backends] == [
        ("small", "small", "openai/smollm2-135m", "http://127.0.0.1:8101/v1"),
        ("large", "large", "openai/gemma-3-270m", "http://127.0.0.1:8102/v1"),
    ]
    assert policy.routed_models == ["auto"]
    assert policy.auth.required is False
    assert policy.fallback_backend is None
    assert all(b.mode == "chat" and b.launch is None and b.api_key_env is None for b in policy.backends)


def test_shipped_default_policy_loads() -> None:
    policy = load_policy(DEFAULT_POLICY)
    large = policy.backend("large")
    assert large is not None and large.mode == "completion"
    assert large.stop == ["\n", "Q:"]
    assert {b.name for b in policy.backends} == {"small", "large"}
    assert all(b.launch is not None for b in policy.backends)
    assert policy.router.large_if_prompt_tokens_over == 1500


def test_shipped_minimal_policy_loads() -> None:
    policy = load_policy(POLICIES / "minimal.yaml")
    assert [b.name for b in policy.backends] == ["small", "large"]
    assert policy.routed_models == ["auto"]


def test_issue5_admission_contract_is_accepted(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    api_base: http://127.0.0.1:8101/v1\n",
        "    api_base: http://127.0.0.1:8101/v1\n    max_concurrent: 2\n",
    )
    text += "admission:\n  ttft_slo_ms: 1500\n"
    policy = load_policy(write(tmp_path, text))
    small = policy.backend("small")
    assert small is not None and small.max_concurrent == 2
    assert policy.admission.ttft_slo_ms == 1500


# --- refused: unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "dotted"),
    [
        ("routed_modles: [auto]\n", "routed_modles"),
        ("auth:\n  requried: true\n", "auth.requried"),
        ("admission:\n  ttft_slo: 1500\n", "admission.ttft_slo"),
    ],
)
def test_unknown_top_level_and_section_keys_are_named(tmp_path: Path, extra: str, dotted: str) -> None:
    text = MINIMAL.replace("auth:\n  required: false\n", "") + extra
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, text))
    message = str(info.value)
    assert f"{dotted}: unknown key" in message
    assert str(tmp_path / "policy.yaml") in message


def test_unknown_backend_key_is_named_with_its_index(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    api_base: http://127.0.0.1:8102/v1\n", "    api_bse: http://127.0.0.1:8102/v1\n"
    )
    with pytest.raises(PolicyError, match=r"backends\.1\.api_bse: unknown key"):
        load_policy(write(tmp_path, text))


def test_unknown_launch_key_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    api_base: http://127.0.0.1:8101/v1\n",
        "    api_base: http://127.0.0.1:8101/v1\n    launch:\n      model_file: x.gguf\n      n_thread: 2\n",
    )
    with pytest.raises(PolicyError, match=r"backends\.0\.launch\.n_thread: unknown key"):
        load_policy(write(tmp_path, text))


# --- refused: inconsistent references --------------------------------------------------------------


def test_duplicate_backend_names_are_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - name: large\n", "  - name: small\n")
    with pytest.raises(PolicyError, match=r"duplicate backend names: \['small'\]"):
        load_policy(write(tmp_path, text))


def test_routed_name_clashing_with_backend_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("routed_models: [auto]", "routed_models: [auto, large]")
    with pytest.raises(PolicyError, match=r"routed_models \['large'\] clash with backend names"):
        load_policy(write(tmp_path, text))


def test_unknown_fallback_backend_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + "fallback_backend: huge\n"
    with pytest.raises(PolicyError, match="fallback_backend 'huge' is not a backend name"):
        load_policy(write(tmp_path, text))


def test_policy_without_backends_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="backends"):
        load_policy(write(tmp_path, "backends: []\n"))


# --- refused: unreadable files ---------------------------------------------------------------------


def test_bad_yaml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "backends: [\n  - name: small\n")
    with pytest.raises(PolicyError, match="not valid YAML") as info:
        load_policy(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "a plain string\n", ""])
def test_non_mapping_yaml_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(PolicyError, match="must be a YAML mapping"):
        load_policy(write(tmp_path, text))


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="cannot read policy file") as info:
        load_policy(path)
    assert str(path) in str(info.value)


# --- questions a policy answers --------------------------------------------------------------------


def test_fallback_defaults_to_first_backend_of_another_tier() -> None:
    policy = Policy.model_validate(two_backends())
    s1, s2, l1, l2 = (policy.backend(n) for n in ("s1", "s2", "l1", "l2"))
    assert s1 and s2 and l1 and l2
    assert policy.fallback_for(s1) == l1
    assert policy.fallback_for(s2) == l1
    assert policy.fallback_for(l2) == s1


def test_fallback_uses_configured_backend_but_never_itself() -> None:
    policy = Policy.model_validate(two_backends(fallback_backend="l2"))
    s1, l1, l2 = (policy.backend(n) for n in ("s1", "l1", "l2"))
    assert s1 and l1 and l2
    assert policy.fallback_for(s1) == l2
    assert policy.fallback_for(l1) == l2
    assert policy.fallback_for(l2) is None


def test_no_fallback_with_a_single_tier() -> None:
    policy = Policy.model_validate({"backends": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]})
    a = policy.backend("a")
    assert a is not None and policy.fallback_for(a) is None


def test_tier_lists_backends_in_policy_order() -> None:
    policy = Policy.model_validate(two_backends())
    assert [b.name for b in policy.tier("large")] == ["l1", "l2"]
    assert policy.tier("medium") == []
    assert policy.backend("nope") is None


def test_database_url_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICGATE_DATABASE_URL", raising=False)
    plain = Policy.model_validate(two_backends())
    configured = Policy.model_validate(two_backends(database={"url": "postgresql://db/policy"}))

    assert plain.database_url(tmp_path) == f"sqlite:///{tmp_path / 'icgate.db'}"
    assert configured.database_url(tmp_path) == "postgresql://db/policy"

    monkeypatch.setenv("ICGATE_DATABASE_URL", "postgresql://db/env")
    assert plain.database_url(tmp_path) == "postgresql://db/env"
    assert configured.database_url(tmp_path) == "postgresql://db/env"


def test_api_key_comes_from_the_named_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-not-in-the-policy-0123456789"
    monkeypatch.setenv("ICGATE_TEST_BACKEND_KEY", secret)
    text = MINIMAL.replace(
        "    api_base: http://127.0.0.1:8101/v1\n",
        "    api_base: http://127.0.0.1:8101/v1\n    api_key_env: ICGATE_TEST_BACKEND_KEY\n",
    )
    path = write(tmp_path, text)
    policy = load_policy(path)
    small, large = policy.backend("small"), policy.backend("large")
    assert small is not None and large is not None
    assert small.api_key() == secret
    assert large.api_key() is None
    assert secret not in path.read_text()
    assert secret not in policy.model_dump_json()
    assert secret not in repr(policy)

    monkeypatch.delenv("ICGATE_TEST_BACKEND_KEY")
    assert small.api_key() is None
