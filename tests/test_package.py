"""The wheel works on its own: built, installed into a fresh environment without the repository on its
path, it migrates a database and serves from any directory, with the policy and migrations it carries.

The fresh environment borrows the suite's third-party packages through a `.pth` line (a plain directory
entry: the editable install's finder in that directory is not run), so only icgate comes from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.harness import ServerThread, free_port
from bench.standin_backend import StandinBackend

REPO = Path(__file__).resolve().parents[1]
# The repository's folders that the wheel carries as `icgate/<folder>` (icgate/ links to them).
CODE_FOLDERS = ("gateway", "cache", "routers", "lengths")
# Never copied into the build: state, environments and build output.
JUNK_AT_ROOT = {".git", ".venv", "data", "build", "dist"}
JUNK_ANYWHERE = ("__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".litellm-venv")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site_packages: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def icgate(self) -> Path:
        return self.venv / "bin" / "icgate"


def _ignore(root: str, names: list[str]) -> set[str]:
    junk = {n for n in names if n in JUNK_ANYWHERE or n.endswith(".egg-info")}
    if Path(root) == REPO:
        junk |= JUNK_AT_ROOT & set(names)
    return junk


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def clean_env(venv: Path | None = None) -> dict[str, str]:
    """This process's environment without anything that would point icgate at the repository."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ICGATE_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    return env


def installed_files(site_packages: Path) -> set[str]:
    """Every file in the environment's site-packages except compiled bytecode."""
    return {
        str(p.relative_to(site_packages))
        for p in site_packages.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("package")
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree, and a build/ left
    # over from an older tree would put modules that no longer exist into the wheel.
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=_ignore)
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, source], root)
    (wheel,) = dist.glob("icgate-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root)
    python = venv / "bin" / "python"
    # pip runs inside the new environment (--python): the console script gets its interpreter, and
    # pip sees none of the suite's packages (the .pth below is written afterwards).
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], root)
    site_packages = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root).stdout.strip()
    )
    suite = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "zz_suite_dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(suite)))
    return Installed(wheel, venv, site_packages)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory that is neither the repository nor the environment."""
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def untouched(installed: Installed, elsewhere: Path) -> Iterator[None]:
    """Nothing a command does at run time writes into the installed package or its working directory."""
    before = installed_files(installed.site_packages)
    yield
    assert installed_files(installed.site_packages) == before
    assert not any(elsewhere.iterdir()), sorted(p.name for p in elsewhere.iterdir())


def test_the_wheel_holds_icgate_and_nothing_else(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"icgate", dist_info}  # no top-level gateway, cache, ...
    modules = {n for n in names if n.endswith(".py") and not n.startswith("icgate/migrations/")}
    # The package root's own modules (icgate/*.py: the links are folders), then every linked folder's.
    expected = {f"icgate/{p.name}" for p in (REPO / "icgate").glob("*.py")} | {
        f"icgate/{p.relative_to(REPO)}"
        for folder in CODE_FOLDERS
        for p in (REPO / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules == expected
    shipped = {
        f"icgate/{p.relative_to(REPO)}"
        for pattern in (
            "policies/*.yaml",
            "policies/examples/*.yaml",
            "migrations/env.py",
            "migrations/script.py.mako",
            "migrations/versions/*.py",
            "cache/artifacts/README.md",
            *(f"{folder}/artifacts/*.joblib" for folder in CODE_FOLDERS),
        )
        for p in REPO.glob(pattern)
    }
    assert "icgate/policies/default.yaml" in shipped
    assert any(n.startswith("icgate/migrations/versions/") for n in shipped)
    assert {"icgate/routers/artifacts/router.joblib", "icgate/cache/artifacts/hit_verifier.joblib"} <= shipped
    assert shipped <= names
    assert "icgate = icgate.gateway.cli.main:main" in entry_points


def test_icgate_imports_from_the_environment(installed: Installed, elsewhere: Path, untouched: None) -> None:
    probe = (
        "import json, icgate, icgate.gateway.config as c, icgate.gateway.store.db as db\n"
        "print(json.dumps([icgate.__file__, str(c.DEFAULT_POLICY), str(db.MIGRATIONS_DIR)]))"
    )
    module, policy, migrations = map(
        Path, json.loads(_run([installed.python, "-c", probe], elsewhere).stdout)
    )
    package = installed.site_packages / "icgate"
    assert module == package / "__init__.py"
    assert policy == package / "policies" / "default.yaml" and policy.is_file()
    assert policy.read_bytes() == (REPO / "policies" / "default.yaml").read_bytes()
    assert migrations == package / "migrations" and (migrations / "env.py").is_file()
    assert installed.icgate.read_text().splitlines()[0] == f"#!{installed.python}"


def test_db_upgrade_migrates_a_new_database(
    installed: Installed, elsewhere: Path, tmp_path: Path, untouched: None
) -> None:
    from alembic.script import ScriptDirectory

    from icgate.gateway.store.tables import Base

    data_dir = tmp_path / "data"
    done = _run([installed.icgate, "db", "upgrade", "--data-dir", data_dir], elsewhere)
    assert "Traceback" not in done.stdout + done.stderr
    head = ScriptDirectory(str(REPO / "migrations")).get_current_head()
    assert f"database at revision {head}" in done.stdout
    with sqlite3.connect(data_dir / "icgate.db") as conn:
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert version == head
    assert set(Base.metadata.tables) <= tables


class Serving:
    """`icgate serve` in its own process, its output in a file (a pipe nobody reads would fill up)."""

    def __init__(self, installed: Installed, cwd: Path, log: Path, *args: str | Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [installed.icgate, "serve", "--no-launch", "--port", str(self.port), *args]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=cwd,
                env=clean_env(installed.venv),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_up(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"icgate serve exited:\n{self.output()}"
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (
                f"icgate serve did not answer in {timeout_s} s:\n{self.output()}"
            )
            time.sleep(0.2)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def standin() -> Iterator[str]:
    server = ServerThread(StandinBackend("standin").app).start()
    yield server.url
    server.stop()


def standin_policy(url: str) -> dict[str, Any]:
    backends = [
        {"name": name, "tier": name, "model": "openai/standin", "api_base": url + "/v1", "client": "http"}
        for name in ("small", "large")
    ]
    return {
        "backends": backends,
        "routed_models": ["auto"],
        "auth": {"required": False},
        "embedding": {"preload": False},
        "cache": {"enabled": False},
        "router": {"kind": "rule", "large_if_prompt_tokens_over": 200},
    }


def test_serve_answers_through_a_backend_and_stops_on_sigterm(
    installed: Installed, elsewhere: Path, tmp_path: Path, standin: str, untouched: None
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(standin_policy(standin)))
    data_dir = tmp_path / "data"
    server = Serving(installed, elsewhere, tmp_path / "serve.log", "--data-dir", data_dir, "--policy", policy)
    try:
        server.wait_until_up()
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
        body = {"model": "small", "messages": [{"role": "user", "content": "hello there"}]}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "standin says: hello there"
        # uvicorn re-raises the signal it handled once it has shut down cleanly.
        assert server.terminate() in (0, -signal.SIGTERM)
    finally:
        server.kill()
    output = server.output()
    assert "Traceback" not in output and "Exception in ASGI application" not in output
    assert (data_dir / "icgate.db").is_file()


def test_serve_without_a_policy_uses_the_packaged_default(
    installed: Installed, elsewhere: Path, tmp_path: Path, untouched: None
) -> None:
    from icgate.gateway.config import load_policy

    default = load_policy(installed.site_packages / "icgate" / "policies" / "default.yaml")
    server = Serving(installed, elsewhere, tmp_path / "serve.log", "--data-dir", tmp_path / "data")
    try:
        server.wait_until_up()
        r = httpx.get(server.url + "/v1/models", timeout=5)
        assert r.status_code == 200, r.text
        served = {m["id"] for m in r.json()["data"]}
        assert {*default.routed_models, *(b.name for b in default.backends)} <= served
        assert server.terminate() in (0, -signal.SIGTERM)
    finally:
        server.kill()
    assert "Traceback" not in server.output()
