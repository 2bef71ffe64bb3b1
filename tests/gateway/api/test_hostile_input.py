"""Hostile and malformed input the OpenAPI schema does not describe, over real HTTP (raw sockets where a
client library would not misbehave on purpose): a body trickled in, bodies of 10 MB, JSON nested
thousands deep, invalid UTF-8, 100,000 messages, numbers out of range, unknown roles and content parts.

Each answer is checked the same way: a 4xx in OpenAI's error shape, never a 5xx, no traceback or internal
path in the body, and nothing sent to a backend for a refused request. What tests elsewhere cover already
(header sizes and timeouts, declared and chunked bodies over a small limit, unpaired surrogates, the
per-request bounds) is not repeated here; docs/reliability.md maps each failure mode to its test.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.fuzz import internal_markers
from bench.harness import ServerThread
from icgate.gateway.api.app import create_app
from icgate.gateway.api.bounds import PRECHECK_BYTES
from icgate.gateway.config import Policy
from icgate.gateway.wiring import EmbeddingService, Gateway
from tests.gateway.api.test_server_limits import address, parse, read_all, request_head
from tests.gateway.conftest import RunningGateway, Standins, settle_cache, standin_policy

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]
JSON = {"content-type": "application/json"}


def clean_error(response: httpx.Response, status: int, param: str | None = "") -> dict[str, Any]:
    """The response is `status` with an OpenAI error object, and no internal detail; its error."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    if param != "":
        assert body["error"]["param"] == param
    for marker in internal_markers():
        assert marker not in response.text
    return dict(body["error"])


def serve(policy: Policy, data_dir: Path, embeddings: EmbeddingService | None = None) -> RunningGateway:
    gateway = Gateway(policy, data_dir, launch_local=False, embeddings=embeddings)
    return RunningGateway(gateway, ServerThread(create_app(gateway), ready_path="/readyz").start())


@pytest.fixture(scope="module")
def gw(
    standin_servers: Standins, shared_embeddings: EmbeddingService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A gateway with the shipped server limits and the cache on."""
    policy = standin_policy(standin_servers, "http", cache={"enabled": True, "sync_interval_s": 0.2})
    server = serve(policy, tmp_path_factory.mktemp("hostile"), shared_embeddings)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_gw(standin_servers: Standins, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway that waits 1 s for a request's body."""
    policy = standin_policy(standin_servers, "http", server={"body_timeout_s": 1, "idle_timeout_s": 30})
    server = serve(policy, tmp_path_factory.mktemp("slow"))
    yield server
    server.stop()


def post(server: RunningGateway, body: bytes | dict[str, Any], path: str = CHAT, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={**JSON, **kw}, timeout=60)


def nothing_sent(standins: Standins) -> bool:
    return not standins.small.received and not standins.large.received


# --- a body trickled in (slow loris, body half) ----------------------------------------------------------


def trickle(
    url: str, head: bytes, pieces: list[bytes], every_s: float, limit_s: float
) -> tuple[bytes, float]:
    """Send `head`, then one piece every `every_s` until the server answers; what it said, and when."""
    started = time.monotonic()
    with socket.create_connection(address(url), timeout=limit_s + 10) as sock:
        sock.sendall(head)
        try:
            for piece in pieces:
                if time.monotonic() - started > limit_s:
                    break
                sock.sendall(piece)
                time.sleep(every_s)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_all(sock), time.monotonic() - started


def test_a_body_trickled_in_is_cut_off_with_a_408(
    slow_gw: RunningGateway, standins: Standins, caplog: pytest.LogCaptureFixture
) -> None:
    payload = json.dumps({"model": "small", "messages": USER}).encode()
    raw, elapsed = trickle(
        slow_gw.url, request_head(length=len(payload)), [bytes([b]) for b in payload], 0.2, limit_s=20
    )
    assert elapsed < 1 + 5  # cut at the timeout, not after the whole body (about 12 s)
    status, headers, body = parse(raw)
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["code"] == "request_timeout"
    assert nothing_sent(standins)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a client's fault, not ours
    # the gateway serves the next client as usual
    assert post(slow_gw, {"model": "small", "messages": USER}).status_code == 200


def test_a_chunked_body_trickled_in_is_cut_off_too(slow_gw: RunningGateway, standins: Standins) -> None:
    payload = json.dumps({"model": "small", "messages": USER}).encode()
    chunks = [b"1\r\n%s\r\n" % bytes([b]) for b in payload]
    head = request_head(extra="transfer-encoding: chunked\r\n")
    raw, elapsed = trickle(slow_gw.url, head, chunks, 0.2, limit_s=20)
    assert elapsed < 1 + 5
    status, _, body = parse(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert nothing_sent(standins)


def test_a_slow_body_to_a_route_outside_the_pipeline_gets_the_same_408(
    slow_gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    payload = json.dumps({"model": "all-MiniLM-L6-v2", "input": "hello"}).encode()
    head = request_head("/v1/embeddings", length=len(payload))
    raw, _ = trickle(slow_gw.url, head, [bytes([b]) for b in payload], 0.2, limit_s=20)
    status, _, body = parse(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_body_sent_in_pieces_within_the_timeout_is_served(slow_gw: RunningGateway) -> None:
    payload = json.dumps({"model": "small", "messages": USER}).encode()
    head = request_head(extra="connection: close\r\n", length=len(payload))
    raw, _ = trickle(slow_gw.url, head, [payload[:10], payload[10:]], 0.3, limit_s=20)
    assert raw.startswith(b"HTTP/1.1 200")


# --- size and shape -------------------------------------------------------------------------------------


def test_ten_megabyte_bodies_are_refused_under_the_shipped_limit(
    gw: RunningGateway, standins: Standins
) -> None:
    """8 MiB is the shipped `server.max_body_bytes`: a 10 MB body gets 413 whether declared or chunked."""
    big = json.dumps({"model": "small", "messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode()
    clean_error(post(gw, big), 413)

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    response = httpx.post(gw.url + CHAT, content=chunked(), headers=JSON, timeout=60)
    assert clean_error(response, 413)["code"] == "request_too_large"
    assert nothing_sent(standins)


def nested(depth: int, inner: bytes = b"1") -> bytes:
    """A JSON value `depth` levels deep: [[[...1...]]]."""
    return b"[" * depth + inner + b"]" * depth


def with_field(value: bytes, pad: int = 0) -> bytes:
    """A chat body with `value` as the pass-through field `guided_json`, padded to `pad` characters."""
    messages = json.dumps([{"role": "user", "content": "hi " + "x" * pad}]).encode()
    return b'{"model": "small", "messages": ' + messages + b', "guided_json": ' + value + b"}"


@pytest.mark.parametrize("depth", [128, 960, 5_000, 200_000])
@pytest.mark.parametrize("large", [False, True], ids=["small-body", "large-body"])
def test_deeply_nested_json_is_refused_with_a_400(
    gw: RunningGateway, standins: Standins, depth: int, large: bool
) -> None:
    """`server.max_json_depth` (128): the body is level 1, so a field 128 deep is past it. Before the
    bound, 960 levels answered 500 (json.dumps hit Python's recursion limit) and a large body nested
    thousands deep did too (parsed in a worker thread, where the RecursionError was not caught)."""
    body = with_field(nested(depth), pad=PRECHECK_BYTES if large else 0)
    error = clean_error(post(gw, body), 400)
    # Parsed, the field at fault is named; past what the JSON parser itself can nest, the body is.
    assert error["param"] in ("guided_json", None)
    if depth < 900:
        assert error["param"] == "guided_json" and error["code"] == "request_too_large"
    assert nothing_sent(standins)


def test_nesting_within_the_bound_passes_through(gw: RunningGateway, standins: Standins) -> None:
    response = post(gw, with_field(nested(126)))  # body 1, guided_json 2, 126 lists below: 128
    assert response.status_code == 200, response.text
    sent = standins.small.received[-1]["body"]["guided_json"]
    depth = 0
    while isinstance(sent, list):
        sent, depth = sent[0], depth + 1
    assert depth == 126


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/feedback", "/v1/completions"])
def test_deep_nesting_on_the_other_json_routes_is_a_400(gw: RunningGateway, path: str) -> None:
    for depth in (960, 100_000):
        first = b'{"model": "all-MiniLM-L6-v2", "input": "hi", "x": '
        if path == "/v1/feedback":
            first = b'{"request_id": "r", "score": 1.0, "x": '
        elif path == "/v1/completions":
            first = b'{"model": "small", "prompt": "hi", "x": '
        clean_error(post(gw, first + nested(depth, b'"\\ud800"') + b"}", path), 400)


def test_a_hundred_thousand_messages_are_refused_before_validation(
    gw: RunningGateway, standins: Standins
) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}] * 100_000}
    error = clean_error(post(gw, body), 400, "messages")
    assert error["code"] == "request_too_large" and "100000" in error["message"]
    assert nothing_sent(standins)


# --- invalid UTF-8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "small", "messages": [{"role": "user", "content": "bad \xff\xfe byte"}]}',
        b'{"model": "small", "messages": [{"role": "user", "content": "overlong \xc0\xaf"}]}',
        b'{"model": "small", "messages": [{"role": "user", "content": "cut \xe2\x82"}]}',
        b'{"model": "small", "\xff": 1, "messages": [{"role": "user", "content": "key"}]}',
        b"\xff\xfe\x00{\x00}",  # UTF-16 with a byte-order mark: not JSON in UTF-8
        bytes(range(256)) * 4,  # every byte value
        b'{"model": "small", "messages": [{"role": "user", "content": "'
        + b"long " * (PRECHECK_BYTES // 5)
        + b'\xff"}]}',  # a large body takes the worker-thread way in
    ],
    ids=["in-string", "overlong", "truncated", "in-key", "utf16", "all-bytes", "large-body"],
)
def test_invalid_utf8_is_the_senders_400(gw: RunningGateway, standins: Standins, raw: bytes) -> None:
    clean_error(post(gw, raw), 400)
    assert nothing_sent(standins)


def test_invalid_bytes_in_headers_and_path_are_no_server_error(gw: RunningGateway) -> None:
    """Header values are read as latin-1, as HTTP says: a garbled key or path is a 4xx at worst."""
    payload = json.dumps({"model": "small", "messages": USER, "temperature": 0.7}).encode()
    for extra in (b"authorization: Bearer \xff\xfe\xfd", b"x-api-key: \xc0\xaf", b"x-\xff: \xfe"):
        with socket.create_connection(address(gw.url), timeout=30) as sock:
            head = request_head(extra="connection: close\r\n", length=len(payload))
            sock.sendall(head[:-2] + extra + b"\r\n\r\n" + payload)
            status, _, body = parse(read_all(sock))
        # auth is off here: an unreadable key is no key; a header name that is not a token is a 400
        assert status in (200, 400), body
        if status == 400:
            assert set(body["error"]) == {"message", "type", "param", "code"}
    response = httpx.get(gw.url + "/v1/%ff%fe/models", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# --- values out of range ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", -1),
        ("n", 129),
        ("n", 1.5),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 2.5),
        ("max_completion_tokens", 0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_p", 1.5),
        ("presence_penalty", 9),
    ],
)
def test_numbers_out_of_range_are_400_naming_the_field(
    gw: RunningGateway, standins: Standins, field: str, value: Any
) -> None:
    clean_error(post(gw, {"model": "small", "messages": USER, field: value}), 400, field)
    assert nothing_sent(standins)


@pytest.mark.parametrize("value", [10**30, 2**64, 2**31])
def test_a_huge_max_tokens_is_the_backends_to_judge(
    gw: RunningGateway, standins: Standins, value: int
) -> None:
    """OpenAI's limit depends on the model: the gateway passes the number on unchanged (a real backend
    refuses it with a 400, relayed as such) and nothing of its own overflows on it."""
    # sampled (temperature > 0), so never answered from the cache: the backend sees each one
    response = post(gw, {"model": "auto", "messages": USER, "max_tokens": value, "temperature": 0.7})
    assert response.status_code == 200, response.text
    assert standins.small.received[-1]["body"]["max_tokens"] == value


@pytest.mark.parametrize("role", ["hacker", "", "USER", 5, None, ["user"]])
def test_unknown_roles_are_400(gw: RunningGateway, standins: Standins, role: Any) -> None:
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}]}
    clean_error(post(gw, body), 400, "messages.1.role")
    assert nothing_sent(standins)


def test_content_parts_of_unknown_types_pass_through_and_are_never_cached(
    gw: RunningGateway, standins: Standins
) -> None:
    """OpenAI adds part types (image_url, input_audio, file, ...) faster than gateways: a part of a type
    the gateway does not know goes to the backend as it is; the gateway cannot read it, so an answer to
    it is never stored nor served from the cache."""
    parts = [{"type": "text", "text": "what is in this?"}, {"type": "hologram", "data": {"frames": [1, 2]}}]
    body = {"model": "small", "messages": [{"role": "user", "content": parts}], "temperature": 0}
    for _ in range(2):
        response = post(gw, body)
        assert response.status_code == 200, response.text
        assert response.headers["x-icgate-route"] == "small"
    assert [r["body"]["messages"][-1]["content"] for r in standins.small.received] == [parts, parts]
    time.sleep(0.3)  # any store would have happened by now
    assert post(gw, body).headers["x-icgate-route"] == "small"
    for bad, param in ((5, "messages.0.content.0.type"), (None, "messages.0.content.0.type")):
        broken = {"model": "small", "messages": [{"role": "user", "content": [{"type": bad}]}]}
        clean_error(post(gw, broken), 400, param)


def test_the_gateway_is_whole_after_all_of_it(gw: RunningGateway) -> None:
    """Nothing above left the gateway unable to serve or to cache."""
    first = post(gw, {"model": "auto", "messages": [{"role": "user", "content": "Name a prime."}]})
    assert first.status_code == 200
    settle_cache(gw.gateway)
    again = post(gw, {"model": "auto", "messages": [{"role": "user", "content": "Name a prime."}]})
    assert again.headers["x-icgate-route"] == "cache"


def test_admin_ids_past_64_bits_are_400_not_500(
    standins: Standins, start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every id, cursor and filter of the admin API is a database integer (`DbInt`): past 64 bits the
    database driver failed (OverflowError, a 500; schemathesis found it). Within them, a 404."""
    monkeypatch.setenv("ICGATE_ADMIN_KEY", "admin-key-for-hostile-input")
    admin = start_gateway(standin_policy(standins, "http"))
    auth = {"authorization": "Bearer admin-key-for-hostile-input"}
    huge, largest = 2**64, 2**63 - 1
    with httpx.Client(base_url=admin.url, headers=auth, timeout=30) as client:
        for method, path, body in (
            ("GET", f"/admin/api/policy/versions/{huge}", None),
            ("POST", f"/admin/api/policy/versions/{huge}/rollback", None),
            ("POST", f"/admin/api/keys/{huge}/revoke", None),
            ("POST", f"/admin/api/admin-keys/{huge}/revoke", None),
            ("GET", f"/admin/api/cache/replay/{huge}", None),
            ("POST", f"/admin/api/router/versions/{huge}/swap", None),
            ("POST", "/admin/api/router/rollback", {"version_id": huge}),
            ("POST", "/admin/api/cache/delete", {"ids": [1, huge]}),
            ("GET", f"/admin/api/requests?before={huge}", None),
            ("GET", f"/admin/api/requests?status={huge}", None),
            ("GET", f"/admin/api/cache?before={huge}", None),
        ):
            response = client.request(method, path, json=body)
            assert response.status_code == 400, (path, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert client.get(f"/admin/api/policy/versions/{largest}").status_code == 404
        assert client.post(f"/admin/api/keys/{largest}/revoke").status_code == 404
