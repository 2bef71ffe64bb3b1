"""Fixtures for API tests: stand-in backends and gateways on real loopback ports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.harness import ServerThread
from bench.standin_backend import StandinBackend
from icgate.gateway.api.app import create_app
from icgate.gateway.config import EmbeddingConfig, Policy
from icgate.gateway.wiring import EmbeddingService, Gateway

# `make install` exports the models' graphs there (`icgate prepare`): a session reuses them.
PREPARED_MODELS = Path(__file__).resolve().parents[2] / "data" / "models"


@dataclass
class Standins:
    small: StandinBackend
    large: StandinBackend
    small_url: str
    large_url: str

    def reset(self) -> None:
        for backend in (self.small, self.large):
            backend.received.clear()
            backend.fail_next = 0
            backend.delay_s = 0.0
            backend.peak_in_flight = 0


@pytest.fixture(scope="session")
def standin_servers() -> Iterator[Standins]:
    small, large = StandinBackend("small-model"), StandinBackend("large-model")
    s1, s2 = ServerThread(small.app).start(), ServerThread(large.app).start()
    yield Standins(small, large, s1.url, s2.url)
    s1.stop()
    s2.stop()


@pytest.fixture
def standins(standin_servers: Standins) -> Iterator[Standins]:
    standin_servers.reset()
    yield standin_servers
    standin_servers.reset()


@pytest.fixture(params=["litellm", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    """API tests run through both backend transports."""
    return str(request.param)


def two_tier_policy(
    small_url: str,
    large_url: str,
    models: tuple[str, str],
    common: dict[str, Any],
    small: dict[str, Any] | None = None,
    **overrides: Any,
) -> Policy:
    """Backends `small` and `large` at two loopback servers, cache off, the length rule routing;
    `common` goes into both backends, `small` into the small one, `overrides` replace top-level sections."""
    raw: dict[str, Any] = {
        "backends": [
            {
                "name": "small",
                "tier": "small",
                "model": f"openai/{models[0]}",
                "api_base": small_url + "/v1",
                **common,
                **(small or {}),
            },
            {
                "name": "large",
                "tier": "large",
                "model": f"openai/{models[1]}",
                "api_base": large_url + "/v1",
                **common,
            },
        ],
        "routed_models": ["auto"],
        "auth": {"required": False},
        "embedding": {"preload": False},
        "cache": {"enabled": False},
        "router": {"kind": "rule", "large_if_prompt_tokens_over": 200},
    }
    raw.update(overrides)
    return Policy.model_validate(raw)


def standin_policy(standins: Standins, transport: str = "litellm", **overrides: Any) -> Policy:
    """A policy over the two stand-ins; `overrides` replace top-level sections."""
    return two_tier_policy(
        standins.small_url,
        standins.large_url,
        ("small-model", "large-model"),
        {"client": transport},
        **overrides,
    )


def settle_cache(gateway: Gateway) -> None:
    """Wait until the answers given so far are stored (inserts run after the response)."""
    cache = gateway.cache_entries
    assert cache is not None
    deadline = time.monotonic() + 10
    while cache._inserts and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)


@dataclass
class RunningGateway:
    gateway: Gateway
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def shared_embeddings(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingService:
    """One loaded MiniLM for every gateway of the session (exporting and loading take seconds); its
    graph folder is shared too: the one `make install` exported into (`icgate prepare`), else a new
    one, where the verifier's cross-encoder is exported once per session."""
    import asyncio

    graphs = PREPARED_MODELS if PREPARED_MODELS.is_dir() else tmp_path_factory.mktemp("models")
    service = EmbeddingService(EmbeddingConfig(), graphs)
    asyncio.run(service.embedder())
    return service


@pytest.fixture
def start_gateway(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[Policy], RunningGateway]]:
    running: list[RunningGateway] = []

    def start(
        policy: Policy, data_dir: Path | None = None, policy_path: Path | None = None
    ) -> RunningGateway:
        embeddings = None
        if policy.cache.enabled or policy.embedding.preload or policy.router.kind == "learned":
            embeddings = request.getfixturevalue("shared_embeddings")
        gateway = Gateway(
            policy,
            data_dir or tmp_path / f"gw{len(running)}",
            launch_local=False,
            embeddings=embeddings,
            policy_path=policy_path,
        )
        server = ServerThread(create_app(gateway), ready_path="/readyz").start()
        handle = RunningGateway(gateway, server)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        handle.stop()
