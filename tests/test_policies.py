"""Every shipped policy file is valid: a broken example is a broken promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from icgate.gateway.config import load_policy

POLICIES = sorted((Path(__file__).resolve().parent.parent / "policies").rglob("*.yaml"))


def test_policies_are_shipped() -> None:
    names = {p.name for p in POLICIES}
    assert {"default.yaml", "minimal.yaml", "vllm.yaml", "cloud.yaml"} <= names


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_shipped_policy_loads(path: Path) -> None:
    policy = load_policy(path)
    assert policy.routed_models
    for backend in policy.backends:
        assert policy.fallback_for(backend) is None or policy.fallback_for(backend) is not backend


def test_default_policy_is_fully_local() -> None:
    policy = load_policy(POLICIES[[p.name for p in POLICIES].index("default.yaml")])
    assert all(b.launch is not None for b in policy.backends)
    assert all((b.api_base or "").startswith("http://127.0.0.1:") for b in policy.backends)
    assert {b.tier for b in policy.backends} == {"small", "large"}
