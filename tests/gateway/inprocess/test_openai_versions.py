"""The wrapped client against other openai SDK releases than the one installed.

litellm 1.106.2 allows `openai>=2.20.0,<3`; the suite runs on the version it resolves to. This runs the
contract tests (test_gateway.py) again in a subprocess whose import path puts openai 2.20.0 first: the
oldest release icgate's dependencies allow. It is installed once (`pip install --no-deps --target`) into
the venv, from the package index, as `make test` installs everything else. openai 3 cannot be installed
beside litellm 1.106.2 (docs/middleware.md); `sdk_on_httpx` keeps `wrap` from failing obscurely on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icgate.gateway.inprocess.gateway import sdk_on_httpx

ROOT = Path(__file__).resolve().parents[3]
OLDEST = "2.20.0"


def installed(version: str) -> Path:
    target = Path(sys.prefix) / f"openai-{version}"
    if not (target / "openai" / "__init__.py").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                f"openai=={version}",
            ],
            check=True,
        )
    return target


def test_the_contract_holds_on_the_oldest_openai_litellm_allows() -> None:
    target = installed(OLDEST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    probe = subprocess.run(
        [sys.executable, "-c", "import openai; print(openai.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == OLDEST, probe.stderr
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-cov",
            "tests/gateway/inprocess/test_gateway.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("version", "on_httpx"), [("2.20.0", True), ("2.54.0", True), ("3.0.0", False), ("3.57.0", False)]
)
def test_only_sdks_built_on_httpx_are_wrapped(version: str, on_httpx: bool) -> None:
    assert sdk_on_httpx(version) is on_httpx
