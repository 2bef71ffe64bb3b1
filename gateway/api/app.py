"""The FastAPI app: the gateway's lifetime, the middleware, the error format, the routes and the schema.

Assembly only: each resource's handlers live in `gateway.api.routes`, and every decision about a
request is made in `gateway.pipeline`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from icgate.gateway.admin import api as admin_api
from icgate.gateway.admin import pages as admin_pages
from icgate.gateway.admin import policy_page, replay
from icgate.gateway.admin import router_page as admin_router_page
from icgate.gateway.admin.auth import AdminAuth
from icgate.gateway.api.bounds import RequestLimits
from icgate.gateway.api.drain import CUT_MARGIN_S, Drain
from icgate.gateway.api.errors import install_error_handlers
from icgate.gateway.api.openapi import install_schema
from icgate.gateway.api.routes import completions, embeddings, feedback, health, models
from icgate.gateway.wiring import Gateway


def create_app(gateway: Gateway, freeze_heap: bool = False) -> FastAPI:
    """The app around `gateway`. `freeze_heap` (the `icgate serve` process, which is the gateway's alone):
    once started, the start-up heap is moved out of the garbage collector's sight (`freeze_after_start`)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:  # a start that fails half-way still stops what it started
            await gateway.start()
            if freeze_heap:
                freeze_after_start()
            yield
            # Requests cut at the shutdown deadline record themselves first: then the log is flushed.
            await drain.settle(CUT_MARGIN_S)
        finally:
            await gateway.stop()

    drain = Drain()
    app = FastAPI(title="icgate", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    # Read by `gateway.api.server.build_server`: the protocol's limits and the shutdown deadline.
    app.state.server_config = gateway.policy.server
    app.state.drain = drain
    app.add_middleware(StampArrival)
    app.add_middleware(RequestLimits, config=gateway.policy.server)
    install_error_handlers(app)
    install_schema(app)
    # The order of the routes is the order of the schema's paths.
    for resource in (completions, models, embeddings, feedback, health):
        app.include_router(resource.router)
    # The admin console: its JSON API (in the schema) and its pages (not).
    app.state.admin_auth = AdminAuth(gateway.policy.admin.key(), gateway.policy.admin.session_minutes * 60)
    app.include_router(admin_api.router)
    app.include_router(admin_router_page.api)
    admin_pages.install(app, gateway.policy.admin)
    app.include_router(policy_page.api)
    app.include_router(policy_page.pages)
    app.include_router(replay.api)
    app.include_router(replay.pages)
    return app


def freeze_after_start() -> None:
    """Collect once, then freeze: what start-up made (some 800,000 objects, most of them imported modules:
    litellm, pydantic, fastapi) lives as long as the process, yet every full collection would scan it, a
    350-400 ms pause of the event loop here (docs/performance.md). Frozen, a full collection scans only
    what requests made since. A process that hosts other code (the in-process middleware,
    tests starting many gateways) does not freeze: garbage cycles among frozen objects are never freed."""
    gc.collect()
    gc.freeze()


class StampArrival:
    """Notes when a request reached the gateway, before its body is read and validated,
    so that `x-icgate-overhead-ms` counts that work too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["icgate_arrived"] = time.perf_counter()
        await self.app(scope, receive, send)
