"""The LiteLLM proxy baseline's config and environment (no install, no network, no process)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from bench.litellm_proxy import (
    MASTER_KEY,
    Deployment,
    _kill_group,
    process_cpu_seconds,
    proxy_env,
    write_config,
)


def test_config_one_group_two_deployments(tmp_path):
    path = write_config(
        tmp_path / "c.yaml",
        [Deployment("sim-small", "http://127.0.0.1:8201/v1"), ("sim-large", "http://127.0.0.1:8202/v1")],
        "least-busy",
    )
    cfg = yaml.safe_load(path.read_text())
    assert [m["model_name"] for m in cfg["model_list"]] == ["sim", "sim"]
    assert cfg["model_list"][0]["litellm_params"] == {
        "model": "openai/sim-small",
        "api_base": "http://127.0.0.1:8201/v1",
        "api_key": "none",
    }
    assert cfg["model_list"][1]["litellm_params"]["model"] == "openai/sim-large"
    assert len({m["model_info"]["id"] for m in cfg["model_list"]}) == 2
    assert cfg["router_settings"]["routing_strategy"] == "least-busy"
    assert cfg["router_settings"]["num_retries"] == 0
    assert cfg["general_settings"] == {"master_key": MASTER_KEY}
    assert "database_url" not in cfg["general_settings"]


def test_config_without_master_key_needs_the_override(tmp_path):
    cfg = yaml.safe_load(
        write_config(
            tmp_path / "c.yaml", [("a", "http://x/v1")], "simple-shuffle", master_key=None
        ).read_text()
    )
    assert cfg["general_settings"] == {"dangerously_permit_weak_or_unset_master_key": True}


def test_unknown_strategy_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_config(tmp_path / "c.yaml", [("a", "http://x/v1")], "usage-based-routing")  # type: ignore[arg-type]


def test_env_is_offline_and_dbless():
    env = proxy_env({"DATABASE_URL": "postgres://x", "HTTPS_PROXY": "http://p", "PATH": "/bin"}, "ERROR")
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert env["LITELLM_MODE"] == "PRODUCTION"
    assert env["LITELLM_LOG"] == "ERROR"
    assert "DATABASE_URL" not in env and "HTTPS_PROXY" not in env
    assert env["PATH"] == "/bin"


def test_cpu_accounting_and_group_kill():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass\ntime.sleep(60)",
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while process_cpu_seconds(proc.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_cpu_seconds(proc.pid) >= 0.25
    finally:
        _kill_group(proc, grace_s=5)
    assert proc.returncode is not None  # ended (and reaped) by the SIGTERM to its group
