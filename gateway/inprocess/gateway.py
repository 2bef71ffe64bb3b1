"""`icgate.Gateway`: the whole gateway inside a Python process, behind the user's own openai client.

    async with icgate.Gateway(policy="policy.yaml", data_dir="d") as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused"))

Opening it does what `icgate serve` does before it listens: migrate the database, start the writers and
any local backends, load the models and the cache (`gateway.wiring.Gateway.start`); closing it flushes
the request log and stops what it started. Nothing listens on a socket. `wrap` returns a client of the
caller's own class and settings whose requests go through the pipeline (gateway/inprocess/transport.py).

`async with` runs the gateway on the caller's loop, the cheapest way for an async service. `with` runs it
on a loop of its own in a background thread, for sync code (and for clients on other threads or loops).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import httpx
import openai

from icgate.gateway.config import DEFAULT_POLICY, Policy, load_policy
from icgate.gateway.inprocess.transport import (
    CrossLoopTransport,
    LoopBridge,
    PipelineTransport,
    SyncPipelineTransport,
    TenantSource,
)
from icgate.gateway.records import Tenant
from icgate.gateway.store.keys import tenant_named
from icgate.gateway.wiring import EmbeddingService
from icgate.gateway.wiring import Gateway as Core

Client = TypeVar("Client", openai.OpenAI, openai.AsyncOpenAI)


def sdk_on_httpx(version: str) -> bool:
    """openai 3 replaced httpx with httpx2, whose clients take no httpx transport."""
    return int(version.split(".")[0]) < 3


class Gateway:
    """icgate in-process. `policy` is a policy file (default: the shipped default policy) or a `Policy`;
    `data_dir` holds the database, exported models and logs, as for `icgate serve --data-dir`."""

    def __init__(
        self,
        policy: str | Path | Policy | None = None,
        data_dir: str | Path = "data",
        *,
        launch_local: bool = True,
        embeddings: EmbeddingService | None = None,
    ) -> None:
        self.policy = policy if isinstance(policy, Policy) else load_policy(policy or DEFAULT_POLICY)
        # `embeddings`: models already loaded, shared by several gateways in one process (tests do that).
        path = Path(policy) if isinstance(policy, str | Path) and Path(policy) != DEFAULT_POLICY else None
        self.core = Core(
            self.policy, Path(data_dir), launch_local=launch_local, embeddings=embeddings, policy_path=path
        )
        self._bridge: LoopBridge | None = None
        self._thread: threading.Thread | None = None
        self._tenants: dict[str, asyncio.Future[Tenant]] = {}

    # --- async: on the caller's loop ----------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        self._bridge = LoopBridge(asyncio.get_running_loop(), threading.get_ident())
        try:
            await self.core.start()
        except BaseException:
            await self.core.stop()  # a start that fails half-way still stops what it started
            self._bridge = None
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.core.stop()
        finally:
            self._bridge = None

    # --- sync: on a loop of its own -----------------------------------------------------------------------

    def __enter__(self) -> Gateway:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="icgate-loop", daemon=True)
        self._thread.start()
        bridge = LoopBridge(loop, self._thread.ident)
        try:
            bridge.call(self._start_or_stop())
        except BaseException:
            self._close_loop(bridge)
            raise
        self._bridge = bridge
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        bridge = self._bridge
        if bridge is None:
            return
        try:
            bridge.call(self.core.stop())
        finally:
            self._bridge = None
            self._close_loop(bridge)

    async def _start_or_stop(self) -> None:
        try:
            await self.core.start()
        except BaseException:
            await self.core.stop()
            raise

    def _close_loop(self, bridge: LoopBridge) -> None:
        bridge.loop.call_soon_threadsafe(bridge.loop.stop)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        bridge.loop.close()

    @property
    def bridge(self) -> LoopBridge:
        """The way to the gateway's loop, for callers on other threads or loops."""
        if self._bridge is None:
            raise RuntimeError("open the gateway first (`with` or `async with`)")
        return self._bridge

    # --- clients ------------------------------------------------------------------------------------------

    def wrap(self, client: Client, *, tenant: str | None = None) -> Client:
        """`client`, same class and settings (key, base URL, timeouts, retries, default headers), served by
        this gateway. Its API key maps to a tenant as over HTTP; `tenant=` names one outright instead
        (created if new), for a process that speaks for one tenant and holds no key."""
        bridge = self._bridge
        if bridge is None:
            raise RuntimeError("open the gateway first (`with` or `async with`), then wrap clients")
        if not isinstance(client, openai.OpenAI | openai.AsyncOpenAI):
            raise TypeError(
                f"wrap takes an openai.OpenAI or openai.AsyncOpenAI client, not {type(client).__name__}"
            )
        if not sdk_on_httpx(openai.__version__):
            raise RuntimeError(
                f"openai {openai.__version__} is built on httpx2, and icgate's transport on httpx: "
                "use openai>=2.20,<3 (docs/middleware.md, 'openai SDK versions')"
            )
        inner = PipelineTransport(self.core, client.base_url.path, self.tenant_source(tenant))
        if isinstance(client, openai.AsyncOpenAI):
            transport: httpx.AsyncBaseTransport = inner
            if bridge.thread_id != threading.get_ident() or self._thread is not None:
                transport = CrossLoopTransport(inner, bridge)  # the gateway's loop is not this one
            return client.with_options(http_client=httpx.AsyncClient(transport=transport))
        sync = httpx.Client(transport=SyncPipelineTransport(inner, bridge))
        return client.with_options(http_client=sync)

    def tenant_source(self, name: str | None) -> TenantSource | None:
        """How a client wrapped for tenant `name` finds it (None: the key decides, as over HTTP)."""
        if name is None:
            return None
        if not name.strip():
            raise ValueError("tenant= needs a name")

        async def tenant() -> Tenant:
            # Looked up (or created) once, on first use, off the loop; shared by every client of the tenant.
            found = self._tenants.get(name)
            if found is None:
                engine = self.core.engine
                assert engine is not None
                found = asyncio.ensure_future(asyncio.to_thread(tenant_named, engine, name))
                self._tenants[name] = found
            try:
                return await asyncio.shield(found)
            except BaseException:
                if found.done():
                    self._tenants.pop(name, None)  # a failed lookup is tried again next time
                raise

        return tenant
