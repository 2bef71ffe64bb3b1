"""Schemathesis against the gateway's whole HTTP API, long: every operation of its own OpenAPI schema,
valid and invalid requests, thousands of examples each. Writes bench/results/fuzz.md.

    .venv/bin/python bench/fuzz.py                        # 2,000 examples per API operation and mode
    .venv/bin/python bench/fuzz.py --examples 200 --admin-examples 50

The gateway runs in this process on loopback, over two stand-in backends, with the cache on (the real
embedder and verifier), keys required, and the admin API on (its key in the environment, never in the
policy). Requests to `/v1/*` carry a valid tenant key, requests to `/admin/api/*` the admin key, so
generated requests get past authentication and reach the handlers. The OpenAI API goes first, the admin
API last (a generated admin call may revoke a key or change a tenant's settings).

Every response is held to `check_response`, the same checks as the default suite's
tests/gateway/api/test_schema_fuzz.py: no 5xx; the status code, content type and body are those the
schema documents; no traceback and no internal path (the source tree, the virtualenv, `site-packages`)
in any body, unless the request itself carried that text; every error an OpenAI error object
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `icgate` importable
    sys.path.insert(0, str(REPO))

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import APIOperation, GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402

import icgate  # noqa: E402

RESULTS = REPO / "bench" / "results" / "fuzz.md"
Operation = APIOperation[Any, Any, Any, Any]
ADMIN_KEY_ENV = "ICGATE_FUZZ_ADMIN_KEY"
# What the schema promises about every response (schemathesis's own checks).
SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def internal_markers() -> tuple[str, ...]:
    """Text that only a leaked traceback or internal detail would put in a response body."""
    source = str(Path(icgate.__file__).resolve().parent.parent)  # the source tree or site-packages
    return (
        "Traceback (most recent call last)",
        'File "',
        "site-packages",
        source + "/",
        sys.prefix + "/",
    )


def with_known_model(case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    """A generated body names a model the gateway serves, so it goes past the model lookup."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        embeddings = case.operation.path == "/v1/embeddings"
        case.body["model"] = (
            "all-MiniLM-L6-v2" if embeddings else ("auto", "small", "large")[len(case.body) % 3]
        )
    return case


def _request_text(response: Any) -> str:
    """What the client sent (URL and body), to tell an echo of its own input from a leak."""
    request = response.request
    body = request.body or b""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return f"{request.url}\n{body}"


def _header(response: Any, name: str) -> str:
    values = response.headers.get(name) or []
    return ",".join(values) if isinstance(values, list) else str(values)


def error_object_problem(response: Any, extensions: bool = False) -> str | None:
    """Why an error response is not an OpenAI error object (None if it is). `extensions`: fields beyond
    OpenAI's four are allowed (the admin API's policy refusals list every issue in `issues`)."""
    if "application/json" not in _header(response, "content-type"):
        return f"{response.status_code} with content-type {_header(response, 'content-type')!r}"
    try:
        body = json.loads(response.content)
    except ValueError:
        return f"{response.status_code} whose body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict):
        return f"{response.status_code} without an 'error' object: {str(body)[:200]}"
    fields = {"message", "type", "param", "code"}
    if not (fields <= set(error) if extensions else fields == set(error)):
        return f"{response.status_code} error with fields {sorted(error)}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return f"{response.status_code} error without a message or type: {error}"
    return None


def check_response(case: schemathesis.Case[Any], response: Any, schema_checks: bool = True) -> list[str]:
    """Every problem with one response, in words (empty: it is fine)."""
    problems = []
    if schema_checks:
        try:
            case.validate_response(response, checks=SCHEMA_CHECKS)
        except (AssertionError, Failure, FailureGroup) as exc:
            problems.append(" ".join(str(exc).split())[:400])
    else:
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except (AssertionError, Failure, FailureGroup) as exc:
            problems.append(" ".join(str(exc).split())[:400])
    text = response.content.decode("utf-8", "replace")
    sent = _request_text(response)
    for marker in internal_markers():
        if marker in text and marker not in sent:
            at = text.index(marker)
            problems.append(
                f"internal detail {marker!r} in the body: ...{text[max(0, at - 80) : at + 80]}..."
            )
    if response.status_code >= 400:
        problem = error_object_problem(response, extensions=case.operation.path.startswith("/admin/"))
        if problem is not None:
            problems.append(problem)
    return problems


# --- the run --------------------------------------------------------------------------------------------


@dataclass
class Tally:
    examples: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0
    samples: list[str] = field(default_factory=list)  # the first few failures, in words
    unsatisfiable: bool = False  # no request of this mode exists


@dataclass
class Target:
    url: str
    tenant_key: str
    admin_key: str


def fuzz_operation(
    op: Operation,
    mode: GenerationMode,
    examples: int,
    target: Target,
    tally: Tally,
) -> None:
    """`examples` generated requests for one operation; failures are counted, never raised (no shrinking)."""
    key = target.admin_key if op.path.startswith("/admin/") else target.tenant_key
    strategy = op.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(with_known_model)

    @given(case=strategy)
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    def call(case: schemathesis.Case[Any]) -> None:
        try:
            response = case.call(base_url=target.url, headers={"authorization": f"Bearer {key}"}, timeout=60)
        except Exception as exc:  # a connection the server dropped is a failure too
            tally.examples += 1
            tally.failures += 1
            if len(tally.samples) < 3:
                tally.samples.append(f"no response: {type(exc).__name__}: {str(exc)[:200]}")
            return
        tally.examples += 1
        tally.statuses[response.status_code] += 1
        problems = check_response(case, response)
        if problems:
            tally.failures += 1
            if len(tally.samples) < 3:
                body = case.body if case.body is not None else ""
                sample = f"{problems[0]} (request {case.path_parameters or ''} {case.query or ''} body "
                sample += f"{json.dumps(body, default=str)[:200]})"
                tally.samples.append(sample)
                print("FAILURE", case.operation.path, sample, flush=True)

    try:
        call()
    except Unsatisfiable:
        tally.unsatisfiable = True  # e.g. a string path parameter: every value is valid


@contextmanager
def running_gateway(data_dir: Path, database_url: str | None) -> Iterator[Target]:
    """Stand-ins and a gateway on loopback, with a tenant key and the admin key."""
    from bench.harness import ServerThread
    from bench.standin_backend import StandinBackend
    from icgate.gateway.api.app import create_app
    from icgate.gateway.config import EmbeddingConfig, Policy
    from icgate.gateway.store import keys
    from icgate.gateway.wiring import EmbeddingService, Gateway

    small, large = StandinBackend("small-model"), StandinBackend("large-model")
    with ServerThread(small.app) as s1, ServerThread(large.app) as s2:
        backends = [
            {"name": name, "tier": name, "model": f"openai/{name}-model", "api_base": url + "/v1"}
            for name, url in (("small", s1.url), ("large", s2.url))
        ]
        policy = Policy.model_validate(
            {
                "backends": [{**b, "client": "http"} for b in backends],
                "auth": {"required": True},
                "admin": {"key_env": ADMIN_KEY_ENV},
                "database": {"url": database_url},
                "cache": {"enabled": True, "sync_interval_s": 0.5},
                "router": {"kind": "rule", "large_if_prompt_tokens_over": 200},
            }
        )
        admin_key = "icg-admin-" + secrets.token_urlsafe(32)
        os.environ[ADMIN_KEY_ENV] = admin_key
        embeddings = EmbeddingService(EmbeddingConfig(), data_dir / "models")
        asyncio.run(embeddings.embedder())
        gateway = Gateway(policy, data_dir, launch_local=False, embeddings=embeddings)
        server = ServerThread(create_app(gateway), ready_path="/readyz").start(timeout_s=600)
        try:
            assert gateway.engine is not None
            tenant_key = keys.create_key(gateway.engine, "fuzz").key
            yield Target(server.url, tenant_key, admin_key)
        finally:
            server.stop()


def run(examples: int, admin_examples: int, database_url: str | None) -> dict[str, Any]:
    results: dict[tuple[str, str], Tally] = {}
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="icgate-fuzz-") as tmp,
        running_gateway(Path(tmp), database_url) as target,
    ):
        schema = schemathesis.openapi.from_url(target.url + "/openapi.json")
        ops = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        ops.sort(key=lambda op: op.path.startswith("/admin/"))  # the OpenAI API first
        for op in ops:
            count = admin_examples if op.path.startswith("/admin/") else examples
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if mode is GenerationMode.NEGATIVE and not (
                    len(op.body) or len(op.query) or len(op.path_parameters)
                ):
                    continue  # nothing in the request to get wrong
                tally = results.setdefault((f"{op.method.upper()} {op.path}", mode.value), Tally())
                t0 = time.monotonic()
                fuzz_operation(op, mode, count, target, tally)
                print(
                    f"{op.method.upper():5} {op.path:50} {mode.value:8} {tally.examples:5} examples "
                    f"{tally.failures} failures {time.monotonic() - t0:6.1f} s",
                    flush=True,
                )
    return {"results": results, "seconds": time.monotonic() - started}


def report(outcome: dict[str, Any], argv: list[str], examples: int, admin_examples: int) -> str:
    from bench.overhead import machine

    results: dict[tuple[str, str], Tally] = outcome["results"]
    info = machine()
    total = sum(t.examples for t in results.values())
    failures = sum(t.failures for t in results.values())
    lines = [
        "# Schemathesis fuzzing of the whole HTTP API",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: `.venv/bin/python bench/fuzz.py {' '.join(argv)}`",
        "",
        f"Machine: {info['cpu']}, nproc {info['nproc']}, python {info['python']}, "
        f"schemathesis {schemathesis.__version__}, {info['code']}, "
        f"load average before {info['loadavg_before']} (shared machine).",
        "",
        f"Up to {examples} generated requests per operation and mode for the OpenAI API and the health "
        f"routes, {admin_examples} for the admin API; `positive`: requests the schema allows (their "
        "`model` set to one the gateway serves), `negative`: requests it does not. The gateway ran "
        "in-process over two stand-in backends with the cache on, keys required (a valid tenant key on "
        "`/v1/*`, the admin key on `/admin/api/*`). Checks on every response: no 5xx; status code, "
        "content type and body as the schema documents (schemathesis's `not_a_server_error`, "
        "`status_code_conformance`, `content_type_conformance`, `response_schema_conformance`); no "
        "traceback or internal path in the body; every 4xx an OpenAI error object.",
        "",
        f"**{total} requests in {outcome['seconds'] / 60:.1f} min, {failures} failures.**",
        "",
        "| operation | mode | requests | statuses | failures |",
        "|---|---|---|---|---|",
    ]
    for (operation, mode), tally in results.items():
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items()))
        if tally.unsatisfiable and not tally.examples:
            statuses = "none: every request the operation takes is valid"
        lines.append(f"| `{operation}` | {mode} | {tally.examples} | {statuses} | {tally.failures} |")
    lines += [
        "",
        "A request the schema allows may still be refused when what makes it wrong is beyond JSON Schema: "
        "`/v1/feedback` for a request id the gateway never answered (404), `/v1/embeddings` for an empty "
        "string or a token id outside the embedder's vocabulary (400). A `negative` request that gets a 2xx "
        "was invalid only in a way the handler tolerates (an unknown `range` for the overview falls back to "
        "the default). Neither is a failure: the checks are about what the gateway answers, not whether.",
    ]
    samples = [(op, mode, s) for (op, mode), t in results.items() for s in t.samples]
    lines += ["", "## Failures", ""]
    if not samples:
        lines.append("None.")
    for op, mode, sample in samples:
        lines.append(f"- `{op}` ({mode}): {sample}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=2000, help="per OpenAI API operation and mode")
    parser.add_argument("--admin-examples", type=int, default=None, help="per admin operation and mode")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    admin_examples = args.examples if args.admin_examples is None else args.admin_examples
    outcome = run(args.examples, admin_examples, args.database_url)
    text = report(outcome, sys.argv[1:] if argv is None else argv, args.examples, admin_examples)
    args.out.write_text(text)
    print(text)
    return 1 if any(t.failures for t in outcome["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
