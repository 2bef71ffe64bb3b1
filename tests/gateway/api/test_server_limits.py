"""Server limits over real HTTP: body and header sizes, per-request bounds, slow and idle clients,
the connection cap. Raw sockets where a well-behaved client library cannot misbehave on purpose."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from icgate.gateway.api.bounds import PRECHECK_BYTES, check_request_bounds
from icgate.gateway.api.server import connection_cap
from icgate.gateway.config import Policy, PolicyError, ServerConfig, load_policy
from icgate.gateway.errors import GatewayError
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def connect(url: str, timeout_s: float = 15.0) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=timeout_s)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, json.loads(body) if body else None


def request_head(path: str = "/v1/chat/completions", extra: str = "", length: int | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{extra}"
    if length is not None:
        head += f"content-length: {length}\r\n"
    return (head + "\r\n").encode()


def assert_openai_error(body: Any, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


@pytest.fixture
def limited(standins: Standins, start_gateway: Any) -> Iterator[Any]:
    """Start a gateway over the stand-ins with these `server:` settings."""

    def start(**server: Any) -> RunningGateway:
        return start_gateway(standin_policy(standins, "http", server=server))  # type: ignore[no-any-return]

    yield start


# --- body size ----------------------------------------------------------------------------------


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(limited: Any) -> None:
    gw = limited(max_body_bytes=64 * 1024)
    with connect(gw.url) as sock:
        sock.sendall(request_head(length=100 * 1024 * 1024))  # 100 MB announced, nothing sent
        status, headers, body = parse(read_all(sock))
    assert status == 413
    assert headers["connection"] == "close"
    error = assert_openai_error(body, "request_too_large")
    assert str(64 * 1024) in error["message"]


def test_client_uploading_an_oversize_body_reads_the_413(limited: Any) -> None:
    gw = limited(max_body_bytes=64 * 1024)
    response = httpx.post(
        gw.url + "/v1/chat/completions",
        content=b"x" * 8 * 1024 * 1024,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert_openai_error(response.json(), "request_too_large")


def test_chunked_body_is_cut_off_at_the_limit(limited: Any) -> None:
    gw = limited(max_body_bytes=64 * 1024)
    piece = b"x" * 16 * 1024
    sent = 0
    with connect(gw.url) as sock:
        sock.sendall(request_head(extra="transfer-encoding: chunked\r\n"))
        try:
            while sent < 8 * 1024 * 1024:  # far past the limit, unless the server stops us first
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                sock.settimeout(0.01)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the answer is in
                except TimeoutError:
                    pass
                finally:
                    sock.settimeout(15.0)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = parse(read_all(sock))
    assert status == 413
    assert_openai_error(body, "request_too_large")
    assert sent < 8 * 1024 * 1024


def test_bodies_within_the_limit_pass_declared_or_chunked(limited: Any) -> None:
    gw = limited(max_body_bytes=64 * 1024)
    payload = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a" * 30_000}]}).encode()
    declared = httpx.post(
        gw.url + "/v1/chat/completions",
        content=payload,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert declared.status_code == 200, declared.text

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(payload), 4096):
            yield payload[i : i + 4096]

    response = httpx.post(
        gw.url + "/v1/chat/completions",
        content=chunked(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text


# --- header size ----------------------------------------------------------------------------------


def test_oversize_header_gets_431(limited: Any) -> None:
    gw = limited(max_header_bytes=8 * 1024)
    payload = json.dumps(CHAT).encode()
    with connect(gw.url) as sock:
        sock.sendall(request_head(extra=f"x-big: {'a' * 20_000}\r\n", length=len(payload)) + payload)
        status, _, body = parse(read_all(sock))
    assert status == 431
    assert_openai_error(body, "request_header_fields_too_large")


def test_endless_header_is_refused_without_waiting_for_its_end(limited: Any) -> None:
    gw = limited(max_header_bytes=8 * 1024, header_timeout_s=60)
    with connect(gw.url, timeout_s=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nx-big: " + b"a" * 32 * 1024)  # no end
        status, _, body = parse(read_all(sock))  # answered at once, not after the 60 s timeout
    assert status == 431
    assert_openai_error(body)


def test_many_small_headers_count_too(limited: Any) -> None:
    gw = limited(max_header_bytes=8 * 1024)
    extra = "".join(f"x-h{i}: {'v' * 20}\r\n" for i in range(1000))
    with connect(gw.url) as sock:
        sock.sendall(request_head(extra=extra, length=2) + b"{}")
        status, _, _ = parse(read_all(sock))
    assert status == 431


def test_normal_requests_keep_working_on_a_kept_alive_connection(limited: Any) -> None:
    gw = limited(max_header_bytes=8 * 1024)
    with httpx.Client(timeout=30) as client:
        for _ in range(5):
            response = client.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"x-pad": "p" * 2000})
            assert response.status_code == 200


def test_unparseable_request_gets_a_json_400(limited: Any) -> None:
    gw = limited()
    with connect(gw.url) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        status, _, body = parse(read_all(sock))
    assert status == 400
    assert_openai_error(body, "invalid_http_request")


# --- bounds after parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "messages": [{"role": "user", "content": "x"}] * 4}, "messages"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 3}]},
            "messages.0.content",
        ),
        ({**CHAT, "messages": [{"role": "user", "content": "x" * 101}]}, "messages"),
        ({"model": "small", "prompt": ["a", "b", "c", "d"]}, "prompt"),
        ({"model": "small", "prompt": "p" * 101}, "prompt"),
        ({"model": "small", "prompt": [[1] * 60, [2] * 60]}, "prompt"),
    ],
)
def test_request_bounds_over_http(limited: Any, body: dict[str, Any], param: str) -> None:
    gw = limited(max_messages=3, max_content_parts=2, max_text_chars=100)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(gw.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = assert_openai_error(response.json(), "request_too_large")
    assert error["param"] == param


def test_request_within_bounds_passes(limited: Any) -> None:
    gw = limited(max_messages=3, max_content_parts=2, max_text_chars=100)
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 50}] * 2}]}
    assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    completion = {"model": "small", "prompt": "p" * 90}
    assert httpx.post(gw.url + "/v1/completions", json=completion, timeout=30).status_code == 200


def test_large_bodies_are_bounded_before_validation(limited: Any) -> None:
    """Over PRECHECK_BYTES the bounds are checked off the event loop, before the app parses the body;
    the answers are the same as for small bodies."""
    gw = limited(max_messages=2048)
    url = gw.url + "/v1/chat/completions"
    many = {**CHAT, "messages": [{"role": "user", "content": "x"}] * 20_000}
    payload = json.dumps(many).encode()
    assert len(payload) > PRECHECK_BYTES
    response = httpx.post(url, content=payload, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert assert_openai_error(response.json(), "request_too_large")["param"] == "messages"

    long_context = {**CHAT, "messages": [{"role": "user", "content": "word " * 300_000}]}
    payload = json.dumps(long_context).encode()
    assert len(payload) > PRECHECK_BYTES
    response = httpx.post(url, content=payload, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    response = httpx.post(url, content=chunked(), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text

    broken = payload[:-10]
    response = httpx.post(url, content=broken, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert_openai_error(response.json())


def test_check_request_bounds_defaults_allow_long_context() -> None:
    config = ServerConfig()
    long_chat = {"messages": [{"role": "user", "content": "x" * 1_500_000}] * 1}
    check_request_bounds(long_chat, config)
    with pytest.raises(GatewayError) as err:
        check_request_bounds({"messages": [{"role": "user", "content": "x"}] * 2049}, config)
    assert err.value.status_code == 400 and err.value.code == "request_too_large"


# --- slow and idle clients --------------------------------------------------------------------


def test_slow_header_client_is_cut_off(limited: Any) -> None:
    gw = limited(header_timeout_s=1, idle_timeout_s=30)
    head = request_head(length=2)
    started = time.monotonic()
    with connect(gw.url) as sock:
        sent = 0
        try:
            while sent < len(head) and time.monotonic() - started < 20:
                sock.sendall(head[sent : sent + 1])  # one byte every 0.2 s
                sent += 1
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_all(sock)
    elapsed = time.monotonic() - started
    assert sent < len(head)
    assert elapsed < 1 + 5
    status, _, body = parse(raw)
    assert status == 408
    assert_openai_error(body, "request_timeout")


def test_silent_connection_is_closed_after_the_idle_timeout(limited: Any) -> None:
    gw = limited(idle_timeout_s=1, header_timeout_s=30)
    started = time.monotonic()
    with connect(gw.url) as sock:
        assert read_all(sock) == b""  # closed without a word
    assert time.monotonic() - started < 1 + 5


def test_kept_alive_connection_is_closed_after_the_idle_timeout(limited: Any) -> None:
    gw = limited(idle_timeout_s=1)
    payload = json.dumps(CHAT).encode()
    with connect(gw.url) as sock:
        sock.sendall(request_head(length=len(payload)) + payload)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        rest = read_all(sock)  # returns once the server closes the idle connection
    assert b"HTTP/1.1" not in rest
    assert time.monotonic() - started < 1 + 5


def test_connections_beyond_the_cap_get_503(limited: Any) -> None:
    gw = limited(max_connections=4, idle_timeout_s=30, header_timeout_s=30)
    held = [connect(gw.url) for _ in range(4)]
    try:
        time.sleep(0.2)  # the server has accepted them
        with connect(gw.url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
            status, headers, body = parse(read_all(sock))
        assert status == 503
        assert headers["retry-after"] == "1"
        assert_openai_error(body, "too_many_connections")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the held ones are gone: served again
        try:
            if httpx.get(gw.url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


# --- configuration ------------------------------------------------------------------------------


def test_connection_cap_leaves_descriptors_for_the_rest() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(ServerConfig(max_connections=10)) == min(10, max(16, soft - 256))
    derived = connection_cap(ServerConfig(reserved_fds=100))
    assert derived == max(16, soft - 100)


def test_server_section_is_strict(tmp_path: Any, standins: Standins) -> None:
    policy = standin_policy(standins, "http")
    assert policy.server.max_body_bytes == 8 * 1024 * 1024
    raw = policy.model_dump(mode="json", exclude_defaults=True)
    raw["server"] = {"max_body_byte": 10}
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(PolicyError, match=r"server\.max_body_byte: unknown key"):
        load_policy(path)
    assert isinstance(Policy.model_validate({**raw, "server": {"graceful_shutdown_s": 1}}), Policy)


def test_uvicorns_access_log_is_off_unless_the_policy_asks(tmp_path: Any) -> None:
    from icgate.gateway.api.app import create_app
    from icgate.gateway.api.server import build_server
    from icgate.gateway.wiring import Gateway

    backend = {"name": "small", "tier": "small", "model": "openai/s", "api_base": "http://127.0.0.1:9/v1"}
    for server, expected in (({}, False), ({"access_log": True}, True)):
        policy = Policy.model_validate({"backends": [backend], "server": server})
        app = create_app(Gateway(policy, tmp_path))
        assert build_server(app, "127.0.0.1", 0).config.access_log is expected
