"""No API key, admin key or provider key in anything the gateway writes or answers.

A real `icgate serve` process logs at DEBUG (stdout and stderr captured), prints its OpenTelemetry spans
to the console, writes uvicorn's access log, and keeps request bodies for the explainer. Keys are made
through the CLI (`icgate keys create`, `icgate admin create-key`) and the admin API, and the backends'
provider keys come from environment variables. Then good and bad requests: wrong keys, a revoked key,
keys in the wrong header or in the URL, an admin key where a tenant key belongs and the reverse, a
provider that refuses its key with a 401 that quotes it, a provider whose 400 quotes it, through both
backend clients. Everything is then searched for every key: the log, every response (bodies and
headers), /metrics, the CLI's listings, the database file and every table.

By design, two things show a key, and are left out of the search: the one answer that creates it (the
CLI's output, the admin API's 201), shown once. Listings show a key's first characters: 8 for a
tenant key (`icg-` and 4), 14 for an admin key (`icg-admin-` and 4), documented in gateway/store/keys.py
and admin_keys.py; the search is for the part after them.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.harness import ServerThread, free_port
from icgate.gateway.cli.main import main as cli
from icgate.gateway.store.db import make_engine
from icgate.gateway.store.keys import KEY_PREFIX_LEN
from tests.gateway.conftest import PREPARED_MODELS

REPO = Path(__file__).resolve().parents[2]
# The root logger at DEBUG before the CLI configures logging (its basicConfig is then a no-op).
DEBUG_SERVE = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.DEBUG, format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
    "from icgate.gateway.cli.main import main; sys.exit(main(sys.argv[1:]))"
)
GOOD_ENV, BAD_ENV, ADMIN_ENV = (
    "ICGATE_TEST_PROVIDER_KEY",
    "ICGATE_TEST_STALE_PROVIDER_KEY",
    "ICGATE_TEST_ADMIN",
)


class Provider:
    """An OpenAI-compatible provider that accepts one key. Any other gets a 401 quoting it in full (as
    some providers do); a request with `x_quote_key` gets a 400 quoting the key it came with."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        presented = request.headers.get("authorization", "").removeprefix("Bearer ")
        body = await request.json()
        if presented != self.key:
            error = {"message": f"Incorrect API key provided: {presented}.", "type": "invalid_request_error",
                     "param": None, "code": "invalid_api_key"}  # fmt: skip
            return JSONResponse({"error": error}, status_code=401)
        if body.get("x_quote_key"):
            error = {"message": f"Bad request for key {presented}", "type": "invalid_request_error",
                     "param": None, "code": None}  # fmt: skip
            return JSONResponse({"error": error}, status_code=400)
        text = "Paris is the capital of France."
        return JSONResponse(
            {
                "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
            }
        )  # fmt: skip


@dataclass
class Serving:
    url: str
    data_dir: Path
    policy: Path
    log: Path
    proc: subprocess.Popen[bytes]
    secrets: dict[str, str] = field(default_factory=dict)  # what each secret is, by its value
    seen: list[str] = field(default_factory=list)  # every response and output to search

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        capsys.readouterr()
        code = cli([*args, "--policy", str(self.policy), "--data-dir", str(self.data_dir)])
        out = capsys.readouterr()
        assert code == 0, out
        return out.out + out.err

    def keep(self, response: httpx.Response) -> httpx.Response:
        # what the gateway sent back (not the request, which carries the keys the test sends)
        self.seen.append("\n".join(f"{k}: {v}" for k, v in response.headers.items()))
        self.seen.append(response.text)
        return response


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    folder = tmp_path_factory.mktemp("secrets")
    good_key, stale_key = "sk-live-" + secrets.token_hex(20), "sk-stale-" + secrets.token_hex(20)
    admin_key = "env-admin-" + secrets.token_urlsafe(24)
    provider = Provider(good_key)
    with ServerThread(provider.app, ready_path="/v1/chat/completions") as backend:
        base = backend.url + "/v1"
        policy = {
            "backends": [
                {"name": "small", "tier": "small", "model": "openai/m", "api_base": base, "client": "http",
                 "api_key_env": GOOD_ENV},
                {"name": "small-litellm", "tier": "small", "model": "openai/m", "api_base": base,
                 "client": "litellm", "api_key_env": GOOD_ENV},
                {"name": "large", "tier": "large", "model": "openai/m", "api_base": base, "client": "http",
                 "api_key_env": BAD_ENV},
                {"name": "large-litellm", "tier": "large", "model": "openai/m", "api_base": base,
                 "client": "litellm", "api_key_env": BAD_ENV},
            ],
            "auth": {"required": True},
            "admin": {"key_env": ADMIN_ENV},
            "telemetry": {"traces_exporter": "console"},
            "request_log": {"store_bodies": True, "flush_interval_s": 0.1},
            "server": {"access_log": True},
            "router": {"kind": "rule"},
            "embedding": {"preload": False},
            "cache": {"enabled": False},
        }  # fmt: skip
        path = folder / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        data_dir = folder / "data"
        data_dir.mkdir()
        if PREPARED_MODELS.is_dir():
            (data_dir / "models").symlink_to(PREPARED_MODELS)
        port = free_port()
        log = folder / "serve.log"
        env = {**os.environ, GOOD_ENV: good_key, BAD_ENV: stale_key, ADMIN_ENV: admin_key}
        env.pop("ICGATE_DATABASE_URL", None)
        env.pop("ICGATE_REDIS_URL", None)
        cmd = [sys.executable, "-c", DEBUG_SERVE, "serve", "--policy", str(path), "--data-dir", str(data_dir)]
        cmd += ["--port", str(port), "--no-launch"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        serving = Serving(f"http://127.0.0.1:{port}", data_dir, path, log, proc)
        serving.secrets = {
            good_key: "provider key",
            stale_key: "rejected provider key",
            admin_key: "env admin key",
        }
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if httpx.get(serving.url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            yield serving
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def chat(
    s: Serving, model: str = "auto", headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        **extra,
    }
    return s.keep(httpx.post(s.url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=60))


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def database_text(data_dir: Path) -> str:
    """Every row of every table, as text."""
    engine = make_engine(f"sqlite:///{data_dir / 'icgate.db'}")
    try:
        out = []
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    out.append(f"{table}: {tuple(row)!r}")
        return "\n".join(out)
    finally:
        engine.dispose()


def test_no_key_of_any_kind_in_logs_traces_metrics_errors_or_the_database(
    serving: Serving, capsys: pytest.CaptureFixture[str]
) -> None:
    s = serving
    tenant_keys = []
    for tenant in ("acme", "beta", "gamma"):  # through the CLI, as an operator would
        out = s.cli(capsys, "keys", "create", "--tenant", tenant)
        tenant_keys.append(out.strip().splitlines()[-1])
    admin_out = s.cli(capsys, "admin", "create-key", "--name", "ops")
    stored_admin = admin_out.strip().splitlines()[-1]
    env_admin = next(k for k, what in s.secrets.items() if what == "env admin key")
    for key in tenant_keys:
        s.secrets[key] = "tenant key"
    s.secrets[stored_admin] = "stored admin key"
    acme, beta, gamma = tenant_keys
    # one more through the admin API (its 201 is the one answer that shows it: not kept for the search)
    made = httpx.post(s.url + "/admin/api/keys", json={"tenant": "delta"}, headers=bearer(stored_admin))
    assert made.status_code == 201
    s.secrets[made.json()["key"]] = "tenant key (admin API)"
    wrong = "icg-" + secrets.token_urlsafe(32)  # well-formed, never issued
    s.secrets[wrong] = "wrong key presented"
    foreign = "sk-proj-" + secrets.token_hex(24)  # another service's key, sent by mistake
    s.secrets[foreign] = "foreign key presented"

    # the admin API revokes gamma's key (at once, on this replica)
    listing = s.keep(httpx.get(s.url + "/admin/api/keys", headers=bearer(env_admin)))
    gamma_id = next(k["key_id"] for k in listing.json()["data"] if k["tenant_name"] == "gamma")
    revoked = s.keep(httpx.post(f"{s.url}/admin/api/keys/{gamma_id}/revoke", headers=bearer(stored_admin)))
    assert revoked.status_code == 200

    # good requests, through both backend clients
    assert chat(s, headers=bearer(acme)).status_code == 200
    assert chat(s, headers={"x-api-key": beta}).status_code == 200  # documented second header
    assert chat(s, "small-litellm", bearer(acme)).status_code == 200
    # bad keys, and keys where they do not belong
    for headers in (
        bearer(wrong), bearer(foreign), bearer(gamma), bearer(stored_admin), {"api-key": acme},
        {"authorization": acme}, {"authorization": f"Basic {acme}"}, {"authorization": f"Bearer  {wrong} x"},
        {"x-api-key": wrong},
    ):  # fmt: skip
        response = chat(s, headers=headers)
        assert response.status_code == 401, (headers, response.text)
    in_url = s.keep(
        httpx.post(f"{s.url}/v1/chat/completions?api_key={acme}&key={wrong}", json={}, timeout=30)
    )
    assert in_url.status_code in (400, 401)
    for key in (acme, wrong):  # a tenant key is no admin key, on the API or the login form
        assert s.keep(httpx.get(s.url + "/admin/api/keys", headers=bearer(key))).status_code == 401
        login = s.keep(httpx.post(s.url + "/admin/login", data={"key": key}))
        assert login.status_code == 401
    session = s.keep(httpx.post(s.url + "/admin/login", data={"key": env_admin}))
    assert session.status_code == 303 and session.cookies
    # providers refusing their key, quoting it: a 401 (the stale key), a 400 (the good one)
    for model in ("large", "large-litellm"):
        refused = chat(s, model, bearer(acme))
        assert refused.status_code == 502 and "authentication" in refused.json()["error"]["message"]
    for model in ("small", "small-litellm"):
        quoted = chat(s, model, bearer(acme), x_quote_key=True)
        assert quoted.status_code == 400, quoted.text
    # the operator's views
    s.keep(httpx.get(s.url + "/metrics"))
    s.keep(httpx.get(s.url + "/admin/api/requests", headers=bearer(env_admin)))
    s.keep(httpx.get(s.url + "/admin/api/admin-keys", headers=bearer(env_admin)))
    s.keep(httpx.get(s.url + "/admin/keys", cookies=session.cookies))
    listed = s.cli(capsys, "keys", "list") + s.cli(capsys, "admin", "list-keys")
    s.seen.append(listed)
    assert acme[:KEY_PREFIX_LEN] in listed and stored_admin[:14] in listed  # the documented prefixes

    time.sleep(0.5)  # the request log is written behind
    s.proc.send_signal(signal.SIGTERM)  # flush the request log and the spans, close the log
    assert s.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    log = s.log.read_text(errors="replace")
    assert "Application shutdown complete" in log
    assert "icgate.request" in log  # the spans did go to the console, and are searched
    assert "401" in log and "/v1/chat/completions" in log  # so did the access log

    places = {
        "server log (DEBUG, spans, access log)": log,
        "responses, metrics, listings": "\n".join(s.seen),
        "database tables": database_text(s.data_dir),
        "database files": "\n".join(
            p.read_bytes().decode("latin-1")
            for p in s.data_dir.rglob("*")
            if p.is_file() and "models" not in p.parts
        ),
    }
    found = []
    for value, what in s.secrets.items():
        # A listing may show the documented prefix: search for the rest.
        secret = value[14:] if value.startswith("icg-admin-") else value[KEY_PREFIX_LEN:]
        for place, text in places.items():
            if secret in text:
                at = text.index(secret)
                found.append(f"{what} in {place}: ...{text[max(0, at - 120) : at + 40]!r}")
    assert not found, "\n".join(found)
